"""Per-patient evaluation: predictions of a whole split, per-volume metrics and their summary.

Exact whatever the batch size: the split is run in order in padded batches, padding rows are
dropped by their validity flag, and every metric is computed per volume on the host from the
binary predictions (DSC with and without the largest 3D connected component, pixel accuracy,
precision, recall) plus a validation loss that is the baseline's Dice loss over each volume as
one vector, averaged over volumes (independent of how slices are batched).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import metrics, preprocess
from unet_jax.input_pipeline import ResidentData, SplitData, replicated


def make_predict_step(
    apply_fn: Callable[[Any, jax.Array], jax.Array], data: ResidentData, threshold: float = 0.5
):
    """A jitted ``(variables, arrays, b) -> (pred, p*y, p, y sums, valid)`` for eval batch ``b``.

    ``apply_fn(variables, images)`` returns logits. Predictions are ``sigmoid >= threshold``.
    """
    logit_threshold = metrics.logit_threshold(threshold)

    # Replicated outputs: every process of a multi-host run can fetch them (a batch-sharded
    # array spans other hosts' devices); on one host it is one gather of a small batch.
    @partial(jax.jit, out_shardings=replicated(data.mesh))
    def step(variables, arrays, b):
        x, y, valid = data.eval_batch(b, arrays)
        logits = apply_fn(variables, x)
        p = jax.nn.sigmoid(logits)
        axes = (1, 2, 3)
        return (
            logits[..., 0] >= logit_threshold,
            jnp.sum(p * y, axes),
            jnp.sum(p, axes),
            jnp.sum(y, axes),
            valid,
        )

    return step


def dispatch_predictions(step, variables: Any, data: ResidentData) -> list[Any]:
    """Queue ``step`` (from :func:`make_predict_step`) on every eval batch; nothing is fetched,
    so the device works on while the host goes on (e.g. to dispatch the next epoch)."""
    return [step(variables, data.arrays, b) for b in range(data.num_eval_batches)]


def collect_predictions(dispatched: list[Any]) -> dict[str, np.ndarray]:
    """Fetch :func:`dispatch_predictions`' outputs: host arrays of the real (unpadded) slices in
    order: ``pred`` bool (N,H,W), ``py``, ``p``, ``y`` sums (N,)."""
    outs: dict[str, list[np.ndarray]] = {"pred": [], "py": [], "p": [], "y": []}
    for pred, py, p, y, valid in jax.device_get(dispatched):
        keep = np.asarray(valid, bool)
        for name, arr in zip(("pred", "py", "p", "y"), (pred, py, p, y)):
            outs[name].append(np.asarray(arr)[keep])
    return {k: np.concatenate(v) for k, v in outs.items()}


def predict_split(step, variables: Any, data: ResidentData) -> dict[str, np.ndarray]:
    """:func:`dispatch_predictions` then :func:`collect_predictions`: every batch is dispatched
    before any is fetched, so the device never waits for the host."""
    return collect_predictions(dispatch_predictions(step, variables, data))


def per_volume(
    pred: np.ndarray, truth: np.ndarray, split: SplitData, sums: dict[str, np.ndarray] | None = None
) -> list[dict[str, Any]]:
    """One row of metrics per patient volume (columns: :data:`unet_jax.rundir.PER_PATIENT_FIELDS`).

    ``pred`` and ``truth`` are binary (N, H, W) arrays aligned with ``split``'s slices; ``sums``
    (per-slice ``py``, ``p``, ``y`` of sigmoid outputs) adds the per-volume Dice loss.
    """
    if pred.shape[0] != split.num_examples or truth.shape[0] != split.num_examples:
        raise ValueError(
            f"{pred.shape[0]} predictions / {truth.shape[0]} masks for {split.num_examples} slices"
        )
    rows = []
    for v, patient in enumerate(split.patients):
        idx = split.volume_slices(v)
        row: dict[str, Any] = {"patient": patient}
        row.update(metrics.volume_metrics(pred[idx], truth[idx]))
        if sums is not None:
            py, p, y = (float(np.sum(sums[k][idx], dtype=np.float64)) for k in ("py", "p", "y"))
            row["dice_loss"] = 1.0 - (2.0 * py + 1.0) / (p + y + 1.0)
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and median over patients. ``val_dsc`` is the headline: mean DSC after LCC."""

    def col(name):
        return np.array([r[name] for r in rows], np.float64)

    out = {
        "val_dsc": float(col("dsc_lcc").mean()),
        "val_dsc_median": float(np.median(col("dsc_lcc"))),
        "val_dsc_raw": float(col("dsc").mean()),
        "val_dsc_raw_median": float(np.median(col("dsc"))),
        "val_accuracy": float(col("accuracy").mean()),
        "val_precision": float(col("precision").mean()),
        "val_recall": float(col("recall").mean()),
        "val_patients": len(rows),
    }
    if rows and "dice_loss" in rows[0]:
        out["val_loss"] = float(col("dice_loss").mean())
    return out


def lcc_per_volume(pred: np.ndarray, split: SplitData) -> np.ndarray:
    """``pred`` with only the largest 3D component kept within each volume."""
    out = np.zeros_like(pred, dtype=bool)
    for v in range(len(split.patients)):
        idx = split.volume_slices(v)
        out[idx] = metrics.largest_connected_component(pred[idx])
    return out


def stored_predictions(split: SplitData, pred: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of ``predictions.npz`` (what the report's overlays need): the images as stored,
    the truth, and ``pred`` after the largest-component step, at the stored size."""
    pred = lcc_per_volume(pred, split)
    h, w = split.images.shape[1:3]
    if pred.shape[1:] != (h, w):
        # Trained at a smaller size: show the prediction at the stored size (nearest neighbour).
        pred = preprocess.resize_masks(pred, (h, w))
    return {
        "image": split.images,
        "truth": split.masks[..., 0].astype(bool),
        "pred": pred,
        "patient": np.array([split.patients[v] for v in split.volume]),
        "slice_index": split.slice_index,
    }


def eval_truth(val: ResidentData) -> np.ndarray:
    """The validation masks (bool, N x H x W) at the model's input size, exactly as the
    evaluation batches see them (resized on device when the model trains below 256)."""
    if val.aug.image_size is None:
        return val.data.masks[..., 0].astype(bool)

    @partial(jax.jit, out_shardings=replicated(val.mesh))
    def masks_of(arrays, b):
        return val.eval_batch(b, arrays)[1]

    out = [np.asarray(masks_of(val.arrays, b))[..., 0] for b in range(val.num_eval_batches)]
    return np.concatenate(out)[: val.data.num_examples] >= 0.5


def evaluate_dispatched(
    dispatched: list[Any], val: ResidentData, truth: np.ndarray
) -> tuple[dict[str, float], list[dict[str, Any]], np.ndarray]:
    """Per-patient metrics of predictions dispatched earlier (:func:`dispatch_predictions`):
    fetch, per-volume rows, summary; returns (summary, rows, binary preds). ``truth``: the
    validation masks at the model's input size (:func:`eval_truth`, made once per run).
    Training runs it on a worker thread."""
    out = collect_predictions(dispatched)
    rows = per_volume(out["pred"], truth, val.data, out)
    return summarize(rows), rows, out["pred"]
