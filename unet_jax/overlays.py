"""Prediction overlays: outlines drawn on a gray slice, and animated GIFs of them.

Colours: prediction outline red, ground-truth outline green, both on the same pixel yellow, drawn
on the FLAIR channel (channel 1 of the stored image) because that is where the lesion shows.

Pure numpy and Pillow, no matplotlib: the run report and ``unet_jax.predict`` both draw with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "FLAIR_CHANNEL",
    "GREEN",
    "RED",
    "YELLOW",
    "flair",
    "outline",
    "overlay_rgb",
    "select_slices",
    "write_overlay_gif",
    "write_volume_gif",
]

#: Channel of the stored (pre-contrast, FLAIR, post-contrast) image that shows the lesion.
FLAIR_CHANNEL = 1
RED = np.array([255, 0, 0], np.uint8)
GREEN = np.array([0, 255, 0], np.uint8)
YELLOW = np.array([255, 255, 0], np.uint8)


def select_slices(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` slice positions of a volume with the largest lesion-or-prediction area.

    Slices with neither lesion nor prediction are taken only when no slice has any (then the
    middle ``k`` slices). Returned in ascending slice order.
    """
    truth = np.asarray(truth, bool)
    pred = np.asarray(pred, bool)
    n = truth.shape[0]
    k = max(0, min(int(k), n))
    area = (truth | pred).reshape(n, -1).sum(axis=1)
    if k == 0:
        return np.zeros(0, int)
    if not area.any():
        start = (n - k) // 2
        return np.arange(start, start + k)
    order = np.lexsort((np.arange(n), -area))  # largest area first, ties by position
    chosen = [i for i in order[:k] if area[i] > 0]
    return np.sort(np.asarray(chosen, int))


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D binary mask: mask pixels with a 4-neighbour outside the mask.

    Pixels on the image border count as boundary (outside the image is background).
    """
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _gray(image: np.ndarray) -> np.ndarray:
    """A 2D array as uint8 gray levels (uint8 kept as is, other dtypes min-max scaled)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = image.astype(float)
    lo, hi = float(np.min(image)), float(np.max(image))
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)


def overlay_rgb(gray: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8 of a gray slice with the truth outline green, prediction red, both yellow."""
    base = _gray(gray)
    rgb = np.repeat(base[..., None], 3, axis=-1)
    t, p = outline(truth), outline(pred)
    rgb[t & ~p] = GREEN
    rgb[p & ~t] = RED
    rgb[p & t] = YELLOW
    return rgb


def flair(image: np.ndarray) -> np.ndarray:
    """The FLAIR channel of a stored (H, W, 3) slice; a 2D slice is returned as is."""
    return image[..., FLAIR_CHANNEL] if image.ndim == 3 else image


def write_volume_gif(
    predictions: Mapping[str, np.ndarray],
    rows: np.ndarray,
    path: Path,
    *,
    min_size: int = 256,
    frame_ms: int = 200,
) -> int:
    """Animated GIF through one volume (its ``rows``), one overlay per slice, slice number
    printed in the corner; upscaled (nearest) to at least ``min_size`` pixels. Returns frames.
    """
    overlays = [
        overlay_rgb(
            flair(predictions["image"][row]),
            predictions["truth"][row],
            predictions["pred"][row],
        )
        for row in rows
    ]
    return write_overlay_gif(
        overlays,
        [int(predictions["slice_index"][r]) for r in rows],
        path,
        min_size=min_size,
        frame_ms=frame_ms,
    )


def write_overlay_gif(
    overlays: Sequence[np.ndarray],
    slice_numbers: Sequence[int],
    path: Path,
    *,
    min_size: int = 256,
    frame_ms: int = 200,
) -> int:
    """Animated GIF of ready-made RGB overlays, each labelled ``slice <number>`` in the corner;
    upscaled (nearest) to at least ``min_size`` pixels. Returns the number of frames."""
    frames = []
    for rgb, number in zip(overlays, slice_numbers, strict=True):
        scale = max(1, math.ceil(min_size / max(rgb.shape[:2])))
        frame = Image.fromarray(rgb).resize(
            (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST
        )
        # The label also keeps consecutive frames distinct: Pillow merges identical ones.
        ImageDraw.Draw(frame).text((4, 4), f"slice {number}", fill=(255, 255, 255))
        frames.append(frame)
    if not frames:
        raise ValueError("no slices for the GIF")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return len(frames)
