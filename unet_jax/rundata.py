"""Reading a run folder: what reports, comparisons and scripts know of a run.

:func:`load_run` reads every piece of a workdir that exists (:class:`RunData`); readers never
raise for a missing or damaged piece (a run still before its first evaluation, a crashed run
without predictions, a half-written last log line): the piece is left ``None`` or empty and
:attr:`RunData.problems` says why. :func:`find_runs` lists the runs under a parent folder. The
names of the files are :mod:`unet_jax.rundir`'s, which writes them; this module needs no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import metrics as seg_metrics
from unet_jax.rundir import (
    CONFIG_FILE,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    METRICS_FILE,
    PER_PATIENT_FILE,
    PREDICTION_KEYS,
    PREDICTIONS_FILE,
    REPORT_DIRNAME,
    RUN_FILES,
)

__all__ = [
    "RunData",
    "find_runs",
    "headline_key",
    "is_finite_number",
    "is_run_dir",
    "load_run",
    "patient_groups",
    "per_patient_from_predictions",
    "read_metrics",
    "read_per_patient",
    "read_predictions",
]


def is_finite_number(x: Any) -> bool:
    """Whether ``x`` is a finite int or float (not a bool, None, NaN or text): a logged value
    that can be shown or averaged."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def headline_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-patient DSC column to report: ``dsc_lcc`` (the baseline's metric) when present."""
    if rows and any(is_finite_number(r.get("dsc_lcc")) for r in rows):
        return "dsc_lcc"
    return "dsc"


@dataclasses.dataclass
class RunData:
    """Everything a report needs from one workdir; ``None`` marks a missing piece."""

    workdir: Path
    config: dict[str, Any] | None = None
    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] | None = None
    per_patient: list[dict[str, Any]] | None = None
    #: ``True`` when ``per_patient`` was recomputed from ``predictions.npz`` (no CSV present).
    per_patient_recomputed: bool = False
    predictions: dict[str, np.ndarray] | None = None
    #: Human-readable messages about missing or unreadable pieces.
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        """The config's name, else the folder name."""
        if self.config and self.config.get("name"):
            return str(self.config["name"])
        return self.workdir.name

    @property
    def report_dir(self) -> Path:
        """Where this run's report goes."""
        return self.workdir / REPORT_DIRNAME

    @property
    def per_patient_csv(self) -> Path:
        """The run's ``per_patient.csv`` (it may not exist)."""
        return self.workdir / PER_PATIENT_FILE

    def best_eval(self) -> dict[str, Any] | None:
        """The evaluation flagged ``best`` last (the kept checkpoint), else the highest DSC."""
        if not self.evals:
            return None
        flagged = [e for e in self.evals if e.get("best")]
        if flagged:
            return flagged[-1]
        scored = [e for e in self.evals if is_finite_number(e.get("val_dsc"))]
        return max(scored, key=lambda e: e["val_dsc"]) if scored else self.evals[-1]


