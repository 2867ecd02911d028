"""Per-patient evaluation: predictions of a whole split, per-volume metrics and their summary.

Exact whatever the batch size: the split is run in order in padded batches, padding rows are
dropped by their validity flag, and every metric is computed per volume on the host from the
binary predictions (DSC with and without the largest 3D connected component, pixel accuracy,
precision, recall), and the baseline's Dice loss over each volume as one vector.

Every metric is measured at the data's stored resolution (256x256), whatever size the model
trains at: its probabilities are resized bilinearly to the stored size before the threshold
(:func:`make_predict_step`). The run's validation loss (``val_loss``) is the training loss on
validation batches drawn as training draws them (:func:`make_loss_step`), so the two curves
compare.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import metrics, preprocess
from unet_jax.data import SplitData
from unet_jax.input_pipeline import ResidentData, replicated
from unet_jax.tta import average_probabilities


def make_predict_step(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    data: ResidentData,
    threshold: float = 0.5,
    tta: bool = False,
    ensemble: bool = False,
):
    """A jitted ``(variables, arrays, b) -> (pred, p*y, p, y sums, valid)`` for eval batch ``b``,
    at the data's stored resolution whatever the model's input size.

    ``apply_fn(variables, images)`` returns logits. The probabilities (averaged over the mirror
    image with ``tta``, and over the members with ``ensemble``, where ``variables`` is a list of
    the members' variables: :mod:`unet_jax.tta`) are resized bilinearly from the model's size
    to the stored size and thresholded there, and compared with the stored masks: the numbers
    are those of the data at 256x256, as the literature measures them, whatever size trained.
    """
    logit_threshold = metrics.logit_threshold(threshold)
    stored = tuple(data.data.images.shape[1:3])

    # Replicated outputs: every process of a multi-host run can fetch them (a batch-sharded
    # array spans other hosts' devices); on one host it is one gather of a small batch.
    @partial(jax.jit, out_shardings=replicated(data.mesh))
    def step(variables, arrays, b):
        x, _, valid = data.eval_batch(b, arrays)
        y = data.eval_masks(b, arrays)  # at the stored size
        if not tta and not ensemble and x.shape[1:3] == stored:
            # One model at the stored size: threshold the logits (exactly sigmoid >= t).
            logits = apply_fn(variables, x)
            p, pred = jax.nn.sigmoid(logits), logits[..., 0] >= logit_threshold
        else:
            members = variables if ensemble else [variables]
            p = average_probabilities([partial(apply_fn, v) for v in members], x, tta)
            p = preprocess.resize_probabilities(p, stored)
            pred = p[..., 0] >= threshold
        axes = (1, 2, 3)
        return pred, jnp.sum(p * y, axes), jnp.sum(p, axes), jnp.sum(y, axes), valid

    return step


def make_loss_step(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    data: ResidentData,
):
    """A jitted ``(variables, arrays, i) -> loss`` of validation batch ``i`` drawn as training
    draws its batches (the same sampler, a fixed key, no augmentation) and scored with the
    training loss: the validation loss a reader can compare with the training loss.

    The per-volume Dice loss of :func:`per_volume` is not that quantity: a volume's soft
    probabilities on its many lesion-free slices outweigh its lesion (the baseline's Dice has no
    per-slice normalisation), so it stays near 1 while the DSC climbs; training batches are
    drawn lesion-weighted and lie far lower.
    """
    key = jax.random.key(0)

    @partial(jax.jit, out_shardings=replicated(data.mesh))
    def step(variables, arrays, i):
        x, y = data.sampled_batch(key, i, arrays)
        return loss_fn(apply_fn(variables, x), y)

    return step


def dispatch_predictions(
    step, variables: Any, data: ResidentData, loss_step=None
) -> dict[str, list[Any]]:
    """Queue ``step`` (from :func:`make_predict_step`) on every eval batch, and ``loss_step``
    (from :func:`make_loss_step`) on an epoch of sampled batches; nothing is fetched, so the
    device works on while the host goes on (e.g. to dispatch the next epoch)."""
    out = {"batches": [step(variables, data.arrays, b) for b in range(data.num_eval_batches)]}
    if loss_step is not None:
        out["losses"] = [loss_step(variables, data.arrays, i) for i in range(data.steps_per_epoch)]
    return out


def collect_predictions(dispatched: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """Fetch :func:`dispatch_predictions`' outputs: host arrays of the real (unpadded) slices in
    order: ``pred`` bool (N,H,W) at the stored size, ``py``, ``p``, ``y`` sums (N,); and
    ``losses`` (the sampled batches' losses) when they were dispatched."""
    outs: dict[str, list[np.ndarray]] = {"pred": [], "py": [], "p": [], "y": []}
    fetched = jax.device_get(dispatched)
    for pred, py, p, y, valid in fetched["batches"]:
        keep = np.asarray(valid, bool)
        for name, arr in zip(("pred", "py", "p", "y"), (pred, py, p, y)):
            outs[name].append(np.asarray(arr)[keep])
    result = {k: np.concatenate(v) for k, v in outs.items()}
    if "losses" in fetched:
        result["losses"] = np.asarray(fetched["losses"], np.float64)
    return result


def predict_split(
    step, variables: Any, data: ResidentData, loss_step=None
) -> dict[str, np.ndarray]:
    """:func:`dispatch_predictions` then :func:`collect_predictions`: every batch is dispatched
    before any is fetched, so the device never waits for the host."""
    return collect_predictions(dispatch_predictions(step, variables, data, loss_step))


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


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and median over patients. ``val_dsc`` is the headline: mean DSC after LCC.

    Surface and volume metrics (after LCC, voxel units; rows without them, as from older code,
    leave them out): ``val_hd95`` / ``val_hd95_median`` over the patients where HD95 is defined
    and ``val_hd95_undefined``, the number where it is not (prediction or truth empty, not both);
    ``val_avd`` / ``val_avd_median`` (absolute volume difference, voxels) and ``val_ravd`` (its
    fraction of the true volume, over patients with a lesion). An average with no defined value
    is ``None``, never NaN: the summary is logged as JSON.
    """

    def col(name):
        return np.array([r[name] for r in rows], np.float64)

    def defined(name):
        values = col(name)
        return values[np.isfinite(values)]

    def mean(values):
        return float(values.mean()) if values.size else None

    def median(values):
        return float(np.median(values)) if values.size else None

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
    if rows and "hd95_lcc" in rows[0]:
        hd = defined("hd95_lcc")
        out["val_hd95"] = mean(hd)
        out["val_hd95_median"] = median(hd)
        out["val_hd95_undefined"] = len(rows) - int(hd.size)
    if rows and "avd_lcc" in rows[0]:
        avd = defined("avd_lcc")
        out["val_avd"] = mean(avd)
        out["val_avd_median"] = median(avd)
    if rows and "ravd_lcc" in rows[0]:
        out["val_ravd"] = mean(defined("ravd_lcc"))
    if rows and "dice_loss" in rows[0]:
        # Per volume: not comparable with the training loss (see make_loss_step); the run's
        # val_loss is the training loss on sampled validation batches.
        out["val_volume_dice_loss"] = float(col("dice_loss").mean())
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
    if pred.shape[1:] != split.images.shape[1:3]:
        raise ValueError(f"predictions of shape {pred.shape} for slices {split.images.shape}")
    return {
        "image": split.images,
        "truth": split.masks[..., 0].astype(bool),
        "pred": pred,
        "patient": np.array([split.patients[v] for v in split.volume]),
        "slice_index": split.slice_index,
    }


def eval_truth(val: ResidentData) -> np.ndarray:
    """The validation masks (bool, N x H x W) at the stored size: what every evaluation is
    measured against, whatever size the model trains at."""
    return val.data.masks[..., 0].astype(bool)


def evaluate_dispatched(
    dispatched: dict[str, list[Any]], val: ResidentData, truth: np.ndarray
) -> tuple[dict[str, float], list[dict[str, Any]], np.ndarray]:
    """Per-patient metrics of predictions dispatched earlier (:func:`dispatch_predictions`):
    fetch, per-volume rows, summary; returns (summary, rows, binary preds). ``truth``: the
    validation masks at the stored size, where the predictions are too, whatever the model's
    input size (:func:`eval_truth`, made once per run). Training runs it on a worker thread."""
    out = collect_predictions(dispatched)
    rows = per_volume(out["pred"], truth, val.data, out)
    summary = summarize(rows)
    if "losses" in out:
        summary["val_loss"] = float(out["losses"].mean())
    return summary, rows, out["pred"]
