"""Per-patient evaluation against independent numpy computations, exact for any batch size."""

import numpy as np
import pytest

from _reference import largest_component, np_dsc
from unet_jax import evaluate
from unet_jax.input_pipeline import AugmentSpec, ResidentData, make_mesh
from unet_jax.synthetic import blob_split


def test_per_volume_dsc_equals_numpy():
    split = blob_split(3, 6, 32)
    rng = np.random.RandomState(0)
    truth = split.masks[..., 0].astype(bool)
    pred = truth.copy()
    pred ^= rng.rand(*pred.shape) > 0.97  # scattered false positives and holes
    rows = evaluate.per_volume(pred, truth, split)
    for v, row in enumerate(rows):
        idx = split.volume == v
        assert row["patient"] == split.patients[v]
        assert row["dsc"] == pytest.approx(np_dsc(pred[idx], truth[idx]))
        assert row["dsc_lcc"] == pytest.approx(np_dsc(largest_component(pred[idx]), truth[idx]))
        assert row["accuracy"] == pytest.approx((pred[idx] == truth[idx]).mean())
    s = evaluate.summarize(rows)
    assert s["val_dsc"] == pytest.approx(np.mean([r["dsc_lcc"] for r in rows]))
    assert s["val_dsc_median"] == pytest.approx(np.median([r["dsc_lcc"] for r in rows]))


@pytest.mark.parametrize("batch", [4, 5])
def test_predict_split_is_exact_whatever_the_batch_size(batch):
    # A fixed "model": lesion logit = FLAIR standardised intensity - 1 (the blobs are bright).
    split = blob_split(2, 7, 32)
    data = ResidentData(split, make_mesh(), batch, "shuffle", AugmentSpec(0, 0, 0))
    step = evaluate.make_predict_step(lambda _, x: x[..., 1:2] - 1.0, data)
    out = evaluate.predict_split(step, None, data)
    x = (split.images / 255.0 - split.mean[split.volume][:, None, None]) / split.std[split.volume][
        :, None, None
    ]
    ref_pred = x[..., 1] - 1.0 >= 0
    np.testing.assert_array_equal(out["pred"], ref_pred)
    p = 1 / (1 + np.exp(-(x[..., 1] - 1.0)))
    y = split.masks[..., 0]
    np.testing.assert_allclose(out["py"], (p * y).sum((1, 2)), rtol=1e-4)
    rows = evaluate.per_volume(out["pred"], y.astype(bool), split, out)
    for v, row in enumerate(rows):
        idx = split.volume == v
        ref = 1 - (2 * (p[idx] * y[idx]).sum() + 1) / (p[idx].sum() + y[idx].sum() + 1)
        assert row["dice_loss"] == pytest.approx(ref, rel=1e-4)


