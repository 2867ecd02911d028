"""Metrics against hand-made cases and independent numpy computations."""

import json

import numpy as np
import pytest
from scipy import ndimage

from unet_jax import evaluate, metrics


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


# --------------------------------------------------------------------------------------------
# HD95 and the volume difference
# --------------------------------------------------------------------------------------------

_OFFSETS = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]


def _brute_surface(mask):
    """Coordinates of the voxels of ``mask`` with a face neighbour outside it (or beyond the
    edge), one voxel and one neighbour at a time."""
    points = []
    for z, y, x in np.argwhere(mask):
        for dz, dy, dx in _OFFSETS:
            n = (z + dz, y + dy, x + dx)
            inside = all(0 <= c < s for c, s in zip(n, mask.shape))
            if not inside or not mask[n]:
                points.append((z, y, x))
                break
    return np.array(points, float).reshape(-1, 3)


def _brute_hd95(a, b):
    """All pairwise distances between the two surfaces, nearest of each, pooled percentile."""
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return np.nan
    pa, pb = _brute_surface(a), _brute_surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def _scipy_hd95(a, b):
    """MedPy's recipe on the whole volume: erosion for the surfaces, distance transforms."""
    faces = ndimage.generate_binary_structure(3, 1)
    sa = a & ~ndimage.binary_erosion(a, faces, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, faces, border_value=0)
    ab = ndimage.distance_transform_edt(~sb)[sa]
    ba = ndimage.distance_transform_edt(~sa)[sb]
    return float(np.percentile(np.hstack([ab, ba]), 95))


def test_surface_is_the_voxels_with_a_face_neighbour_outside():
    rng = np.random.RandomState(3)
    for _ in range(5):
        m = rng.rand(4, 6, 7) > 0.4
        got = np.argwhere(metrics.surface(m)).astype(float)
        np.testing.assert_array_equal(got, _brute_surface(m))
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert metrics.surface(cube).sum() == 26  # all but the centre voxel
    assert metrics.surface(np.ones((3, 3, 3), bool)).sum() == 26  # the edge counts as outside


def test_hd95_hand_checked():
    a = np.zeros((6, 8, 8), bool)
    b = a.copy()
    a[1, 2, 2] = True
    b[4, 2, 2] = True  # three slices further
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    c = np.zeros_like(a)
    c[1, 5, 6] = True  # 3 rows and 4 columns away: 5
    assert metrics.hd95(a, c) == pytest.approx(5.0)
    assert metrics.hd95(a, a) == 0.0


def test_hd95_of_a_cube_shifted_by_two_is_two():
    a = np.zeros((8, 12, 12), bool)
    a[2:6, 3:7, 2:6] = True
    b = np.roll(a, 2, axis=2)
    # Surface-to-surface distances are 0, 1 or 2; the 16 voxels of each far face are 2 away,
    # 32 of 112 pooled distances (more than 5%).
    assert metrics.hd95(a, b) == pytest.approx(2.0)
    assert metrics.hd95(a, np.roll(a, 2, axis=0)) == pytest.approx(2.0)


def test_hd95_pools_both_directions():
    # a: one voxel; b: a row of 10 voxels starting at it. a->b: [0]; b->a: 0..9. Pooled (11
    # values, sorted 0,0,1..9) at 95% with linear interpolation: rank 9.5 -> (8 + 9) / 2. The
    # larger directed percentile (MONAI's convention) would be 0.95 * 9 = 8.55.
    a = np.zeros((1, 3, 12), bool)
    b = a.copy()
    a[0, 1, 0] = True
    b[0, 1, 0:10] = True
    assert metrics.hd95(a, b) == pytest.approx(8.5)
    assert metrics.hd95(b, a) == pytest.approx(8.5)


def test_hd95_empty_conventions():
    z = np.zeros((3, 5, 5), bool)
    one = z.copy()
    one[1, 2, 2] = True
    assert metrics.hd95(z, z) == 0.0
    assert np.isnan(metrics.hd95(one, z)) and np.isnan(metrics.hd95(z, one))


def test_hd95_against_brute_force_and_scipy_on_random_volumes():
    rng = np.random.RandomState(7)
    for i in range(30):
        shape = (rng.randint(1, 6), rng.randint(3, 10), rng.randint(3, 10))
        a = rng.rand(*shape) > rng.uniform(0.3, 0.95)
        b = rng.rand(*shape) > rng.uniform(0.3, 0.95)
        if not (a.any() and b.any()):
            continue
        want = _brute_hd95(a, b)
        assert metrics.hd95(a, b) == pytest.approx(want, abs=1e-9), i
        assert _scipy_hd95(a, b) == pytest.approx(want, abs=1e-9), i


