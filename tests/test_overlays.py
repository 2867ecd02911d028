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


def test_legend_strip_shows_each_colour_left_to_right():
    strip = overlays.legend_strip()
    assert strip.dtype == np.uint8 and strip.shape[0] == overlays.LEGEND_HEIGHT
    lefts = []
    for label, colour in overlays.LEGEND:
        ys, xs = np.nonzero((strip == colour).all(axis=-1))
        assert ys.size == 100 and xs.max() - xs.min() == 9, label  # a 10x10 square
        lefts.append(xs.min())
    assert lefts == sorted(lefts) and [n for n, _ in overlays.LEGEND] == [
        "prediction",
        "ground truth",
        "both",
    ]
    gray = (strip == strip[..., :1]).all(axis=-1) & (strip[..., 0] > 100)
    assert gray.sum() > 50  # the labels, white (antialiased)
    # Padded with black to a wider width; never narrower than its entries.
    wide = overlays.legend_strip(strip.shape[1] + 40)
    np.testing.assert_array_equal(wide[:, : strip.shape[1]], strip)
    assert wide.shape[1] == strip.shape[1] + 40 and not wide[:, strip.shape[1] :].any()
    np.testing.assert_array_equal(overlays.legend_strip(20), strip)


def test_gif_frames_have_the_legend_below_the_image(tmp_path):
    from PIL import Image

    # A slice of 40x30 (upscaled 7 times to 280x210) and a narrow one of 256x64 (not upscaled,
    # narrower than the legend: the frame is the legend's width, the image at its left).
    for (h, w), size in [((40, 30), (210, 280)), ((256, 64), (None, 256))]:
        gray = np.full((h, w), 90, np.uint8)
        truth, pred = np.zeros((h, w), bool), np.zeros((h, w), bool)
        truth[5:15, 5:15], pred[8:18, 8:18] = True, True
        rgb = overlays.overlay_rgb(gray, truth, pred)
        strip = overlays.legend_strip(size[0] or w)
        fw = strip.shape[1]
        path = tmp_path / f"{h}x{w}.gif"
        assert overlays.write_overlay_gif([rgb, rgb], [3, 4], path) == 2
        with Image.open(path) as gif:
            assert gif.size == (fw, size[1] + overlays.LEGEND_HEIGHT) and gif.n_frames == 2
            for k in range(2):
                gif.seek(k)
                frame = np.asarray(gif.convert("RGB"))
                # Few colours: the GIF palette holds them exactly.
                np.testing.assert_array_equal(frame[size[1] :], strip)
                scale = size[1] // h
                image = frame[: size[1], : w * scale]
                up = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
                below_label = slice(20, None)  # rows under the "slice N" label
                np.testing.assert_array_equal(image[below_label], up[below_label])
                assert not frame[: size[1], w * scale :].any()  # black right of the image
        overlays.write_overlay_gif([rgb], [3], path, legend=False)
        with Image.open(path) as gif:
            assert gif.size == (w * (size[1] // h), size[1])
