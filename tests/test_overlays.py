"""Tests of unet_jax.overlays: outlines, their colours and the slices chosen to show."""

from __future__ import annotations

import numpy as np

from _fake_run import SIZE, disc
from unet_jax import overlays


def _reference_outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def test_overlay_rgb_colours_exactly_the_outlines():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 200, (SIZE, SIZE)).astype(np.uint8)
    truth = disc(30, 30, 10) | disc(0, 0, 5)  # one touching the border
    pred = np.roll(disc(30, 30, 10), 3, axis=1)
    rgb = overlays.overlay_rgb(gray, truth, pred)
    t, p = _reference_outline(truth), _reference_outline(pred)
    assert np.array_equal(overlays.outline(truth), t)
    assert (rgb[t & ~p] == (0, 255, 0)).all()
    assert (rgb[p & ~t] == (255, 0, 0)).all()
    assert (rgb[p & t] == (255, 255, 0)).all()
    rest = ~(t | p)
    assert (rgb[rest] == gray[rest][:, None]).all()


def test_select_slices_prefers_largest_lesion_or_prediction():
    truth = np.zeros((6, 8, 8), bool)
    pred = np.zeros((6, 8, 8), bool)
    truth[1, :2, :2] = True  # area 4
    truth[3, :3, :3] = True  # area 9
    pred[5, :, :] = True  # area 64
    np.testing.assert_array_equal(overlays.select_slices(truth, pred, 2), [3, 5])
    np.testing.assert_array_equal(
        overlays.select_slices(truth, pred, 5), [1, 3, 5]
    )  # only non-empty
    empty = np.zeros((6, 8, 8), bool)
    np.testing.assert_array_equal(overlays.select_slices(empty, empty, 2), [2, 3])