def test_hd95_cropping_is_exact_for_small_lesions_in_a_large_volume():
    # Small blobs anywhere (at the edges too) of a volume much larger than them: the cropped
    # computation equals the whole-volume one and the brute force.
    rng = np.random.RandomState(11)
    for i in range(12):
        a = np.zeros((10, 48, 40), bool)
        b = np.zeros_like(a)
        for m in (a, b):
            for _ in range(rng.randint(1, 3)):
                z, y, x = rng.randint(0, 10), rng.randint(0, 48), rng.randint(0, 40)
                m[
                    z : z + rng.randint(1, 4), y : y + rng.randint(1, 6), x : x + rng.randint(1, 6)
                ] = True
        want = _brute_hd95(a, b)
        assert metrics.hd95(a, b) == pytest.approx(want, abs=1e-9), i
        assert _scipy_hd95(a, b) == pytest.approx(want, abs=1e-9), i


def test_hd95_input_checks():
    with pytest.raises(ValueError, match="shape"):
        metrics.hd95(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="3D"):
        metrics.hd95(np.ones((3, 3)), np.ones((3, 3)))


def test_volume_differences_hand_checked():
    t = np.zeros((2, 4, 4), bool)
    p = t.copy()
    t[0, :2, :2] = True  # 4 voxels
    p[1, :, :2] = True  # 8 voxels
    assert metrics.abs_volume_difference(p, t) == 4 == metrics.abs_volume_difference(t, p)
    assert metrics.rel_abs_volume_difference(p, t) == pytest.approx(4 / 4)
    assert metrics.rel_abs_volume_difference(t, p) == pytest.approx(4 / 8)
    z = np.zeros_like(t)
    assert metrics.abs_volume_difference(z, z) == 0
    assert np.isnan(metrics.rel_abs_volume_difference(p, z))
    assert metrics.rel_abs_volume_difference(z, t) == 1.0


def test_volume_metrics_distances_are_after_the_largest_component():
    truth = np.zeros((5, 20, 20, 1), bool)
    truth[1:4, 2:8, 2:8] = True  # 108 voxels
    pred = truth.copy()
    pred[0:2, 14:17, 12:16] = True  # a false positive of 24 voxels, dropped by the LCC step
    m = metrics.volume_metrics(pred, truth)
    # Raw, the false positive is 11% of the pooled surface distances: the HD95 would see it.
    assert _brute_hd95(pred[..., 0], truth[..., 0]) > 5
    assert m["hd95_lcc"] == 0.0 and m["avd_lcc"] == 0 and m["ravd_lcc"] == 0.0
    truth[2, 12:14, 12:14] = True  # a second true lesion of 4 voxels, missed after LCC
    m = metrics.volume_metrics(pred, truth)
    lcc = np.zeros((5, 20, 20), bool)
    lcc[1:4, 2:8, 2:8] = True
    assert m["hd95_lcc"] == pytest.approx(_brute_hd95(lcc, truth[..., 0]))
    assert m["avd_lcc"] == 4 and m["ravd_lcc"] == pytest.approx(4 / 112)
    empty = metrics.volume_metrics(np.zeros_like(truth), truth)
    assert np.isnan(empty["hd95_lcc"]) and empty["avd_lcc"] == 112 and empty["ravd_lcc"] == 1.0


def test_summary_averages_defined_distances_and_stays_valid_json():
    # evaluate.summarize over rows as per_volume makes them: NaN HD95 (one side empty) is left
    # out of the mean and median and counted; nothing in the summary is NaN (strict JSON).
    base = {"dsc": 0.8, "dsc_lcc": 0.9, "accuracy": 1.0, "precision": 1.0, "recall": 1.0}
    rows = [
        {**base, "hd95_lcc": h, "avd_lcc": v, "ravd_lcc": r}
        for h, v, r in ((2.0, 10, 0.1), (np.nan, 40, 1.0), (5.0, 0, 0.0), (11.0, 6, np.nan))
    ]
    s = evaluate.summarize(rows)
    assert s["val_hd95"] == pytest.approx(6.0) and s["val_hd95_median"] == pytest.approx(5.0)
    assert s["val_hd95_undefined"] == 1 and s["val_patients"] == 4
    assert s["val_avd"] == pytest.approx(14.0) and s["val_avd_median"] == pytest.approx(8.0)
    assert s["val_ravd"] == pytest.approx(1.1 / 3)
    json.dumps(s, allow_nan=False)
    none = evaluate.summarize([{**rows[1], "hd95_lcc": np.nan}])
    assert none["val_hd95"] is None and none["val_hd95_median"] is None
    assert none["val_hd95_undefined"] == 1
    json.dumps(none, allow_nan=False)
    old = evaluate.summarize([base])  # rows of code from before the distances
    assert "val_hd95" not in old and "val_avd" not in old
