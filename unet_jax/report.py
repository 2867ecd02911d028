"""Run reports: figures and a markdown summary rebuilt from a training workdir alone.

A training run writes (see ``unet_jax/train.py``) into its workdir:

* ``config.json`` — ``Config.to_dict()``;
* ``metrics.jsonl`` — ``{"type": "train", ...}`` lines, one ``{"type": "eval", ...}`` line per
  evaluation and a final ``{"type": "summary", ...}`` line;
* ``per_patient.csv`` — per-patient validation metrics of the best checkpoint
  (``dsc`` raw, ``dsc_lcc`` after the largest-3D-component step: the headline number);
* ``predictions.npz`` — validation slices of the best checkpoint (``image``, ``truth``, ``pred``
  after threshold and LCC, ``patient``, ``slice_index``).

:func:`write_report` reads only those files and writes **``<workdir>/report/``**:
``report.md`` (summary numbers, the full config table, links to every figure), the PNG figures
(``train_loss.png``, ``validation.png``, ``per_patient_dsc.png``, ``per_patient_accuracy.png``,
``overlay_best.png``, ``overlay_worst.png``), ``volume.gif`` (an overlay per slice through one
validation volume) and a copy of ``per_patient.csv``. :func:`compare_runs` writes
**``<parent>/report/comparison.md``** with ``comparison_dsc.png`` and ``comparison_curves.png``
(and, for cross-validation, ``pooled_dsc.png``) for a parent workdir holding several runs.

Pieces that are missing (a run still before its first evaluation, a crashed run without
predictions) are skipped with a plain message in the report instead of an exception; the messages
are also returned in :class:`RunData.problems`.

Overlay colours: prediction outline red, ground-truth outline green, both on the same pixel
yellow, drawn on the FLAIR channel (channel 1 of the stored image).

Figures use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg) and never
pyplot, so nothing here depends on, or changes, the process's interactive backend.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage

from unet_jax import metrics as seg_metrics
from unet_jax.config import Config

__all__ = [
    "REPORT_DIRNAME",
    "RunData",
    "load_run",
    "read_metrics",
    "read_per_patient",
    "read_predictions",
    "per_patient_from_predictions",
    "headline_key",
    "mean_median",
    "moving_average",
    "short_patient_name",
    "patient_groups",
    "select_slices",
    "outline",
    "overlay_rgb",
    "best_worst_patients",
    "typical_patient",
    "plot_train_loss",
    "plot_validation",
    "plot_patient_bars",
    "plot_overlays",
    "write_overlay_gif",
    "write_volume_gif",
    "write_report",
    "write_run_report",
    "run_summary",
    "config_differences",
    "pooled_per_patient",
    "compare_runs",
    "is_run_dir",
    "find_runs",
]

#: Sub-folder of a workdir that receives the report.
REPORT_DIRNAME = "report"
#: Channel of the stored (pre-contrast, FLAIR, post-contrast) image that shows the lesion.
FLAIR_CHANNEL = 1
RED = np.array([255, 0, 0], np.uint8)
GREEN = np.array([0, 255, 0], np.uint8)
YELLOW = np.array([255, 255, 0], np.uint8)
#: Files whose presence marks a folder as a run workdir.
RUN_FILES = ("config.json", "metrics.jsonl", "per_patient.csv", "predictions.npz")

_INT_COLUMNS = ("slices", "true_pixels", "pred_pixels")
_FLOAT_COLUMNS = ("dsc", "dsc_lcc", "accuracy", "precision", "recall")
_PREDICTION_KEYS = ("image", "truth", "pred", "patient", "slice_index")
_DPI = 100


# --------------------------------------------------------------------------------------------
# Reading a workdir
# --------------------------------------------------------------------------------------------


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

    def best_eval(self) -> dict[str, Any] | None:
        """The evaluation flagged ``best`` last (the kept checkpoint), else the highest DSC."""
        if not self.evals:
            return None
        flagged = [e for e in self.evals if e.get("best")]
        if flagged:
            return flagged[-1]
        scored = [e for e in self.evals if _finite(e.get("val_dsc"))]
        return max(scored, key=lambda e: e["val_dsc"]) if scored else self.evals[-1]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
            for key in _INT_COLUMNS + _FLOAT_COLUMNS:
                value = (raw.get(key) or "").strip()
                try:
                    number = float(value) if value else math.nan
                except ValueError:
                    number = math.nan
                if key in _INT_COLUMNS and math.isfinite(number):
                    row[key] = int(number)
                else:
                    row[key] = number
            rows.append(row)
    return rows


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """Load ``predictions.npz`` (fully, into memory); raise ``ValueError`` naming missing keys."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _PREDICTION_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path.name} lacks array(s) {missing}")
        out = {k: np.asarray(data[k]) for k in _PREDICTION_KEYS}
    out["truth"] = out["truth"].astype(bool)
    out["pred"] = out["pred"].astype(bool)
    if out["truth"].ndim == 4:  # tolerate a trailing channel axis
        out["truth"], out["pred"] = out["truth"][..., 0], out["pred"][..., 0]
    out["patient"] = out["patient"].astype(str)
    n = len(out["patient"])
    if any(len(out[k]) != n for k in _PREDICTION_KEYS):
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


