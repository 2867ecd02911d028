"""Segmentation metrics: DSC, pixel accuracy, precision, recall, and per-volume DSC with the
baseline's largest-3D-connected-component post-processing.

Conventions (documented, used everywhere in the project):

* Predictions are binarised as ``probability >= threshold`` (0.5 by default; equivalently
  ``logit >= 0``).
* When prediction and truth are both empty, DSC, precision and recall are **1.0** (a perfect
  answer for a lesion-free volume); when only one is empty DSC is 0.0, and precision (no
  predicted pixels) or recall (no true pixels) is 1.0 when its denominator is 0.
* Connected components use 3D face connectivity (``scipy.ndimage.label``'s default structure),
  as the baseline does, over a volume's slices in order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def logit_threshold(threshold: float) -> float:
    """The logit ``log(t / (1 - t))`` at which ``sigmoid >= t``; ``t`` must be in (0, 1)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return float(np.log(threshold / (1 - threshold)))


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = pred.size - tp - fp - fn
    return tp, fp, fn, tn


def _dsc(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def _accuracy(tp: int, fp: int, fn: int, tn: int) -> float:
    return (tp + tn) / max(tp + fp + fn + tn, 1)


def _precision(tp: int, fp: int) -> float:
    return 1.0 if tp + fp == 0 else tp / (tp + fp)


def _recall(tp: int, fn: int) -> float:
    return 1.0 if tp + fn == 0 else tp / (tp + fn)


def dsc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient 2|A∩B| / (|A|+|B|) of two binary arrays (1.0 if both empty)."""
    tp, fp, fn, _ = _counts(pred, truth)
    return _dsc(tp, fp, fn)


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """(TP + TN) / all pixels."""
    return _accuracy(*_counts(pred, truth))


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FP); 1.0 when nothing is predicted."""
    tp, fp, _, _ = _counts(pred, truth)
    return _precision(tp, fp)


def recall(pred: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FN); 1.0 when the truth is empty."""
    tp, _, fn, _ = _counts(pred, truth)
    return _recall(tp, fn)


def counted_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``dsc``, ``accuracy``, ``precision``, ``recall`` and pixel counts from one counting pass."""
    tp, fp, fn, tn = _counts(pred, truth)
    return {
        "dsc": _dsc(tp, fp, fn),
        "accuracy": _accuracy(tp, fp, fn, tn),
        "precision": _precision(tp, fp),
        "recall": _recall(tp, fn),
        "true_pixels": tp + fn,
        "pred_pixels": tp + fp,
    }


def largest_connected_component(volume: np.ndarray) -> np.ndarray:
    """Keep only the largest face-connected component of a binary volume (any rank).

    Ties keep the component with the smallest label (first in C order). An empty volume is
    returned unchanged (as bool).
    """
    volume = np.asarray(volume, bool)
    labels, n = ndimage.label(volume)
    if n <= 1:
        return volume
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def volume_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All metrics of one volume (slices, H, W[, 1]) from a binary prediction.

    Returns ``dsc`` (raw), ``dsc_lcc`` (after keeping the largest 3D component), ``accuracy``,
    ``precision``, ``recall`` (raw prediction) and pixel counts.
    """
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.ndim == 4:
        pred, truth = pred[..., 0], truth[..., 0]
    raw = counted_metrics(pred, truth)
    return {
        "slices": int(pred.shape[0]),
        "dsc": raw["dsc"],
        "dsc_lcc": dsc(largest_connected_component(pred), truth),
        **{k: raw[k] for k in ("accuracy", "precision", "recall", "true_pixels", "pred_pixels")},
    }
