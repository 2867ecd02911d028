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
