"""The baseline's preprocessing in NumPy, against scikit-image and hand-checked cases.

The references here are independent: scikit-image's resize (3D, as the baseline calls it) and
rescale_intensity, and small cases worked out by hand; the baseline's steps written out with
scikit-image are ``skimage_baseline`` in tests/_reference.py. (The real-data comparison is in
tests/test_lgg_dataset.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.exposure import rescale_intensity
from skimage.transform import resize

from _reference import skimage_baseline
from unet_jax import preprocess as P
from unet_jax.synthetic import synthetic_volume


def test_threshold_crop_pad_by_hand():
    vol = np.zeros((4, 6, 8, 3), np.uint8)
    vol[1, 2:4, 1:6, 0] = 200
    vol[2, 1, 3, 2] = 19  # below 10 % of 200: zeroed
    vol[2, 4, 6, 1] = 20  # exactly 10 %: kept
    t = P.threshold_volume(vol)
    assert t[2, 1, 3, 2] == 0 and t[2, 4, 6, 1] == 20
    assert vol[2, 1, 3, 2] == 19  # input untouched
    assert P.crop_bounds(t) == (1, 3, 2, 5, 1, 7)
    assert P.square_padding(10, 7) == (0, 0, 1, 2)
    assert P.square_padding(7, 10) == (1, 2, 0, 0)
    assert P.square_padding(5, 5) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="all zeros"):
        P.crop_bounds(np.zeros((2, 3, 3, 3), np.uint8))


@pytest.mark.parametrize(
    "shape,size", [((3, 20, 14, 3), 16), ((2, 9, 9, 3), 32), ((2, 16, 16, 3), 16)]
)
def test_resize_volume_matches_skimage_3d(shape, size):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, shape).astype(np.uint8)
    vol[:, :2] = 0
    ours = P.resize_volume(vol, size)
    ref = resize(
        vol, (shape[0], size, size, 3), order=2, mode="constant", cval=0, anti_aliasing=False
    )
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_resize_volume_without_zeros_keeps_cval_in_range():
    # No zero in the input: skimage widens its clip range to cval=0 where the output reaches it.
    vol = np.full((1, 10, 10, 3), 200, np.uint8)
    vol[0, 5, 5] = 255
    ref = resize(vol, (1, 23, 23, 3), order=2, mode="constant", cval=0, anti_aliasing=False)
    np.testing.assert_allclose(P.resize_volume(vol, 23), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_in,n_out", [(200, 256), (256, 200), (7, 16), (256, 256)])
def test_resize_masks_matches_skimage_nearest(n_in, n_out):
    rng = np.random.default_rng(1)
    masks = (rng.random((2, n_in, n_in - 1)) > 0.7).astype(np.uint8) * 255
    ours = P.resize_masks(masks, n_out)
    ref = resize(masks, (2, n_out, n_out), order=0, mode="constant", cval=0, anti_aliasing=False)
    np.testing.assert_array_equal(ours, ref)


def test_rescale_percentiles_matches_skimage():
    rng = np.random.default_rng(2)
    v = rng.random((3, 8, 8, 3)) ** 2
    p10, p99 = np.percentile(v, 10), np.percentile(v, 99)
    np.testing.assert_allclose(
        P.rescale_percentiles(v), rescale_intensity(v, in_range=(p10, p99)), rtol=0, atol=1e-15
    )
    flat = np.full((2, 4, 4, 3), 0.25)  # p10 == p99: skimage clips to [0, 1]
    np.testing.assert_array_equal(
        P.rescale_percentiles(flat), rescale_intensity(flat, in_range=(0.25, 0.25))
    )


def test_preprocess_volume_float_matches_skimage_pipeline():
    rng = np.random.default_rng(3)
    images, masks = synthetic_volume(rng, 9, 80)
    r, m, geometry = P.preprocess_volume_float(images, masks, size=64)
    r_ref, m_ref, z_range, box = skimage_baseline(images, masks, 64)
    assert r.shape == r_ref.shape
    np.testing.assert_allclose(r, r_ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(m, m_ref)
    assert geometry.z_range == z_range and geometry.crop_box == box
    assert geometry.num_slices == 9 and geometry.in_shape == (80, 80) and geometry.out_size == 64
    assert geometry.num_kept == r.shape[0]


def test_quantised_form_reproduces_standardisation_within_bound():
    rng = np.random.default_rng(4)
    images, masks = synthetic_volume(rng, 8, 64)
    pv = P.preprocess_volume(images, masks, size=64)
    r, _, _ = P.preprocess_volume_float(images, masks, size=64)
    mean, std = r.mean(axis=(0, 1, 2)), r.std(axis=(0, 1, 2))
    assert pv.image.dtype == np.uint8 and pv.mask.dtype == np.uint8
    np.testing.assert_array_equal(pv.image, np.rint(r * 255).astype(np.uint8))
    np.testing.assert_allclose(pv.channel_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(pv.channel_std, std, rtol=1e-6)
    exact = (r - mean) / std
    approx = P.standardise(pv.image, pv.channel_mean, pv.channel_std)
    assert approx.dtype == np.float32
    # Rounding moves r by at most 0.5/255; float32 adds ~1e-6.
    bound = 0.5 / 255 / std + 1e-5
    assert np.all(np.abs(approx - exact) <= bound)


def test_preprocess_images_for_inference_matches_with_masks():
    rng = np.random.default_rng(5)
    images, masks = synthetic_volume(rng, 7, 48)
    with_masks = P.preprocess_volume(images, masks, size=32)
    only = P.preprocess_images(images, size=32)
    assert only.mask is None
    np.testing.assert_array_equal(only.image, with_masks.image)
    assert only.geometry == with_masks.geometry == P.baseline_geometry(images, size=32)


def test_geometry_and_restore_prediction_by_hand():
    images = np.zeros((6, 10, 12, 3), np.uint8)
    images[2:4, 3:7, 2:10] = 100  # brain in slices 3-4, rows 3-6, cols 2-9: a 4 x 8 box
    images[0, 0, 0] = 255  # in the dropped first slice: ignored
    geometry = P.baseline_geometry(images, size=8)
    assert geometry.z_range == (2, 4)
    assert geometry.crop_box == (3, 7, 2, 10)
    assert geometry.padding == (2, 2, 0, 0)  # 4 rows padded to 8
    assert geometry.square_size == 8  # == out_size: restore is a pure un-crop
    pred = np.zeros((2, 8, 8), np.uint8)
    pred[0, 2:6, :] = 1  # exactly the crop region (below the 2 padding rows)
    pred[1, 0, 0] = 1  # in the padding: dropped
    out = P.restore_prediction(pred, geometry)
    assert out.shape == (6, 10, 12)
    expected = np.zeros((6, 10, 12), np.uint8)
    expected[2, 3:7, 2:10] = 1
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="shape"):
        P.restore_prediction(np.zeros((3, 8, 8)), geometry)


def test_restore_prediction_inverts_mask_resize():
    rng = np.random.default_rng(6)
    images, masks = synthetic_volume(rng, 10, 96)
    pv = P.preprocess_volume(images, masks, size=128)  # upscaling: nearest round trip is exact
    back = P.restore_prediction(pv.mask, pv.geometry)
    assert back.shape == masks.shape
    z0, z1 = pv.geometry.z_range
    np.testing.assert_array_equal(back[z0:z1], (masks[z0:z1] > 0).astype(np.uint8))
    assert not back[:z0].any() and not back[z1:].any()
    # Probabilities with a channel axis keep dtype and channels.
    probs = np.stack([pv.mask, 1 - pv.mask], -1).astype(np.float32)
    assert P.restore_prediction(probs, pv.geometry).shape == masks.shape + (2,)


def test_bad_inputs():
    with pytest.raises(ValueError, match="none left"):
        P.preprocess_volume(np.ones((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        P.preprocess_volume(np.ones((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="all zeros"):
        P.preprocess_volume(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        P.preprocess_volume(np.ones((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 9), np.uint8))


def test_prepare_volume_raw_is_the_stored_slices_with_identity_geometry():
    rng = np.random.default_rng(7)
    images, masks = synthetic_volume(rng, 4, 24)
    images, masks = images[:, :, 2:22], masks[:, :, 2:22]  # non-square: 24 x 20
    pv = P.prepare_volume(images, masks, "raw")
    assert pv.image is images and set(np.unique(pv.mask).tolist()) <= {0, 1}
    np.testing.assert_array_equal(pv.mask, masks > 0)
    mean, std = P.channel_stats_uint8(images)
    np.testing.assert_array_equal(pv.channel_mean, mean.astype(np.float32))
    np.testing.assert_array_equal(pv.channel_std, std.astype(np.float32))
    assert pv.geometry == P.VolumeGeometry.identity(4, (24, 20))
    assert pv.geometry.z_range == (0, 4) and pv.geometry.padded_shape == (24, 20)
    # The inverse at the model's resolution is the nearest-neighbour resize to the slices' size.
    pred = rng.random((4, 16, 16)) > 0.5
    np.testing.assert_array_equal(
        P.restore_prediction(pred, pv.geometry), P.resize_masks(pred, (24, 20))
    )
    base = P.prepare_volume(images, masks, "baseline", size=32)
    ref = P.preprocess_volume(images, masks, size=32)
    np.testing.assert_array_equal(base.image, ref.image)
    assert base.geometry == ref.geometry
    with pytest.raises(ValueError, match="unknown mode"):
        P.prepare_volume(images, masks, "other")  # type: ignore[arg-type]
