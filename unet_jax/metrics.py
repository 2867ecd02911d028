"""Segmentation metrics: DSC, pixel accuracy, precision, recall, and per-volume DSC with the
baseline's largest-3D-connected-component post-processing; the 95th-percentile Hausdorff
distance (:func:`hd95`) and the absolute volume difference of a volume.

Conventions (documented, used everywhere in the project):

* Predictions are binarised as ``probability >= threshold`` (0.5 by default; equivalently
  ``logit >= 0``).
* When prediction and truth are both empty, DSC, precision and recall are **1.0** (a perfect
  answer for a lesion-free volume); when only one is empty DSC is 0.0, and precision (no
  predicted pixels) or recall (no true pixels) is 1.0 when its denominator is 0.
* Connected components use 3D face connectivity (``scipy.ndimage.label``'s default structure),
  as the baseline does, over a volume's slices in order.
* Distances (:func:`hd95`) are in **voxel units**: the slice TIFFs carry no pixel spacing or
  slice thickness, so one unit is one in-plane pixel (at the size the metric is computed at) or
  one slice step, with no anisotropy correction. Volumes (:func:`abs_volume_difference`) are in
  voxels.
"""

from __future__ import annotations

import math

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


def _bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every True voxel of the masks; None if
    they are all empty."""
    union = masks[0].copy()
    for m in masks[1:]:
        union |= m
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """The surface voxels of a binary 3D mask: voxels of the mask with at least one of their 6
    face neighbours outside it, where beyond the array's edge counts as outside (so a lesion
    touching the first or last slice has a surface there). ``mask & ~binary_erosion(mask)`` with
    a 6-connected structure and ``border_value=0``, as MedPy defines it."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise ValueError(f"surface needs a 3D mask, got shape {mask.shape}")
    padded = np.pad(mask, 1)
    core = (slice(1, -1),) * 3
    interior = mask.copy()
    for axis in range(3):
        for step in (-1, 1):
            shifted = list(core)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """The symmetric 95th-percentile Hausdorff distance of two binary 3D volumes (slices, H, W),
    in voxel units (unit spacing on every axis: the data carry no spacing).

    Definition (MedPy's ``hd95``): the surface voxels of each mask (:func:`surface`); for every
    surface voxel of one mask, the Euclidean distance to the nearest surface voxel of the other,
    in both directions; the 95th percentile of the **pooled** distances of both directions with
    numpy's default (``method="linear"``) percentile. MONAI's ``compute_hausdorff_distance`` with
    ``percentile=95`` takes the larger of the two directed 95th percentiles instead, so its
    numbers can be larger; papers on this data differ, so compare like with like.

    Empty masks: both empty -> ``0.0`` (a perfect answer for a lesion-free volume, like DSC 1);
    exactly one empty -> ``NaN`` (undefined: there is no surface to measure to; summaries
    average over the defined cases and count the undefined ones).

    Computed with :func:`scipy.ndimage.distance_transform_edt` on the bounding box of both
    masks only, which is exact: every surface voxel of either mask lies in the box, the exact
    Euclidean transform does not depend on the room around them, and a neighbour beyond the box
    is background whether it is in the volume or beyond its edge. Small lesions in a large
    volume cost little.
    """
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    if pred.ndim != 3:
        raise ValueError(f"hd95 needs 3D volumes (slices, H, W), got shape {pred.shape}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred or has_truth):
        return 0.0
    if not (has_pred and has_truth):
        return math.nan
    box = _bounding_box(pred, truth)
    surf_p = surface(pred[box])
    surf_t = surface(truth[box])
    # distance_transform_edt gives each voxel's distance to the nearest zero voxel.
    to_truth = ndimage.distance_transform_edt(~surf_t)[surf_p]
    to_pred = ndimage.distance_transform_edt(~surf_p)[surf_t]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def abs_volume_difference(pred: np.ndarray, truth: np.ndarray) -> int:
    """``|predicted voxels - true voxels|`` (voxels; 0 when both are empty)."""
    return abs(int(np.count_nonzero(pred)) - int(np.count_nonzero(truth)))


def rel_abs_volume_difference(pred: np.ndarray, truth: np.ndarray) -> float:
    """``|predicted voxels - true voxels| / true voxels`` (a fraction; NaN when the truth is
    empty). Unsigned, unlike MedPy's ``ravd``."""
    true_voxels = int(np.count_nonzero(truth))
    if true_voxels == 0:
        return math.nan
    return abs_volume_difference(pred, truth) / true_voxels


def volume_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All metrics of one volume (slices, H, W[, 1]) from a binary prediction.

    Returns ``dsc`` (raw), ``accuracy``, ``precision``, ``recall`` and pixel counts of the raw
    prediction, and, after keeping the largest 3D component (the headline post-processing):
    ``dsc_lcc``, ``hd95_lcc`` (:func:`hd95`, voxel units; NaN when exactly one of prediction
    and truth is empty), ``avd_lcc`` (:func:`abs_volume_difference`, voxels) and ``ravd_lcc``
    (:func:`rel_abs_volume_difference`; NaN for an empty truth).
    """
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.ndim == 4:
        pred, truth = pred[..., 0], truth[..., 0]
    raw = counted_metrics(pred, truth)
    lcc = largest_connected_component(pred)
    return {
        "slices": int(pred.shape[0]),
        "dsc": raw["dsc"],
        "dsc_lcc": dsc(lcc, truth),
        **{k: raw[k] for k in ("accuracy", "precision", "recall", "true_pixels", "pred_pixels")},
        "hd95_lcc": hd95(lcc, truth),
        "avd_lcc": abs_volume_difference(lcc, truth),
        "ravd_lcc": rel_abs_volume_difference(lcc, truth),
    }
