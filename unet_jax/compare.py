"""The comparison of several runs (an ablation, the folds of a cross-validation).

:func:`compare_runs` writes **``<parent>/report/comparison.md``** with ``comparison_dsc.png`` and
``comparison_curves.png`` (and, for cross-validation, ``pooled_dsc.png``): one table row per run
with its headline numbers (DSC, and beside it the 95th-percentile Hausdorff distance and the
absolute volume difference where the run has them) and the config fields that set it apart,
linked to the run's own report when it has one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import rundata, rundir
from unet_jax.figures import (
    mean_median,
    plot_comparison_curves,
    plot_comparison_dsc,
    plot_patient_bars,
)
from unet_jax.report import REPORT_FILE, fmt, md_table, training_tail
from unet_jax.rundata import RunData, headline_key, is_finite_number

__all__ = [
    "compare_runs",
    "config_differences",
    "pooled_per_patient",
    "run_summary",
    "seed_groups",
    "seed_setting",
]

_FIGURES = ("comparison_dsc.png", "comparison_curves.png", "pooled_dsc.png")


def run_summary(run: RunData) -> dict[str, Any]:
    """Headline numbers of one run for a comparison table.

    ``mean_dsc``/``median_dsc`` come from ``per_patient.csv`` (headline column) when present,
    else from the best evaluation line; so do ``mean_hd95``/``median_hd95`` (over the patients
    where HD95 is defined; ``hd95_defined`` of them) and ``mean_avd`` (voxels), which are None
    for a run from before they were computed.
    """
    best = run.best_eval()
    out: dict[str, Any] = {
        "best_val_dsc": best.get("val_dsc") if best else None,
        "best_epoch": best.get("epoch") if best else None,
        "epochs_evaluated": len(run.evals),
        "mean_dsc": None,
        "median_dsc": None,
        "min_dsc": None,
        "mean_hd95": None,
        "median_hd95": None,
        "hd95_defined": None,
        "mean_avd": None,
        "patients": 0,
        "final_train_loss": None,
        "images_per_s": None,
        "patient_dsc": [],
    }
    if run.per_patient:
        key = headline_key(run.per_patient)
        values = [float(r[key]) for r in run.per_patient if is_finite_number(r.get(key))]
        out["patient_dsc"] = values
        out["patients"] = len(values)
        if values:
            out["mean_dsc"], out["median_dsc"] = mean_median(values)
            out["min_dsc"] = float(min(values))
    elif best is not None:
        out["mean_dsc"], out["median_dsc"] = best.get("val_dsc"), best.get("val_dsc_median")
    hd95 = [r.get("hd95_lcc") for r in run.per_patient or []]
    avd = [r.get("avd_lcc") for r in run.per_patient or []]
    if any(is_finite_number(v) for v in hd95 + avd):
        defined = [float(v) for v in hd95 if is_finite_number(v)]
        out["hd95_defined"] = len(defined)
        if defined:
            out["mean_hd95"], out["median_hd95"] = mean_median(defined)
        avd = [float(v) for v in avd if is_finite_number(v)]
        if avd:
            out["mean_avd"] = float(np.mean(avd))
    elif best is not None and "val_hd95" in best:
        out["mean_hd95"], out["median_hd95"] = best.get("val_hd95"), best.get("val_hd95_median")
        undefined = best.get("val_hd95_undefined")
        patients = best.get("val_patients")
        if is_finite_number(undefined) and is_finite_number(patients):
            out["hd95_defined"] = int(patients) - int(undefined)
        out["mean_avd"] = best.get("val_avd")
    out["final_train_loss"], out["images_per_s"] = training_tail(run)
    return out


def config_differences(
    configs: Mapping[str, Mapping[str, Any] | None], ignore: Sequence[str] = ("name",)
) -> dict[str, dict[str, Any]]:
    """For each run, the config fields whose value differs from the most common value of that
    field across the runs (ties: the first run's value). With one base run and one-factor
    variants this names each variant's factor; for folds it names ``fold``.
    """
    present = {k: c for k, c in configs.items() if c is not None}
    keys = sorted({f for c in present.values() for f in c} - set(ignore))
    reference: dict[str, str] = {}
    for key in keys:
        encoded = [json.dumps(c.get(key), sort_keys=True) for c in present.values()]
        counts = Counter(encoded)
        top = max(counts.values())
        reference[key] = next(e for e in encoded if counts[e] == top)
    out: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        if config is None:
            out[name] = {}
            continue
        out[name] = {
            k: config.get(k)
            for k in keys
            if json.dumps(config.get(k), sort_keys=True) != reference[k]
        }
    return out


def pooled_per_patient(runs: Mapping[str, RunData]) -> tuple[list[dict[str, Any]], list[str]]:
    """All runs' per-patient rows together (each tagged with ``run``) and the patients that
    occur in more than one run (should be none for cross-validation folds)."""
    pooled = []
    for name, run in runs.items():
        for row in run.per_patient or []:
            pooled.append({**row, "run": name})
    counts = Counter(r["patient"] for r in pooled)
    return pooled, sorted(p for p, c in counts.items() if c > 1)


#: A run name of ``experiments.run --seeds``: ``<setting>/seed<N>`` for the sub-runs of a
#: multi-run experiment, plain ``seed<N>`` for a single-run experiment's seeds.
_SEED_RUN = re.compile(r"(?:(?P<setting>.+)/)?seed-?\d+")


def seed_setting(name: str, single: str = "all seeds") -> str:
    """The setting a run name repeats: its name up to ``/seed<N>``, ``single`` for a bare
    ``seed<N>`` (the seeds of a single-run experiment), else the whole name."""
    found = _SEED_RUN.fullmatch(name)
    if found is None:
        return name
    return found["setting"] if found["setting"] is not None else single


def seed_groups(runs: Mapping[str, RunData], single: str = "all seeds") -> dict[str, list[str]]:
    """Runs that repeat one setting with other seeds (``experiments.run --seeds``): ``{setting:
    [run names]}`` for settings with at least two runs whose configs differ only in ``name``
    and ``seed``. A run's setting is :func:`seed_setting` of its name: the seeds of a
    single-run experiment (``seed0``, ``seed1``, ...) form one setting, named ``single``."""
    groups: dict[str, list[str]] = {}
    for name in runs:
        groups.setdefault(seed_setting(name, single), []).append(name)
    out = {}
    for setting, names in groups.items():
        configs = {n: runs[n].config for n in names}
        if len(names) < 2 or any(c is None for c in configs.values()):
            continue
        diffs = config_differences(configs, ignore=("name", "seed", "pack_runs", "pack_mode"))
        if not any(diffs.values()):
            out[setting] = names
    return out


def _seed_lines(
    runs: Mapping[str, RunData], summaries: Mapping[str, dict], title: str
) -> list[str]:
    """The seed-to-seed spread of each repeated setting: what a difference between settings
    must exceed before it means anything (the seeds of a single-run experiment are the
    setting ``title``)."""
    groups = seed_groups(runs, single=title)
    if not groups:
        return []
    rows = []
    for setting, names in groups.items():
        values = [summaries[n]["mean_dsc"] for n in names]
        values = [float(v) for v in values if is_finite_number(v)]
        mean = float(np.mean(values)) if values else None
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
        low, high = (min(values), max(values)) if values else (None, None)
        rows.append([setting, len(names), fmt(mean), fmt(sd), fmt(low), fmt(high)])
    return [
        "## Seeds: spread of each setting",
        "",
        "Mean per-patient DSC over each setting's seeds: *sd* is the sample standard deviation "
        "across seeds (n-1); a difference between settings smaller than about two such sds is "
        "not evidence that a factor matters.",
        "",
        *md_table(["setting", "seeds", "mean of mean DSC", "sd", "min", "max"], rows),
        "",
    ]


def compare_runs(
    parent: str | Path,
    run_dirs: Mapping[str, str | Path],
    title: str,
    *,
    pool_patients: bool | None = None,
) -> Path:
    """Write ``<parent>/report/comparison.md`` comparing several runs.

    Args:
      parent: the folder that receives ``report/``.
      run_dirs: ``{run name: workdir}`` in the order to show.
      title: heading of the comparison (e.g. the experiment name).
      pool_patients: also pool every run's per-patient DSC (cross-validation: each patient is
        validated in exactly one fold). Default: when every run's config has ``split == "fold"``.

    Returns:
      The path of ``comparison.md``.
    """
    parent = Path(parent)
    out = parent / rundir.REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    for old in _FIGURES:
        (out / old).unlink(missing_ok=True)
    runs: dict[str, RunData] = {}
    notes: list[str] = []
    for name, d in run_dirs.items():
        try:
            runs[name] = rundata.load_run(d, predictions=False)
        except FileNotFoundError as err:
            notes.append(f"{name}: {err}")
    names = list(runs)
    summaries = [run_summary(runs[n]) for n in names]
    diffs = config_differences({n: runs[n].config for n in names})
    if pool_patients is None:
        pool_patients = bool(runs) and all(
            r.config is not None and r.config.get("split") == "fold" for r in runs.values()
        )

    header = [
        "run",
        "differs",
        "mean DSC",
        "median DSC",
        "min DSC",
        "mean HD95",
        "median HD95",
        "mean AVD",
        "patients",
        "best-eval val_dsc",
        "best epoch",
        "evaluations",
        "final train loss",
        "images/s",
        "report",
    ]
    rows = []
    for n, s in zip(names, summaries):
        d = diffs.get(n, {})
        differs = ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "—"
        run_report = runs[n].report_dir / REPORT_FILE
        link = Path(os.path.relpath(run_report, out)).as_posix()
        report_link = f"[report]({link})" if run_report.is_file() else "n/a"
        rows.append(
            [
                n,
                differs,
                s["mean_dsc"],
                s["median_dsc"],
                s["min_dsc"],
                s["mean_hd95"],
                s["median_hd95"],
                s["mean_avd"],
                s["patients"],
                s["best_val_dsc"],
                s["best_epoch"],
                s["epochs_evaluated"],
                s["final_train_loss"],
                s["images_per_s"],
                report_link,
            ]
        )
        missing = [p for p in runs[n].problems if "missing" in p or "no evaluation" in p]
        notes += [f"{n}: {p}" for p in missing]

    lines = [
        f"# {title}: comparison of {len(names)} runs",
        "",
        f"Parent workdir: `{parent}`  ",
        f"Generated: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "*mean/median/min DSC*: per-patient validation DSC after LCC of each run's best "
        f"checkpoint (from its {rundir.PER_PATIENT_FILE}); *best-eval val_dsc*: the same mean as "
        "logged at evaluation; *mean/median HD95*: per-patient 95th-percentile Hausdorff "
        "distance after LCC in voxel units (unscaled pixels and slices: the data carry no "
        "spacing), over the patients where it is defined (n/a: a run from before it was "
        "computed); *mean AVD*: per-patient absolute volume difference after LCC, voxels; "
        "*differs*: config fields that differ from the most common value across runs.",
        "",
    ]
    lines += md_table(header, rows) + [""]
    lines += _seed_lines(runs, dict(zip(names, summaries)), title)

    figures: list[tuple[str, str]] = []
    if any(s["patient_dsc"] or is_finite_number(s["mean_dsc"]) for s in summaries):
        plot_comparison_dsc(names, summaries, out / "comparison_dsc.png", title)
        figures.append(
            (
                "Validation DSC per run (bar: mean; dots: patients; green: median)",
                "comparison_dsc.png",
            )
        )
    if any(r.evals for r in runs.values()):
        plot_comparison_curves(
            {n: r.evals for n, r in runs.items()}, out / "comparison_curves.png", title
        )
        figures.append(("Validation DSC and loss per epoch", "comparison_curves.png"))

    if pool_patients:
        pooled, duplicates = pooled_per_patient(runs)
        key = headline_key(pooled)
        values = [r[key] for r in pooled]
        mean, median = mean_median(values)
        lines += [
            "## Pooled over runs (cross-validation)",
            "",
            f"Every run's validation patients together: **{len(pooled)} patients**, "
            f"mean per-patient DSC **{fmt(mean)}**, median **{fmt(median)}** "
            f"(column `{key}`).",
            "",
        ]
        hd95 = [r.get("hd95_lcc", np.nan) for r in pooled]
        defined = sum(is_finite_number(v) for v in hd95)
        if defined:
            hd_mean, hd_median = mean_median(hd95)
            lines += [
                f"HD95 after LCC (voxels): mean **{fmt(hd_mean)}**, median **{fmt(hd_median)}** "
                f"over the {defined} of {len(pooled)} patients where it is defined.",
                "",
            ]
        if duplicates:
            shown = ", ".join(duplicates[:10]) + (" ..." if len(duplicates) > 10 else "")
            lines += [
                f"Warning: {len(duplicates)} patient(s) validated in more than one run: {shown}",
                "",
            ]
        if pooled:
            order = np.argsort(np.asarray(values, float), kind="stable")
            plot_patient_bars(
                [pooled[i]["patient"] for i in order],
                [values[i] for i in order],
                out / "pooled_dsc.png",
                ylabel="DSC",
                title=f"{title}: per-patient DSC, all folds (sorted)",
            )
            figures.append(("Per-patient DSC pooled over runs, sorted", "pooled_dsc.png"))
    for caption, fname in figures:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if notes:
        lines += ["## Missing pieces", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "comparison.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
