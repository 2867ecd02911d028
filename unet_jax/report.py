"""One run's report: figures and a markdown summary rebuilt from a training workdir alone.

:func:`write_report` reads the run folder through :mod:`unet_jax.rundata` and writes
**``<workdir>/report/``**: ``report.md`` (summary numbers, the full config table, links to every
figure), the PNG figures (``train_loss.png``, ``validation.png``, ``per_patient_dsc.png``,
``per_patient_hd95.png``, ``per_patient_accuracy.png``, ``overlay_best.png``,
``overlay_worst.png``), ``volume.gif`` (an overlay per slice through one validation volume) and
a copy of ``per_patient.csv``.

The 95th-percentile Hausdorff distance and the volume differences (``hd95_lcc``, ``avd_lcc``,
``ravd_lcc``: :func:`unet_jax.metrics.volume_metrics`) are shown beside DSC where the run has
them; runs written before they existed have no such columns, and their reports leave them out.

Pieces that are missing (a run still before its first evaluation, a crashed run without
predictions) are skipped with a plain message in the report instead of an exception; the messages
are also returned in :attr:`unet_jax.rundata.RunData.problems`.

The comparison of several runs is :mod:`unet_jax.compare`; the figures are
:mod:`unet_jax.figures`, the overlay colours :mod:`unet_jax.overlays`.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import rundata, rundir
from unet_jax.config import Config
from unet_jax.figures import (
    mean_median,
    plot_overlays,
    plot_patient_bars,
    plot_train_loss,
    plot_validation,
)
from unet_jax.overlays import write_volume_gif
from unet_jax.rundata import RunData, headline_key, is_finite_number

__all__ = [
    "REPORT_FILE",
    "best_worst_patients",
    "defined_count",
    "fmt",
    "md_table",
    "table_columns",
    "training_tail",
    "typical_patient",
    "write_report",
    "write_run_report",
]

#: The report's markdown file, in the run's report folder.
REPORT_FILE = "report.md"
#: Columns of the per-patient table in the report.
_TABLE_COLUMNS = [c for c in rundir.PER_PATIENT_FIELDS if c != "dice_loss"]
#: Per-patient columns that older runs lack: shown only when some row has a value.
OPTIONAL_COLUMNS = ("hd95_lcc", "avd_lcc", "ravd_lcc")
#: What the surface and volume columns mean, for the reports.
DISTANCE_NOTE = (
    "`hd95_lcc`: symmetric 95th-percentile Hausdorff distance between the surfaces (voxels "
    "with a face neighbour outside the mask) of the prediction after LCC and of the truth, "
    "pooled over both directions (numpy's linear-interpolation percentile, as MedPy's hd95), "
    "in voxel units: pixels of the stored slices and slice steps, unscaled (the data carry no "
    "spacing); 0 when both are empty, undefined (n/a) when exactly one is. "
    "`avd_lcc`: |predicted - true| voxels after LCC; `ravd_lcc`: `avd_lcc` / true voxels (n/a "
    "for an empty truth)."
)


# --------------------------------------------------------------------------------------------
# Choosing what to show
# --------------------------------------------------------------------------------------------


def best_worst_patients(
    rows: Sequence[Mapping[str, Any]], among: Sequence[str] | None = None
) -> tuple[str, str] | None:
    """(best, worst) patient by headline DSC, optionally only among ``among``; None if none."""
    key = headline_key(rows)
    scored = [
        r for r in rows if is_finite_number(r.get(key)) and (among is None or r["patient"] in among)
    ]
    if not scored:
        return None
    # Ties: the first listed wins either way, so the choice is deterministic.
    best = max(scored, key=lambda r: r[key])
    worst = min(scored, key=lambda r: r[key])
    return best["patient"], worst["patient"]


def typical_patient(
    rows: Sequence[Mapping[str, Any]], among: Sequence[str] | None = None
) -> str | None:
    """The patient whose headline DSC is closest to the median (the GIF's default subject)."""
    key = headline_key(rows)
    scored = [
        r for r in rows if is_finite_number(r.get(key)) and (among is None or r["patient"] in among)
    ]
    if not scored:
        return None
    _, median = mean_median([r[key] for r in scored])
    return min(scored, key=lambda r: abs(r[key] - median))["patient"]


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-patient table's columns: every column of ``per_patient.csv`` but the Dice loss,
    less the :data:`OPTIONAL_COLUMNS` no row has a value for (a run from before they existed)."""
    return [
        c
        for c in _TABLE_COLUMNS
        if c not in OPTIONAL_COLUMNS or any(is_finite_number(r.get(c)) for r in rows)
    ]


def defined_count(rows: Sequence[Mapping[str, Any]], key: str) -> int:
    """How many rows have a finite ``key``."""
    return sum(is_finite_number(r.get(key)) for r in rows)


def training_tail(run: RunData) -> tuple[float | None, float | None]:
    """``(final training loss, median images/s)``: the loss as the mean of the last 10% of the
    finite logged losses; the median speed, robust to the first logs (they include compilation).
    """
    losses = [r["loss"] for r in run.train if is_finite_number(r.get("loss"))]
    speeds = [r["images_per_s"] for r in run.train if is_finite_number(r.get("images_per_s"))]
    return (
        float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else None,
        float(np.median(speeds)) if speeds else None,
    )


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats rounded, NaN/None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table's lines; cells formatted by :func:`fmt`, pipes escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _summary_rows(run: RunData) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    best = run.best_eval()
    if best is not None:
        rows += [
            ("best mean per-patient DSC (after LCC; headline)", best.get("val_dsc")),
            ("best: epoch / step", f"{best.get('epoch', 'n/a')} / {best.get('step', 'n/a')}"),
            ("best: median per-patient DSC", best.get("val_dsc_median")),
            ("best: mean per-patient DSC without LCC", best.get("val_dsc_raw")),
        ]
        if "val_hd95" in best:
            rows += [
                (
                    "best: mean / median per-patient HD95 after LCC (voxels; undefined for "
                    f"{fmt(best.get('val_hd95_undefined'))} patient(s))",
                    f"{fmt(best.get('val_hd95'))} / {fmt(best.get('val_hd95_median'))}",
                )
            ]
        if "val_avd" in best:
            rows += [
                (
                    "best: mean / median per-patient absolute volume difference after LCC (voxels)",
                    f"{fmt(best.get('val_avd'))} / {fmt(best.get('val_avd_median'))}",
                ),
                ("best: mean per-patient relative volume difference", best.get("val_ravd")),
            ]
        rows += [
            ("best: mean per-patient pixel accuracy", best.get("val_accuracy")),
            ("best: validation loss", best.get("val_loss")),
        ]
        last = run.evals[-1]
        rows += [
            ("last: epoch", last.get("epoch")),
            ("last: mean per-patient DSC", last.get("val_dsc")),
            ("last: validation loss", last.get("val_loss")),
            ("evaluations", len(run.evals)),
        ]
    if run.train:
        final_loss, speed = training_tail(run)
        rows += [
            (
                "training steps logged (last step)",
                f"{len(run.train)} ({run.train[-1].get('step', 'n/a')})",
            ),
            ("final training loss (mean of last 10% of logs)", final_loss),
        ]
        if speed is not None:
            rows.append(("training throughput, median images/s", speed))
    if run.per_patient:
        key = headline_key(run.per_patient)
        mean, median = mean_median([r[key] for r in run.per_patient])
        rows += [
            (
                f"{rundir.PER_PATIENT_FILE}: patients / mean {key} / median {key}",
                f"{len(run.per_patient)} / {fmt(mean)} / {fmt(median)}",
            )
        ]
        defined = defined_count(run.per_patient, "hd95_lcc")
        if defined:
            mean, median = mean_median([r.get("hd95_lcc", math.nan) for r in run.per_patient])
            rows.append(
                (
                    f"{rundir.PER_PATIENT_FILE}: patients with HD95 defined / mean hd95_lcc / "
                    "median hd95_lcc (voxels)",
                    f"{defined} of {len(run.per_patient)} / {fmt(mean)} / {fmt(median)}",
                )
            )
    if run.summary:
        for key, value in run.summary.items():
            if key != "type":
                shown = json.dumps(value) if isinstance(value, (dict, list)) else value
                rows.append((f"summary: {key}", shown))
    return rows


def _config_rows(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    defaults = Config().to_dict()
    rows = []
    for key in sorted(config):
        value = config[key]
        default = defaults.get(key, "(not a Config field)")
        same = key in defaults and json.dumps(default) == json.dumps(value)
        rows.append((key, json.dumps(value), "" if same else json.dumps(default)))
    return rows


# --------------------------------------------------------------------------------------------
# One run's report
# --------------------------------------------------------------------------------------------


def write_report(
    workdir: str | Path, *, overlay_slices: int = 6, gif_patient: str | None = None
) -> Path:
    """Write ``<workdir>/report/`` (report.md, figures, GIF, per_patient.csv copy).

    Args:
      workdir: a run workdir (its files: :mod:`unet_jax.rundir`).
      overlay_slices: slices per overlay figure (those with most lesion or prediction).
      gif_patient: the volume of the GIF; default: the patient closest to the median DSC.

    Returns:
      The path of ``report.md``. Missing inputs are listed in the report, never raised
      (except a workdir that does not exist: ``FileNotFoundError``).
    """
    return write_run_report(
        rundata.load_run(workdir), overlay_slices=overlay_slices, gif_patient=gif_patient
    )


def write_run_report(
    run: RunData, *, overlay_slices: int = 6, gif_patient: str | None = None
) -> Path:
    """:func:`write_report` for an already loaded run (its ``problems`` stay available)."""
    out = run.report_dir
    out.mkdir(exist_ok=True)
    # Figures from an earlier report whose inputs are gone must not linger unlinked.
    for old in list(out.glob("*.png")) + list(out.glob("*.gif")):
        old.unlink()
    figures: list[tuple[str, str]] = []  # (caption, file name)
    notes: list[str] = list(run.problems)

    if run.train:
        plot_train_loss(run.train, out / "train_loss.png")
        figures.append(("Training loss per step", "train_loss.png"))
    if run.evals:
        plot_validation(run.evals, out / "validation.png", run.train)
        figures.append(("Validation loss and DSC per epoch", "validation.png"))

    per_patient_lines: list[str] = []
    if run.per_patient:
        rows = run.per_patient
        key = headline_key(rows)
        names = [r["patient"] for r in rows]
        plot_patient_bars(
            names,
            [r[key] for r in rows],
            out / "per_patient_dsc.png",
            ylabel=f"DSC ({'after LCC' if key == 'dsc_lcc' else 'raw'})",
            title="Per-patient validation DSC (best checkpoint)",
        )
        figures.append(("Per-patient validation DSC", "per_patient_dsc.png"))
        if defined_count(rows, "hd95_lcc"):
            plot_patient_bars(
                names,
                [r.get("hd95_lcc", math.nan) for r in rows],
                out / "per_patient_hd95.png",
                ylabel="HD95 after LCC (voxels)",
                title="Per-patient validation HD95 (best checkpoint; n/a: undefined)",
                unit_range=False,
            )
            figures.append(
                ("Per-patient validation HD95 (lower is better)", "per_patient_hd95.png")
            )
        if any(is_finite_number(r.get("accuracy")) for r in rows):
            plot_patient_bars(
                names,
                [r["accuracy"] for r in rows],
                out / "per_patient_accuracy.png",
                ylabel="pixel accuracy",
                zoom=True,
                title="Per-patient validation pixel accuracy (y axis zoomed)",
            )
            figures.append(("Per-patient validation pixel accuracy", "per_patient_accuracy.png"))
        columns = table_columns(rows)
        per_patient_lines = md_table(columns, [[r.get(c) for c in columns] for r in rows])
        if run.per_patient_csv.is_file():
            # A copy next to the report, so the report folder stands alone.
            shutil.copyfile(run.per_patient_csv, out / rundir.PER_PATIENT_FILE)
            per_patient_lines.append("")
            per_patient_lines.append(
                f"Data: [{rundir.PER_PATIENT_FILE}]({rundir.PER_PATIENT_FILE})"
            )

    if run.predictions is not None and len(run.predictions["patient"]):
        groups = rundata.patient_groups(run.predictions["patient"], run.predictions["slice_index"])
        chosen = best_worst_patients(run.per_patient or [], among=list(groups))
        if chosen is None:
            notes.append(
                "No per-patient DSC for the predicted patients: overlays of the first "
                "and last patient instead of the best and worst."
            )
            chosen = (next(iter(groups)), list(groups)[-1])
        dsc_of = {r["patient"]: r[headline_key(run.per_patient)] for r in run.per_patient or []}
        for label, patient, fname in (
            ("best", chosen[0], "overlay_best.png"),
            ("worst", chosen[1], "overlay_worst.png"),
        ):
            title = f"{label} patient {patient} (DSC {fmt(dsc_of.get(patient), 3)})"
            plot_overlays(
                run.predictions, groups[patient], out / fname, title=title, k=overlay_slices
            )
            figures.append((f"Predictions for the {label} validation patient ({patient})", fname))
        if gif_patient in groups:
            subject, why = gif_patient, "chosen"
        else:
            if gif_patient is not None:
                notes.append(f"GIF patient {gif_patient!r} is not in {rundir.PREDICTIONS_FILE}.")
            subject = typical_patient(run.per_patient or [], among=list(groups))
            why = "the patient closest to the median DSC"
            if subject is None:
                subject, why = next(iter(groups)), "the first patient"
        write_volume_gif(run.predictions, groups[subject], out / "volume.gif")
        figures.append(
            (f"Every slice of {subject} ({why}; prediction red, truth green)", "volume.gif")
        )

    lines = [
        f"# Run report: {run.name}",
        "",
        f"Workdir: `{run.workdir}`  ",
        f"Generated: {datetime.datetime.now().isoformat(timespec='seconds')} by "
        "`python -m experiments.report`",
        "",
    ]
    status = (
        "complete (summary line present)"
        if run.summary is not None
        else "incomplete or running (no summary line)"
    )
    lines += [f"Status: **{status}**", ""]
    if notes:
        lines += ["## Missing or skipped", ""] + [f"- {n}" for n in notes] + [""]
    summary_rows = _summary_rows(run)
    if summary_rows:
        lines += ["## Summary", ""] + md_table(["quantity", "value"], summary_rows) + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, fname in figures:
            lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    if per_patient_lines:
        source = (
            f" (recomputed from {rundir.PREDICTIONS_FILE})" if run.per_patient_recomputed else ""
        )
        lines += [
            f"## Per-patient validation results, best checkpoint{source}",
            "",
            "`dsc`: raw prediction; `dsc_lcc`: after keeping the largest 3D connected "
            "component (the baseline's metric).",
            "",
        ]
        if any(c in table_columns(run.per_patient or []) for c in OPTIONAL_COLUMNS):
            lines += [DISTANCE_NOTE, ""]
        lines += per_patient_lines + [""]
    if run.config is not None:
        lines += [
            "## Configuration",
            "",
            f"All fields of `{rundir.CONFIG_FILE}`; *default* is shown where the value differs "
            "from `Config()` (the PyTorch baseline's settings).",
            "",
        ]
        lines += md_table(["field", "value", "default"], _config_rows(run.config)) + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