def _bilinear_np(a: np.ndarray, out: int) -> np.ndarray:
    """Independent reference: bilinear resize of (N, h, w) to (N, out, out) with half-pixel
    centres and edge clamping (what upsampling by jax.image.resize's "linear" amounts to)."""
    n, h, w = a.shape

    def axis(size):
        c = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, c - lo

    (y0, y1, fy), (x0, x1, fx) = axis(h), axis(w)
    rows = a[:, y0] * (1 - fy)[None, :, None] + a[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def test_a_model_at_half_size_is_measured_at_the_stored_size():
    # Stored 32x32, model input 16x16 (as cpu_quick is 128 of 256): the probabilities are
    # resized bilinearly to 32x32 and thresholded there, against the stored masks, and the
    # per-volume DSC is numpy's on those 32x32 arrays (not on downsampled masks).
    import jax

    split = blob_split(2, 5, 32)
    data = ResidentData(split, make_mesh(), 4, "shuffle", AugmentSpec(0, 0, 0, 16))
    step = evaluate.make_predict_step(lambda _, x: x[..., 1:2] - 1.0, data)
    out = evaluate.predict_split(step, None, data)
    assert out["pred"].shape == (split.num_examples, 32, 32)
    x = (split.images / 255.0 - split.mean[split.volume][:, None, None]) / split.std[split.volume][
        :, None, None
    ]
    small = np.asarray(jax.image.resize(x, (len(x), 16, 16, 3), "linear", antialias=True))
    p_small = 1 / (1 + np.exp(-(small[..., 1] - 1.0)))
    p = _bilinear_np(p_small, 32)
    ref = p >= 0.5
    assert (out["pred"] != ref).mean() < 1e-3  # float rounding at the threshold only
    truth = evaluate.eval_truth(data)
    assert truth.shape == (split.num_examples, 32, 32)
    np.testing.assert_array_equal(truth, split.masks[..., 0].astype(bool))
    rows = evaluate.per_volume(out["pred"], truth, split, out)
    for v, row in enumerate(rows):
        idx = split.volume == v
        assert row["true_pixels"] == split.masks[idx].sum()
        assert row["dsc"] == pytest.approx(np_dsc(ref[idx], truth[idx]), abs=2e-3)


def test_tta_averages_the_image_and_its_mirror():
    split = blob_split(2, 5, 32)
    data = ResidentData(split, make_mesh(), 4, "shuffle", AugmentSpec(0, 0, 0))

    def model(_, x):  # not mirror-symmetric: the answer depends on the flip
        cols = np.linspace(-1, 1, 32, dtype=np.float32)[None, None, :, None]
        return x[..., 1:2] - 1.0 + 2.0 * cols

    out = evaluate.predict_split(evaluate.make_predict_step(model, data, tta=True), None, data)
    x = (split.images / 255.0 - split.mean[split.volume][:, None, None]) / split.std[split.volume][
        :, None, None
    ]
    cols = np.linspace(-1, 1, 32)[None, None, :]
    direct = 1 / (1 + np.exp(-(x[..., 1] - 1.0 + 2 * cols)))
    mirrored = 1 / (1 + np.exp(-(x[..., 1][:, :, ::-1] - 1.0 + 2 * cols)))[:, :, ::-1]
    p = (direct + mirrored) / 2
    assert (out["pred"] != (p >= 0.5)).mean() < 1e-3
    np.testing.assert_allclose(out["p"], p.sum((1, 2)), rtol=1e-4)
    plain = evaluate.predict_split(evaluate.make_predict_step(model, data), None, data)
    assert (plain["pred"] != out["pred"]).any()  # the mirror changed something


def test_the_validation_loss_is_the_training_loss_on_sampled_batches():
    # make_loss_step: the training loss (Dice, batch as one vector) on batches drawn by the
    # training sampler from a fixed key, unaugmented; checked against numpy on the same rows.
    import jax

    from unet_jax.input_pipeline import sample_indices
    from unet_jax.losses import get_loss

    split = blob_split(3, 6, 32)
    data = ResidentData(split, make_mesh(), 4, "weighted", AugmentSpec(0, 0, 0))
    fn = lambda _, x: x[..., 1:2] - 1.0  # noqa: E731
    loss_step = evaluate.make_loss_step(fn, get_loss("dice"), data)
    out = evaluate.predict_split(evaluate.make_predict_step(fn, data), None, data, loss_step)
    assert out["losses"].shape == (data.steps_per_epoch,)
    x = (split.images / 255.0 - split.mean[split.volume][:, None, None]) / split.std[split.volume][
        :, None, None
    ]
    p_all = 1 / (1 + np.exp(-(x[..., 1] - 1.0)))
    y_all = split.masks[..., 0].astype(np.float64)
    sample_key = jax.random.key(0)  # make_loss_step's fixed key
    for i, loss in enumerate(out["losses"]):
        idx = np.asarray(
            sample_indices(data.spec, sample_key, jax.numpy.asarray(i), data.arrays["log_probs"])
        )
        p, y = p_all[idx], y_all[idx]
        ref = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        assert loss == pytest.approx(ref, rel=1e-4)