def per_patient_from_predictions(predictions: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-patient rows recomputed from ``predictions.npz`` (used when the CSV is missing).

    The stored prediction is already after the largest-component step, so ``dsc_lcc`` is exact,
    while the raw ``dsc`` is unknown (NaN) and accuracy/precision/recall are of the LCC mask.
    """
    rows = []
    for name, idx in patient_groups(predictions["patient"], predictions["slice_index"]).items():
        pred, truth = predictions["pred"][idx], predictions["truth"][idx]
        m = seg_metrics.counted_metrics(pred, truth)
        rows.append({"patient": name, "slices": int(len(idx)), "dsc": math.nan,
                     "dsc_lcc": m.pop("dsc"), **m})
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

    config_path = workdir / "config.json"
    if config_path.is_file():
        try:
            run.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as err:
            run.problems.append(f"config.json unreadable ({err}).")
    else:
        run.problems.append("config.json missing: the configuration table is left out.")

    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.is_file():
        run.train, run.evals, run.summary, problems = read_metrics(metrics_path)
        run.problems.extend(problems)
        if not run.train:
            run.problems.append("metrics.jsonl has no training lines: no training-loss figure.")
        if not run.evals:
            run.problems.append(
                "metrics.jsonl has no evaluation lines yet (the run has not finished its first "
                "evaluation, or evaluation failed): no validation figure and no best-checkpoint "
                "numbers."
            )
        if run.summary is None:
            run.problems.append(
                "metrics.jsonl has no summary line: the run is still going or stopped early."
            )
    else:
        run.problems.append("metrics.jsonl missing: no training or validation curves.")

    predictions_path = workdir / "predictions.npz"
    if not predictions:
        pass
    elif predictions_path.is_file():
        try:
            run.predictions = read_predictions(predictions_path)
        except (ValueError, OSError) as err:
            run.problems.append(f"predictions.npz unreadable ({err}): no overlays or GIF.")
    else:
        run.problems.append("predictions.npz missing: no prediction overlays and no GIF.")

    csv_path = workdir / "per_patient.csv"
    if csv_path.is_file():
        try:
            run.per_patient = read_per_patient(csv_path)
        except (OSError, csv.Error) as err:
            run.problems.append(f"per_patient.csv unreadable ({err}).")
    if run.per_patient is None:
        if run.predictions is not None:
            run.per_patient = per_patient_from_predictions(run.predictions)
            run.per_patient_recomputed = True
            run.problems.append(
                "per_patient.csv missing: per-patient numbers recomputed from predictions.npz "
                "(DSC after LCC exact; raw DSC unavailable)."
            )
        else:
            run.problems.append("per_patient.csv missing: no per-patient charts or table.")
    return run


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def headline_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-patient DSC column to report: ``dsc_lcc`` (the baseline's metric) when present."""
    if rows and any(_finite(r.get("dsc_lcc")) for r in rows):
        return "dsc_lcc"
    return "dsc"


def mean_median(values: Sequence[float]) -> tuple[float, float]:
    """Mean and median of the finite values (NaN, NaN when there are none)."""
    arr = np.asarray(values, float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(np.median(arr))


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average with a window that grows from 1 at the start (same length)."""
    arr = np.asarray(values, float)
    window = max(1, int(window))
    if arr.size == 0:
        return arr
    csum = np.cumsum(np.insert(arr, 0, 0.0))
    idx = np.arange(1, arr.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def short_patient_name(name: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``CS_4941`` (other names unchanged) for axis labels."""
    m = re.fullmatch(r"TCGA_([A-Z0-9]+)_([A-Z0-9]+)_\d{8}", name)
    return f"{m.group(1)}_{m.group(2)}" if m else name


def select_slices(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` slice positions of a volume with the largest lesion-or-prediction area.

    Slices with neither lesion nor prediction are taken only when no slice has any (then the
    middle ``k`` slices). Returned in ascending slice order.
    """
    truth = np.asarray(truth, bool)
    pred = np.asarray(pred, bool)
    n = truth.shape[0]
    k = max(0, min(int(k), n))
    area = (truth | pred).reshape(n, -1).sum(axis=1)
    if k == 0:
        return np.zeros(0, int)
    if not area.any():
        start = (n - k) // 2
        return np.arange(start, start + k)
    order = np.lexsort((np.arange(n), -area))  # largest area first, ties by position
    chosen = [i for i in order[:k] if area[i] > 0]
    return np.sort(np.asarray(chosen, int))


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D binary mask: mask pixels with a 4-neighbour outside the mask.

    Pixels on the image border count as boundary (outside the image is background).
    """
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _gray(image: np.ndarray) -> np.ndarray:
    """A 2D array as uint8 gray levels (uint8 kept as is, other dtypes min-max scaled)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = image.astype(float)
    lo, hi = float(np.min(image)), float(np.max(image))
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)


def overlay_rgb(gray: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8 of a gray slice with the truth outline green, prediction red, both yellow."""
    base = _gray(gray)
    rgb = np.repeat(base[..., None], 3, axis=-1)
    t, p = outline(truth), outline(pred)
    rgb[t & ~p] = GREEN
    rgb[p & ~t] = RED
    rgb[p & t] = YELLOW
    return rgb


def best_worst_patients(
    rows: Sequence[Mapping[str, Any]], among: Sequence[str] | None = None
) -> tuple[str, str] | None:
    """(best, worst) patient by headline DSC, optionally only among ``among``; None if none."""
    key = headline_key(rows)
    scored = [r for r in rows if _finite(r.get(key)) and (among is None or r["patient"] in among)]
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
    scored = [r for r in rows if _finite(r.get(key)) and (among is None or r["patient"] in among)]
    if not scored:
        return None
    _, median = mean_median([r[key] for r in scored])
    return min(scored, key=lambda r: abs(r[key] - median))["patient"]


def _fmt(value: Any, digits: int = 4) -> str:
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
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_train_loss(train: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss per step (raw and moving average) and, when logged, the learning rate."""
    steps = np.asarray([r.get("step", i) for i, r in enumerate(train)], float)
    loss = np.asarray([r.get("loss", math.nan) for r in train], float)
    lr = np.asarray([r.get("lr", math.nan) for r in train], float)
    has_lr = bool(np.isfinite(lr).any())
    fig = Figure(figsize=(8, 6 if has_lr else 4))
    axes = fig.subplots(2 if has_lr else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss (logged)")
    window = max(1, len(loss) // 20)
    ax.plot(steps, moving_average(loss, window), color="tab:blue", lw=2,
            label=f"moving average ({window} logs)")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per step")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_lr:
        axes[1].plot(steps, lr, color="tab:orange")
        axes[1].set_ylabel("learning rate")
        axes[1].grid(alpha=0.3)
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def plot_validation(
    evals: Sequence[Mapping[str, Any]], path: Path, train: Sequence[Mapping[str, Any]] = ()
) -> Path:
    """Validation loss (with the training loss for comparison) and validation DSC per epoch."""
    epochs = np.asarray([e.get("epoch", i + 1) for i, e in enumerate(evals)], float)

    def series(key: str) -> np.ndarray:
        return np.asarray([e.get(key, math.nan) for e in evals], float)

    fig = Figure(figsize=(8, 7))
    ax_loss, ax_dsc = fig.subplots(2, 1, sharex=True)
    if train:
        # Training lines carry a fractional epoch, so the curve shares the epoch axis.
        t_epoch = np.asarray([r.get("epoch", math.nan) for r in train], float)
        t_loss = np.asarray([r.get("loss", math.nan) for r in train], float)
        if np.isfinite(t_epoch).any():
            ax_loss.plot(t_epoch, moving_average(t_loss, max(1, len(t_loss) // 20)),
                         color="tab:blue", alpha=0.6, label="training loss (moving average)")
    ax_loss.plot(epochs, series("val_loss"), "o-", color="tab:red", label="validation loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Validation loss and DSC per epoch")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    ax_dsc.plot(epochs, series("val_dsc"), "o-", color="tab:green",
                label="mean per-patient DSC (after LCC)")
    for key, style, label in (("val_dsc_median", "--", "median per-patient DSC"),
                              ("val_dsc_raw", ":", "mean per-patient DSC (no LCC)")):
        values = series(key)
        if np.isfinite(values).any():
            ax_dsc.plot(epochs, values, style, color="tab:gray", label=label)
    best = [i for i, e in enumerate(evals) if e.get("best")]
    if best:
        i = best[-1]
        ax_dsc.plot([epochs[i]], [series("val_dsc")[i]], "*", color="gold", ms=16,
                    markeredgecolor="black", label="best checkpoint")
    ax_dsc.set_xlabel("epoch")
    ax_dsc.set_ylabel("validation DSC")
    ax_dsc.set_ylim(0, 1.02)
    ax_dsc.grid(alpha=0.3)
    ax_dsc.legend(loc="lower right")
    return _save(fig, path)


def plot_patient_bars(
    names: Sequence[str],
    values: Sequence[float],
    path: Path,
    *,
    ylabel: str,
    title: str,
    zoom: bool = False,
) -> dict[str, float]:
    """Bar chart of one value per patient with the mean (red) and median (green) lines.

    Args:
      zoom: start the y axis just below the smallest value (for pixel accuracy, which is close
        to 1 for every patient) instead of at 0.

    Returns:
      ``{"mean": y, "median": y}`` read back from the drawn lines (so tests check the figure).
    """
    vals = np.asarray(values, float)
    mean, median = mean_median(vals)
    n = len(vals)
    fig = Figure(figsize=(max(7.5, min(26.0, 0.28 * n + 3.5)), 4.5))  # room for the legend
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(vals, nan=0.0), color="tab:blue", alpha=0.8)
    drawn: dict[str, float] = {}
    if math.isfinite(mean):
        ax.axhline(mean, color="red", lw=2, label=f"mean {mean:.4f}")
        ax.axhline(median, color="green", lw=2, ls="--", label=f"median {median:.4f}")
        for line in ax.lines:
            kind = line.get_label().split(" ")[0]
            drawn[kind] = float(np.asarray(line.get_ydata(), float)[0])
        # Outside the axes so that it never hides a bar.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([short_patient_name(s) for s in names], rotation=90,
                       fontsize=8 if n <= 40 else 5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = vals[np.isfinite(vals)]
    if zoom and finite.size:
        low = float(finite.min())
        ax.set_ylim(max(0.0, low - 0.3 * max(1.0 - low, 1e-3)), 1.0 + 0.02 * max(1.0 - low, 1e-3))
    else:
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return drawn


def plot_overlays(
    predictions: Mapping[str, np.ndarray], rows: np.ndarray, path: Path, *, title: str, k: int = 6
) -> list[int]:
    """Overlays of the ``k`` slices of one volume (its ``rows`` in ``predictions``) with most
    lesion or prediction: FLAIR in gray, prediction outline red, truth green, both yellow.

    Returns:
      The original slice numbers shown.
    """
    truth, pred = predictions["truth"][rows], predictions["pred"][rows]
    chosen = select_slices(truth, pred, k)
    ncols = min(3, max(1, len(chosen)))
    nrows = max(1, math.ceil(len(chosen) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows + 0.6))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes:
        ax.axis("off")
    shown = []
    for ax, i in zip(axes, chosen):
        row = rows[i]
        image = predictions["image"][row]
        flair = image[..., FLAIR_CHANNEL] if image.ndim == 3 else image
        ax.imshow(overlay_rgb(flair, truth[i], pred[i]), interpolation="nearest")
        number = int(predictions["slice_index"][row])
        shown.append(number)
        ax.set_title(f"slice {number}: DSC {seg_metrics.dsc(pred[i], truth[i]):.2f}", fontsize=9)
    fig.suptitle(title)
    fig.text(0.5, 0.01, "red: prediction   green: ground truth   yellow: both", ha="center",
             fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=_DPI, format="png")
    return shown


def write_volume_gif(
    predictions: Mapping[str, np.ndarray], rows: np.ndarray, path: Path, *, min_size: int = 256,
    frame_ms: int = 200,
) -> int:
    """Animated GIF through one volume (its ``rows``), one overlay per slice, slice number
    printed in the corner; upscaled (nearest) to at least ``min_size`` pixels. Returns frames.
    """
    overlays = []
    for row in rows:
        image = predictions["image"][row]
        flair = image[..., FLAIR_CHANNEL] if image.ndim == 3 else image
        overlays.append(overlay_rgb(flair, predictions["truth"][row], predictions["pred"][row]))
    return write_overlay_gif(overlays, [int(predictions["slice_index"][r]) for r in rows], path,
                             min_size=min_size, frame_ms=frame_ms)


def write_overlay_gif(overlays: Sequence[np.ndarray], slice_numbers: Sequence[int], path: Path,
                      *, min_size: int = 256, frame_ms: int = 200) -> int:
    """Animated GIF of ready-made RGB overlays, each labelled ``slice <number>`` in the corner;
    upscaled (nearest) to at least ``min_size`` pixels. Returns the number of frames."""
    frames = []
    for rgb, number in zip(overlays, slice_numbers, strict=True):
        scale = max(1, math.ceil(min_size / max(rgb.shape[:2])))
        frame = Image.fromarray(rgb).resize(
            (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
        # The label also keeps consecutive frames distinct: Pillow merges identical ones.
        ImageDraw.Draw(frame).text((4, 4), f"slice {number}", fill=(255, 255, 255))
        frames.append(frame)
    if not frames:
        raise ValueError("no slices for the GIF")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return len(frames)


# --------------------------------------------------------------------------------------------
# One run's report
# --------------------------------------------------------------------------------------------


def _training_tail(run: RunData) -> tuple[float | None, float | None]:
    """``(final training loss, median images/s)``: the loss as the mean of the last 10% of the
    finite logged losses; the median speed, robust to the first logs (they include compilation).
    """
    losses = [r["loss"] for r in run.train if _finite(r.get("loss"))]
    speeds = [r["images_per_s"] for r in run.train if _finite(r.get("images_per_s"))]
    return (float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None,
            float(np.median(speeds)) if speeds else None)


def _summary_rows(run: RunData) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    best = run.best_eval()
    if best is not None:
        rows += [
            ("best mean per-patient DSC (after LCC; headline)", best.get("val_dsc")),
            ("best: epoch / step", f"{best.get('epoch', 'n/a')} / {best.get('step', 'n/a')}"),
            ("best: median per-patient DSC", best.get("val_dsc_median")),
            ("best: mean per-patient DSC without LCC", best.get("val_dsc_raw")),
            ("best: mean per-patient pixel accuracy", best.get("val_accuracy")),
            ("best: validation loss", best.get("val_loss")),
        ]
        last = run.evals[-1]
        rows += [("last: epoch", last.get("epoch")),
                 ("last: mean per-patient DSC", last.get("val_dsc")),
                 ("last: validation loss", last.get("val_loss")),
                 ("evaluations", len(run.evals))]
    if run.train:
        final_loss, speed = _training_tail(run)
        rows += [("training steps logged (last step)",
                  f"{len(run.train)} ({run.train[-1].get('step', 'n/a')})"),
                 ("final training loss (mean of last 10% of logs)", final_loss)]
        if speed is not None:
            rows.append(("training throughput, median images/s", speed))
    if run.per_patient:
        key = headline_key(run.per_patient)
        mean, median = mean_median([r[key] for r in run.per_patient])
        rows += [(f"per_patient.csv: patients / mean {key} / median {key}",
                  f"{len(run.per_patient)} / {_fmt(mean)} / {_fmt(median)}")]
    if run.summary:
        for key, value in run.summary.items():
            if key != "type":
                rows.append((f"summary: {key}", json.dumps(value) if isinstance(value, (dict, list))
                             else value))
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


def write_report(workdir: str | Path, *, overlay_slices: int = 6,
                 gif_patient: str | None = None) -> Path:
    """Write ``<workdir>/report/`` (report.md, figures, GIF, per_patient.csv copy).

    Args:
      workdir: a run workdir (see the module docstring for the files read).
      overlay_slices: slices per overlay figure (those with most lesion or prediction).
      gif_patient: the volume of the GIF; default: the patient closest to the median DSC.

    Returns:
      The path of ``report.md``. Missing inputs are listed in the report, never raised
      (except a workdir that does not exist: ``FileNotFoundError``).
    """
    return write_run_report(load_run(workdir), overlay_slices=overlay_slices,
                            gif_patient=gif_patient)


def write_run_report(run: RunData, *, overlay_slices: int = 6,
                     gif_patient: str | None = None) -> Path:
    """:func:`write_report` for an already loaded run (its ``problems`` stay available)."""
    out = run.workdir / REPORT_DIRNAME
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
        plot_patient_bars(names, [r[key] for r in rows], out / "per_patient_dsc.png",
                          ylabel=f"DSC ({'after LCC' if key == 'dsc_lcc' else 'raw'})",
                          title="Per-patient validation DSC (best checkpoint)")
        figures.append(("Per-patient validation DSC", "per_patient_dsc.png"))
        if any(_finite(r.get("accuracy")) for r in rows):
            plot_patient_bars(names, [r["accuracy"] for r in rows],
                              out / "per_patient_accuracy.png",
                              ylabel="pixel accuracy", zoom=True,
                              title="Per-patient validation pixel accuracy (y axis zoomed)")
            figures.append(("Per-patient validation pixel accuracy", "per_patient_accuracy.png"))
        columns = ["patient", "slices", "dsc", "dsc_lcc", "accuracy", "precision", "recall",
                   "true_pixels", "pred_pixels"]
        per_patient_lines = _md_table(columns, [[r.get(c) for c in columns] for r in rows])
        csv_src = run.workdir / "per_patient.csv"
        if csv_src.is_file():
            shutil.copyfile(csv_src, out / "per_patient.csv")
            per_patient_lines.append("")
            per_patient_lines.append("Data: [per_patient.csv](per_patient.csv)")

    if run.predictions is not None and len(run.predictions["patient"]):
        groups = patient_groups(run.predictions["patient"], run.predictions["slice_index"])
        chosen = best_worst_patients(run.per_patient or [], among=list(groups))
        if chosen is None:
            notes.append("No per-patient DSC for the predicted patients: overlays of the first "
                         "and last patient instead of the best and worst.")
            chosen = (next(iter(groups)), list(groups)[-1])
        dsc_of = {r["patient"]: r[headline_key(run.per_patient)] for r in run.per_patient or []}
        for label, patient, fname in (("best", chosen[0], "overlay_best.png"),
                                      ("worst", chosen[1], "overlay_worst.png")):
            title = f"{label} patient {patient} (DSC {_fmt(dsc_of.get(patient), 3)})"
            plot_overlays(run.predictions, groups[patient], out / fname, title=title,
                          k=overlay_slices)
            figures.append((f"Predictions for the {label} validation patient ({patient})", fname))
        if gif_patient in groups:
            subject, why = gif_patient, "chosen"
        else:
            if gif_patient is not None:
                notes.append(f"GIF patient {gif_patient!r} is not in predictions.npz.")
            subject = typical_patient(run.per_patient or [], among=list(groups))
            why = "the patient closest to the median DSC"
            if subject is None:
                subject, why = next(iter(groups)), "the first patient"
        write_volume_gif(run.predictions, groups[subject], out / "volume.gif")
        figures.append((f"Every slice of {subject} ({why}; prediction red, truth green)",
                        "volume.gif"))

    lines = [f"# Run report: {run.name}", "",
             f"Workdir: `{run.workdir}`  ",
             f"Generated: {datetime.datetime.now().isoformat(timespec='seconds')} by "
             "`python -m experiments.report`", ""]
    status = ("complete (summary line present)" if run.summary is not None
              else "incomplete or running (no summary line)")
    lines += [f"Status: **{status}**", ""]
    if notes:
        lines += ["## Missing or skipped", ""] + [f"- {n}" for n in notes] + [""]
    summary_rows = _summary_rows(run)
    if summary_rows:
        lines += ["## Summary", ""] + _md_table(["quantity", "value"], summary_rows) + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, fname in figures:
            lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    if per_patient_lines:
        source = " (recomputed from predictions.npz)" if run.per_patient_recomputed else ""
        lines += [f"## Per-patient validation results, best checkpoint{source}", "",
                  "`dsc`: raw prediction; `dsc_lcc`: after keeping the largest 3D connected "
                  "component (the baseline's metric).", ""] + per_patient_lines + [""]
    if run.config is not None:
        lines += ["## Configuration", "",
                  "All fields of `config.json`; *default* is shown where the value differs "
                  "from `Config()` (the PyTorch baseline's settings).", ""]
        lines += _md_table(["field", "value", "default"], _config_rows(run.config)) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Comparing runs (ablation, cross-validation)
# --------------------------------------------------------------------------------------------


def run_summary(run: RunData) -> dict[str, Any]:
    """Headline numbers of one run for a comparison table.

    ``mean_dsc``/``median_dsc`` come from ``per_patient.csv`` (headline column) when present,
    else from the best evaluation line.
    """
    best = run.best_eval()
    out: dict[str, Any] = {
        "best_val_dsc": best.get("val_dsc") if best else None,
        "best_epoch": best.get("epoch") if best else None,
        "epochs_evaluated": len(run.evals),
        "mean_dsc": None, "median_dsc": None, "min_dsc": None, "patients": 0,
        "final_train_loss": None, "images_per_s": None, "patient_dsc": [],
    }
    if run.per_patient:
        key = headline_key(run.per_patient)
        values = [float(r[key]) for r in run.per_patient if _finite(r.get(key))]
        out["patient_dsc"] = values
        out["patients"] = len(values)
        if values:
            out["mean_dsc"], out["median_dsc"] = mean_median(values)
            out["min_dsc"] = float(min(values))
    elif best is not None:
        out["mean_dsc"], out["median_dsc"] = best.get("val_dsc"), best.get("val_dsc_median")
    out["final_train_loss"], out["images_per_s"] = _training_tail(run)
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
        out[name] = {k: config.get(k) for k in keys
                     if json.dumps(config.get(k), sort_keys=True) != reference[k]}
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


def _plot_comparison_dsc(names: Sequence[str], summaries: Sequence[Mapping[str, Any]],
                         path: Path, title: str) -> Path:
    fig = Figure(figsize=(max(7.5, 1.3 * len(names) + 3.5), 4.8))
    ax = fig.subplots()
    x = np.arange(len(names))
    means = [s["mean_dsc"] if _finite(s["mean_dsc"]) else 0.0 for s in summaries]
    ax.bar(x, means, color="tab:blue", alpha=0.6, label="mean per-patient DSC")
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    for i, s in enumerate(summaries):
        values = np.asarray(s["patient_dsc"], float)
        if values.size:
            ax.scatter(i + rng.uniform(-0.25, 0.25, values.size), values, s=12, color="black",
                       alpha=0.7, zorder=3, label="patients" if i == 0 else None)
            ax.plot([i - 0.35, i + 0.35], [np.median(values)] * 2, color="green", lw=2,
                    label="median" if i == 0 else None)
        if _finite(s["mean_dsc"]):
            ax.text(i, 0.02, f"{s['mean_dsc']:.3f}", ha="center", color="white", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation DSC (per patient)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def _plot_comparison_curves(runs: Mapping[str, RunData], path: Path, title: str) -> Path:
    fig = Figure(figsize=(8, 7))
    ax_dsc, ax_loss = fig.subplots(2, 1, sharex=True)
    for name, run in runs.items():
        if not run.evals:
            continue
        epochs = [e.get("epoch", i + 1) for i, e in enumerate(run.evals)]
        ax_dsc.plot(epochs, [e.get("val_dsc", math.nan) for e in run.evals], "o-", ms=3,
                    label=name)
        ax_loss.plot(epochs, [e.get("val_loss", math.nan) for e in run.evals], "o-", ms=3,
                     label=name)
    ax_dsc.set_ylabel("mean per-patient DSC")
    ax_dsc.set_ylim(0, 1.02)
    ax_dsc.set_title(f"{title}: validation per epoch")
    ax_loss.set_ylabel("validation loss")
    ax_loss.set_xlabel("epoch")
    for ax in (ax_dsc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def compare_runs(parent: str | Path, run_dirs: Mapping[str, str | Path], title: str, *,
                 pool_patients: bool | None = None) -> Path:
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
    out = parent / REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    for old in ("comparison_dsc.png", "comparison_curves.png", "pooled_dsc.png"):
        (out / old).unlink(missing_ok=True)
    runs: dict[str, RunData] = {}
    notes: list[str] = []
    for name, d in run_dirs.items():
        try:
            runs[name] = load_run(d, predictions=False)
        except FileNotFoundError as err:
            notes.append(f"{name}: {err}")
    names = list(runs)
    summaries = [run_summary(runs[n]) for n in names]
    diffs = config_differences({n: runs[n].config for n in names})
    if pool_patients is None:
        pool_patients = bool(runs) and all(
            r.config is not None and r.config.get("split") == "fold" for r in runs.values())

    header = ["run", "differs", "mean DSC", "median DSC", "min DSC", "patients",
              "best-eval val_dsc", "best epoch", "evaluations", "final train loss",
              "images/s", "report"]
    rows = []
    for n, s in zip(names, summaries):
        d = diffs.get(n, {})
        differs = ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "—"
        link = os.path.relpath(runs[n].workdir / REPORT_DIRNAME / "report.md", out)
        report_link = (f"[report]({Path(link).as_posix()})"
                       if (runs[n].workdir / REPORT_DIRNAME / "report.md").is_file() else "n/a")
        rows.append([n, differs, s["mean_dsc"], s["median_dsc"], s["min_dsc"], s["patients"],
                     s["best_val_dsc"], s["best_epoch"], s["epochs_evaluated"],
                     s["final_train_loss"], s["images_per_s"], report_link])
        missing = [p for p in runs[n].problems if "missing" in p or "no evaluation" in p]
        notes += [f"{n}: {p}" for p in missing]

    lines = [f"# {title}: comparison of {len(names)} runs", "",
             f"Parent workdir: `{parent}`  ",
             f"Generated: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "*mean/median/min DSC*: per-patient validation DSC after LCC of each run's best "
             "checkpoint (from its per_patient.csv); *best-eval val_dsc*: the same mean as logged "
             "at evaluation; *differs*: config fields that differ from the most common value "
             "across runs.", ""]
    lines += _md_table(header, rows) + [""]

    figures: list[tuple[str, str]] = []
    if any(s["patient_dsc"] or _finite(s["mean_dsc"]) for s in summaries):
        _plot_comparison_dsc(names, summaries, out / "comparison_dsc.png", title)
        figures.append(("Validation DSC per run (bar: mean; dots: patients; green: median)",
                        "comparison_dsc.png"))
    if any(r.evals for r in runs.values()):
        _plot_comparison_curves(runs, out / "comparison_curves.png", title)
        figures.append(("Validation DSC and loss per epoch", "comparison_curves.png"))

    if pool_patients:
        pooled, duplicates = pooled_per_patient(runs)
        key = headline_key(pooled)
        values = [r[key] for r in pooled]
        mean, median = mean_median(values)
        lines += ["## Pooled over runs (cross-validation)", "",
                  f"Every run's validation patients together: **{len(pooled)} patients**, "
                  f"mean per-patient DSC **{_fmt(mean)}**, median **{_fmt(median)}** "
                  f"(column `{key}`).", ""]
        if duplicates:
            lines += [f"Warning: {len(duplicates)} patient(s) validated in more than one run: "
                      + ", ".join(duplicates[:10]) + (" ..." if len(duplicates) > 10 else ""), ""]
        if pooled:
            order = np.argsort(np.asarray(values, float), kind="stable")
            plot_patient_bars([pooled[i]["patient"] for i in order],
                              [values[i] for i in order], out / "pooled_dsc.png",
                              ylabel="DSC", title=f"{title}: per-patient DSC, all folds (sorted)")
            figures.append(("Per-patient DSC pooled over runs, sorted", "pooled_dsc.png"))
    for caption, fname in figures:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if notes:
        lines += ["## Missing pieces", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "comparison.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


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
