"""The run folder: the names of the files a training run writes, their writers and their readers.

A run's workdir holds:

* ``config.json`` — ``Config.to_dict()`` (written first; a different config there is refused);
* ``metrics.jsonl`` — ``{"type": "train", ...}`` lines, one ``{"type": "eval", ...}`` line per
  evaluation and a final ``{"type": "summary", ...}`` line (:class:`RunLog`);
* ``per_patient.csv`` — per-patient validation metrics of the best checkpoint
  (``dsc`` raw, ``dsc_lcc`` after the largest-3D-component step: the headline number);
* ``predictions.npz`` — validation slices of the best checkpoint (``image``, ``truth``, ``pred``
  after threshold and LCC, ``patient``, ``slice_index``);
* ``checkpoints/`` (``unet_jax.checkpoint``), ``tensorboard/`` (optional) and ``report/``
  (``unet_jax.report``).

This module is the only one that spells those names: training writes through it, reports read
through it. It needs no JAX, so reading a run for a report stays light.

Readers never raise for a missing or damaged piece (a run still before its first evaluation, a
crashed run without predictions, a half-written last log line): :func:`load_run` notes it in
:attr:`RunData.problems` and leaves the piece ``None`` or empty.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import metrics as seg_metrics
from unet_jax.config import Config

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PER_PATIENT_FIELDS",
    "PER_PATIENT_FILE",
    "PREDICTIONS_FILE",
    "PREDICTION_KEYS",
    "REPORT_DIRNAME",
    "RUN_FILES",
    "TENSORBOARD_DIRNAME",
    "ConfigMismatchError",
    "RunData",
    "RunLog",
    "find_runs",
    "headline_key",
    "is_finite_number",
    "is_run_dir",
    "load_run",
    "patient_groups",
    "per_patient_from_predictions",
    "prepare_workdir",
    "read_metrics",
    "read_per_patient",
    "read_predictions",
    "write_best",
    "write_per_patient_csv",
    "write_predictions",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PER_PATIENT_FILE = "per_patient.csv"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINTS_DIRNAME = "checkpoints"
TENSORBOARD_DIRNAME = "tensorboard"
#: Sub-folder of a workdir that receives the report.
REPORT_DIRNAME = "report"
#: Files whose presence marks a folder as a run workdir.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, PER_PATIENT_FILE, PREDICTIONS_FILE)

#: Columns of ``per_patient.csv``, in order.
PER_PATIENT_FIELDS = [
    "patient",
    "slices",
    "dsc",
    "dsc_lcc",
    "accuracy",
    "precision",
    "recall",
    "true_pixels",
    "pred_pixels",
    "dice_loss",
]
#: Columns read back from ``per_patient.csv`` as integers / floats (the rest is text or ignored).
INT_COLUMNS = ("slices", "true_pixels", "pred_pixels")
FLOAT_COLUMNS = ("dsc", "dsc_lcc", "accuracy", "precision", "recall")
#: Arrays of ``predictions.npz``.
PREDICTION_KEYS = ("image", "truth", "pred", "patient", "slice_index")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


def prepare_workdir(
    config: Config, workdir: Path, restart: bool, *, write_config: bool = True
) -> None:
    """Create the workdir, or check that an existing run there has the same config.

    Args:
      restart: delete the run files of an existing run (whatever its config) instead.
      write_config: write ``config.json`` (only one process of a multi-host run does).

    Raises:
      ConfigMismatchError: the workdir holds a run with another config and ``restart`` is off.
    """
    cfg_file = workdir / CONFIG_FILE
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        new = json.loads(config.to_json())
        if old != new and not restart:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config (differs in: {diff}). "
                "Use another --workdir, or restart from scratch (--restart), which deletes it."
            )
        if restart:
            for name in (
                CHECKPOINTS_DIRNAME,
                METRICS_FILE,
                TENSORBOARD_DIRNAME,
                REPORT_DIRNAME,
                PER_PATIENT_FILE,
                PREDICTIONS_FILE,
            ):
                p = workdir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if write_config:
        tmp = cfg_file.with_suffix(".tmp")
        tmp.write_text(config.to_json() + "\n")
        tmp.replace(cfg_file)


class RunLog:
    """``metrics.jsonl`` (+ optional TensorBoard via tensorboardX); writes only when enabled
    (on process 0 of a multi-host run)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.path = workdir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional, TF-free

                self.tb = SummaryWriter(str(workdir / TENSORBOARD_DIRNAME))
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a killed run may have logged past its checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def has(self, kind: str, step: int) -> bool:
        """Whether a record of type ``kind`` at ``step`` is in the log."""
        if not (self.enabled and self.path.exists()):
            return False
        for ln in self.path.read_text().splitlines():
            if ln.strip():
                record = json.loads(ln)
                if record.get("type") == kind and record.get("step") == step:
                    return True
        return False

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it carries its ``type``: train, eval or summary)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_per_patient_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write the per-patient table (one row per volume; floats with 6 decimals)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_PATIENT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def write_predictions(path: str | Path, predictions: Mapping[str, np.ndarray]) -> None:
    """Write ``predictions.npz`` from arrays named :data:`PREDICTION_KEYS` (compressed)."""
    path = Path(path)
    missing = [k for k in PREDICTION_KEYS if k not in predictions]
    if missing:
        raise ValueError(f"predictions lack array(s) {missing}")
    # The temporary name must end in .npz, or numpy appends it.
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **{k: predictions[k] for k in PREDICTION_KEYS})
    tmp.replace(path)


def write_best(
    workdir: Path,
    rows: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, np.ndarray],
) -> None:
    """Write the best evaluation's ``per_patient.csv`` and ``predictions.npz``."""
    write_per_patient_csv(rows, workdir / PER_PATIENT_FILE)
    write_predictions(workdir / PREDICTIONS_FILE, predictions)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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