def read_metrics(
    path: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """Parse ``metrics.jsonl`` into (train lines, eval lines, summary line or None, problems).

    Unreadable lines (e.g. the half-written last line of a running job) are skipped and reported
    in ``problems`` rather than raised, so a report can be made while training runs.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    problems: list[str] = []
    bad: list[int] = []
    untyped = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if not isinstance(record, dict):
                bad.append(number)
                continue
            kind = record.get("type")
            if kind == "train":
                train.append(record)
            elif kind == "eval":
                evals.append(record)
            elif kind == "summary":
                summary = record
            else:
                untyped += 1
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        problems.append(f"{path.name}: skipped {len(bad)} unreadable line(s) (line {shown}).")
    if untyped:
        problems.append(f"{path.name}: ignored {untyped} line(s) without a known 'type'.")
    return train, evals, summary, problems


def read_per_patient(path: Path) -> list[dict[str, Any]]:
    """Rows of ``per_patient.csv`` with numeric columns converted (absent or empty -> NaN)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {"patient": (raw.get("patient") or "").strip()}
            for key in INT_COLUMNS + FLOAT_COLUMNS:
                value = (raw.get(key) or "").strip()
                try:
                    number = float(value) if value else math.nan
                except ValueError:
                    number = math.nan
                if key in INT_COLUMNS and math.isfinite(number):
                    row[key] = int(number)
                else:
                    row[key] = number
            rows.append(row)
    return rows


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """Load ``predictions.npz`` (fully, into memory); raise ``ValueError`` naming missing keys."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in PREDICTION_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path.name} lacks array(s) {missing}")
        out = {k: np.asarray(data[k]) for k in PREDICTION_KEYS}
    out["truth"] = out["truth"].astype(bool)
    out["pred"] = out["pred"].astype(bool)
    if out["truth"].ndim == 4:  # tolerate a trailing channel axis
        out["truth"], out["pred"] = out["truth"][..., 0], out["pred"][..., 0]
    out["patient"] = out["patient"].astype(str)
    n = len(out["patient"])
    if any(len(out[k]) != n for k in PREDICTION_KEYS):
        raise ValueError(f"{path.name}: arrays have different numbers of slices")
    return out


def patient_groups(patients: Sequence[str], slice_index: Sequence[int]) -> dict[str, np.ndarray]:
    """Row indices of each patient's slices, in slice order; patients in order of appearance."""
    patients = np.asarray(patients).astype(str)
    slice_index = np.asarray(slice_index)
    groups: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(patients.tolist()):
        rows = np.flatnonzero(patients == name)
        groups[name] = rows[np.argsort(slice_index[rows], kind="stable")]
    return groups


def per_patient_from_predictions(
    predictions: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Per-patient rows recomputed from ``predictions.npz`` (used when the CSV is missing).

    The stored prediction is already after the largest-component step, so ``dsc_lcc`` is exact,
    while the raw ``dsc`` is unknown (NaN) and accuracy/precision/recall are of the LCC mask.
    """
    rows = []
    for name, idx in patient_groups(predictions["patient"], predictions["slice_index"]).items():
        pred, truth = predictions["pred"][idx], predictions["truth"][idx]
        m = seg_metrics.counted_metrics(pred, truth)
        rows.append(
            {
                "patient": name,
                "slices": len(idx),
                "dsc": math.nan,
                "dsc_lcc": m.pop("dsc"),
                **m,
            }
        )
    return rows


def load_run(workdir: str | Path, *, predictions: bool = True) -> RunData:
    """Read every piece of a run workdir that exists; note what is missing in ``problems``.

    Args:
      workdir: the run workdir.
      predictions: also load ``predictions.npz`` (tens of MB for real data; comparisons skip it).

    Raises:
      FileNotFoundError: the workdir itself does not exist.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist or is not a folder")
    run = RunData(workdir=workdir)

    config_path = workdir / CONFIG_FILE
    if config_path.is_file():
        try:
            run.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as err:
            run.problems.append(f"{CONFIG_FILE} unreadable ({err}).")
    else:
        run.problems.append(f"{CONFIG_FILE} missing: the configuration table is left out.")

    metrics_path = workdir / METRICS_FILE
    if metrics_path.is_file():
        run.train, run.evals, run.summary, problems = read_metrics(metrics_path)
        run.problems.extend(problems)
        if not run.train:
            run.problems.append(f"{METRICS_FILE} has no training lines: no training-loss figure.")
        if not run.evals:
            run.problems.append(
                f"{METRICS_FILE} has no evaluation lines yet (the run has not finished its first "
                "evaluation, or evaluation failed): no validation figure and no best-checkpoint "
                "numbers."
            )
        if run.summary is None:
            run.problems.append(
                f"{METRICS_FILE} has no summary line: the run is still going or stopped early."
            )
    else:
        run.problems.append(f"{METRICS_FILE} missing: no training or validation curves.")

    predictions_path = workdir / PREDICTIONS_FILE
    if not predictions:
        pass
    elif predictions_path.is_file():
        try:
            run.predictions = read_predictions(predictions_path)
        except (ValueError, OSError) as err:
            run.problems.append(f"{PREDICTIONS_FILE} unreadable ({err}): no overlays or GIF.")
    else:
        run.problems.append(f"{PREDICTIONS_FILE} missing: no prediction overlays and no GIF.")

    csv_path = workdir / PER_PATIENT_FILE
    if csv_path.is_file():
        try:
            run.per_patient = read_per_patient(csv_path)
        except (OSError, csv.Error) as err:
            run.problems.append(f"{PER_PATIENT_FILE} unreadable ({err}).")
    if run.per_patient is None:
        if run.predictions is not None:
            run.per_patient = per_patient_from_predictions(run.predictions)
            run.per_patient_recomputed = True
            run.problems.append(
                f"{PER_PATIENT_FILE} missing: per-patient numbers recomputed from "
                f"{PREDICTIONS_FILE} (DSC after LCC exact; raw DSC unavailable)."
            )
        else:
            run.problems.append(f"{PER_PATIENT_FILE} missing: no per-patient charts or table.")
    return run


# --------------------------------------------------------------------------------------------
# Finding runs
# --------------------------------------------------------------------------------------------


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds any of the files a training run writes."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_runs(parent: str | Path) -> dict[str, Path]:
    """Sub-folders of ``parent`` that are run workdirs, in natural name order (fold2 < fold10)."""
    parent = Path(parent)
    if not parent.is_dir():
        return {}
    subs = [p for p in parent.iterdir() if p.name != REPORT_DIRNAME and is_run_dir(p)]
    return {p.name: p for p in sorted(subs, key=lambda p: _natural_key(p.name))}
