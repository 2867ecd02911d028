"""Metrics against hand-made cases and independent numpy computations."""

import numpy as np
import pytest
from scipy import ndimage

from unet_jax import metrics


def test_dsc_hand_checked():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    assert metrics.dsc(a, b) == pytest.approx(2 * 1 / (2 + 2))
    assert metrics.pixel_accuracy(a, b) == pytest.approx(2 / 4)
    assert metrics.precision(a, b) == pytest.approx(0.5)
    assert metrics.recall(a, b) == pytest.approx(0.5)


def test_empty_conventions():
    z = np.zeros((2, 4, 4), bool)
    one = z.copy()
    one[0, 0, 0] = True
    assert metrics.dsc(z, z) == 1.0
    assert metrics.dsc(one, z) == 0.0 and metrics.dsc(z, one) == 0.0
    assert metrics.precision(z, one) == 1.0 and metrics.recall(z, one) == 0.0
    assert metrics.recall(one, z) == 1.0 and metrics.precision(one, z) == 0.0


def test_random_masks_against_numpy():
    rng = np.random.RandomState(1)
    for _ in range(5):
        p = rng.rand(3, 8, 8) > 0.6
        t = rng.rand(3, 8, 8) > 0.7
        inter = np.logical_and(p, t).sum()
        assert metrics.dsc(p, t) == pytest.approx(2 * inter / (p.sum() + t.sum()))
        assert metrics.pixel_accuracy(p, t) == pytest.approx((p == t).mean())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.dsc(np.zeros((2, 2)), np.zeros((2, 3)))


def test_largest_component_keeps_the_bigger_of_two_lesions():
    vol = np.zeros((4, 10, 10), bool)
    vol[0:3, 1:4, 1:4] = True  # 27 voxels
    vol[2:4, 6:8, 6:9] = True  # 12 voxels
    out = metrics.largest_connected_component(vol)
    expected = np.zeros_like(vol)
    expected[0:3, 1:4, 1:4] = True
    np.testing.assert_array_equal(out, expected)


def test_largest_component_uses_face_connectivity():
    vol = np.zeros((2, 3, 3), bool)
    vol[0, 0, 0] = vol[0, 1, 1] = vol[1, 1, 1] = True  # (0,0,0) touches the rest only diagonally
    out = metrics.largest_connected_component(vol)
    assert out.sum() == 2 and not out[0, 0, 0]
    labels, n = ndimage.label(vol)
    assert n == 2


def test_volume_metrics_with_two_lesions_and_a_false_positive():
    truth = np.zeros((5, 16, 16, 1), bool)
    truth[1:4, 2:8, 2:8] = True  # large lesion, 108 voxels
    truth[2, 12:14, 12:14] = True  # small lesion, 4 voxels
    pred = truth.copy()
    pred[0, 14:16, 0:2] = True  # false positive blob, 4 voxels, separate
    m = metrics.volume_metrics(pred, truth)
    assert m["dsc"] == pytest.approx(2 * 112 / (116 + 112))
    # LCC keeps only the large lesion: it drops the FP and the small true lesion
    assert m["dsc_lcc"] == pytest.approx(2 * 108 / (108 + 112))
    assert m["precision"] == pytest.approx(112 / 116) and m["recall"] == 1.0
    assert m["slices"] == 5 and m["true_pixels"] == 112 and m["pred_pixels"] == 116
