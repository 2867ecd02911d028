"""The report's figures: training and validation curves, per-patient bars, prediction overlays and
the comparison of several runs, each written as a PNG.

Plain inputs (metric records, numbers, prediction arrays), no knowledge of the run folder: the
report modules choose what to draw and where. Figures use matplotlib's object API
(``matplotlib.figure.Figure``, rendered by Agg) and never pyplot, so nothing here depends on, or
changes, the process's interactive backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from unet_jax import metrics as seg_metrics
from unet_jax.overlays import flair, overlay_rgb, select_slices
from unet_jax.rundata import is_finite_number

__all__ = [
    "mean_median",
    "moving_average",
    "plot_comparison_curves",
    "plot_comparison_dsc",
    "plot_overlays",
    "plot_patient_bars",
    "plot_train_loss",
    "plot_validation",
    "short_patient_name",
]

_DPI = 100


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
    ax.plot(
        steps,
        moving_average(loss, window),
        color="tab:blue",
        lw=2,
        label=f"moving average ({window} logs)",
    )
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
            ax_loss.plot(
                t_epoch,
                moving_average(t_loss, max(1, len(t_loss) // 20)),
                color="tab:blue",
                alpha=0.6,
                label="training loss (moving average)",
            )
    ax_loss.plot(
        epochs,
        series("val_loss"),
        "o-",
        color="tab:red",
        label="validation loss (training loss on validation batches sampled as in training)",
    )
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Validation loss and DSC per epoch")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    ax_dsc.plot(
        epochs, series("val_dsc"), "o-", color="tab:green", label="mean per-patient DSC (after LCC)"
    )
    for key, style, label in (
        ("val_dsc_median", "--", "median per-patient DSC"),
        ("val_dsc_raw", ":", "mean per-patient DSC (no LCC)"),
    ):
        values = series(key)
        if np.isfinite(values).any():
            ax_dsc.plot(epochs, values, style, color="tab:gray", label=label)
    best = [i for i, e in enumerate(evals) if e.get("best")]
    if best:
        i = best[-1]
        ax_dsc.plot(
            [epochs[i]],
            [series("val_dsc")[i]],
            "*",
            color="gold",
            ms=16,
            markeredgecolor="black",
            label="best checkpoint",
        )
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
    unit_range: bool = True,
) -> dict[str, float]:
    """Bar chart of one value per patient with the mean (red) and median (green) lines (both
    over the finite values); an undefined (NaN) value is drawn as no bar, marked "n/a".

    Args:
      zoom: start the y axis just below the smallest value (for pixel accuracy, which is close
        to 1 for every patient) instead of at 0.
      unit_range: a y axis from 0 to 1.05 (scores in [0, 1]); ``False`` for unbounded values
        (distances, volumes): from 0 to a little above the largest finite value.

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
    for i in np.flatnonzero(~np.isfinite(vals)):
        ax.text(i, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
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
    ax.set_xticklabels(
        [short_patient_name(s) for s in names], rotation=90, fontsize=8 if n <= 40 else 5
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = vals[np.isfinite(vals)]
    if zoom and finite.size:
        low = float(finite.min())
        ax.set_ylim(max(0.0, low - 0.3 * max(1.0 - low, 1e-3)), 1.0 + 0.02 * max(1.0 - low, 1e-3))
    elif unit_range:
        ax.set_ylim(0, 1.05)
    else:
        top = float(finite.max()) if finite.size else 0.0
        ax.set_ylim(0, 1.05 * top if top > 0 else 1.0)
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
        ax.imshow(
            overlay_rgb(flair(predictions["image"][row]), truth[i], pred[i]),
            interpolation="nearest",
        )
        number = int(predictions["slice_index"][row])
        shown.append(number)
        ax.set_title(f"slice {number}: DSC {seg_metrics.dsc(pred[i], truth[i]):.2f}", fontsize=9)
    fig.suptitle(title)
    fig.text(
        0.5, 0.01, "red: prediction   green: ground truth   yellow: both", ha="center", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=_DPI, format="png")
    return shown


def plot_comparison_dsc(
    names: Sequence[str], summaries: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """One bar per run at its mean DSC, its patients' DSC as dots and its median as a line.

    ``summaries``: per run, ``mean_dsc`` (number or None) and ``patient_dsc`` (list of numbers).
    """
    fig = Figure(figsize=(max(7.5, 1.3 * len(names) + 3.5), 4.8))
    ax = fig.subplots()
    x = np.arange(len(names))
    means = [s["mean_dsc"] if is_finite_number(s["mean_dsc"]) else 0.0 for s in summaries]
    ax.bar(x, means, color="tab:blue", alpha=0.6, label="mean per-patient DSC")
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    for i, s in enumerate(summaries):
        values = np.asarray(s["patient_dsc"], float)
        if values.size:
            ax.scatter(
                i + rng.uniform(-0.25, 0.25, values.size),
                values,
                s=12,
                color="black",
                alpha=0.7,
                zorder=3,
                label="patients" if i == 0 else None,
            )
            ax.plot(
                [i - 0.35, i + 0.35],
                [np.median(values)] * 2,
                color="green",
                lw=2,
                label="median" if i == 0 else None,
            )
        if is_finite_number(s["mean_dsc"]):
            ax.text(i, 0.02, f"{s['mean_dsc']:.3f}", ha="center", color="white", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation DSC (per patient)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def plot_comparison_curves(
    evals_by_run: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str
) -> Path:
    """Validation DSC and loss per epoch, one line per run (runs without evaluations left out)."""
    fig = Figure(figsize=(8, 7))
    ax_dsc, ax_loss = fig.subplots(2, 1, sharex=True)
    for name, evals in evals_by_run.items():
        if not evals:
            continue
        epochs = [e.get("epoch", i + 1) for i, e in enumerate(evals)]
        ax_dsc.plot(epochs, [e.get("val_dsc", math.nan) for e in evals], "o-", ms=3, label=name)
        ax_loss.plot(epochs, [e.get("val_loss", math.nan) for e in evals], "o-", ms=3, label=name)
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
