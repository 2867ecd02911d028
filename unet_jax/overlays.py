"""Prediction overlays: outlines drawn on a gray slice, and animated GIFs of them.

Colours: prediction outline red, ground-truth outline green, both on the same pixel yellow, drawn
on the FLAIR channel (channel 1 of the stored image) because that is where the lesion shows.

Legend: an overlay image (:func:`overlay_rgb`) stays exactly the slice's size, pixel for pixel
over the slice and its mask (``unet_jax.predict`` promises that geometry), so it carries no
legend in its pixels; ``unet_jax.predict`` writes the legend once as ``legend.png``
(:func:`write_legend`) and each overlay PNG names the colours in its ``Description`` text chunk
(:data:`LEGEND_TEXT`). GIF frames (:func:`write_overlay_gif`), upscaled anyway, get the legend as
a strip of :data:`LEGEND_HEIGHT` pixels below the image (:func:`legend_strip`), where it hides
nothing of the brain.

Pure numpy and Pillow, no matplotlib: the run report and ``unet_jax.predict`` both draw with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = [
    "FLAIR_CHANNEL",
    "GREEN",
    "LEGEND",
    "LEGEND_HEIGHT",
    "LEGEND_TEXT",
    "RED",
    "YELLOW",
    "flair",
    "legend_strip",
    "outline",
    "overlay_rgb",
    "png_description",
    "select_slices",
    "write_legend",
    "write_overlay_gif",
    "write_volume_gif",
]

#: Channel of the stored (pre-contrast, FLAIR, post-contrast) image that shows the lesion.
FLAIR_CHANNEL = 1
RED = np.array([255, 0, 0], np.uint8)
GREEN = np.array([0, 255, 0], np.uint8)
YELLOW = np.array([255, 255, 0], np.uint8)

#: The legend's entries: (label, outline colour).
LEGEND = (("prediction", RED), ("ground truth", GREEN), ("both", YELLOW))
#: The legend in words (the overlay PNGs' ``Description``).
LEGEND_TEXT = (
    "FLAIR channel with outlines: prediction red, ground truth green, both on the same pixel yellow"
)
#: Height in pixels of :func:`legend_strip`.
LEGEND_HEIGHT = 16
_SWATCH = 10  # side of a colour square
_GAP = 3  # between a square and its label
_SPACE = 10  # between entries, and at the ends


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


def legend_strip(width: int = 0) -> np.ndarray:
    """The legend as an RGB uint8 strip of :data:`LEGEND_HEIGHT` rows: for each entry of
    :data:`LEGEND` a square of its colour and its label (white, Pillow's default font) on
    black, left-aligned; ``width`` columns, or as many as the entries need if that is more."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, entries = _SPACE // 2, []
    for label, colour in LEGEND:
        entries.append((x, label, tuple(int(c) for c in colour)))
        x += _SWATCH + _GAP + math.ceil(probe.textlength(label, font=font)) + _SPACE
    strip = Image.new("RGB", (max(int(width), x - _SPACE // 2), LEGEND_HEIGHT))
    draw = ImageDraw.Draw(strip)
    top = (LEGEND_HEIGHT - _SWATCH) // 2
    for x, label, colour in entries:
        draw.rectangle((x, top, x + _SWATCH - 1, top + _SWATCH - 1), fill=colour)
        draw.text((x + _SWATCH + _GAP, top - 2), label, fill=(255, 255, 255), font=font)
    return np.asarray(strip)


def write_legend(path: Path, scale: int = 2) -> None:
    """The legend (:func:`legend_strip`, upscaled ``scale`` times) as a PNG, whose
    ``Description`` says it in words (:data:`LEGEND_TEXT`)."""
    strip = Image.fromarray(legend_strip())
    strip = strip.resize((strip.width * scale, strip.height * scale), Image.Resampling.NEAREST)
    strip.save(path, pnginfo=png_description())


def png_description():
    """PNG text chunks naming the overlay colours (``Description``: :data:`LEGEND_TEXT`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", LEGEND_TEXT)
    return info


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
    legend: bool = True,
) -> int:
    """Animated GIF through one volume (its ``rows``), one overlay per slice, slice number
    printed in the corner; upscaled (nearest) to at least ``min_size`` pixels, with the legend
    below (see :func:`write_overlay_gif`). Returns frames.
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
        legend=legend,
    )


def write_overlay_gif(
    overlays: Sequence[np.ndarray],
    slice_numbers: Sequence[int],
    path: Path,
    *,
    min_size: int = 256,
    frame_ms: int = 200,
    legend: bool = True,
) -> int:
    """Animated GIF of ready-made RGB overlays, each labelled ``slice <number>`` in the corner;
    upscaled (nearest) to at least ``min_size`` pixels. With ``legend``, each frame has the
    legend strip (:func:`legend_strip`) below the image, the image at the top left of a frame
    as wide as the wider of the two. Returns the number of frames."""
    frames = []
    strips: dict[int, Image.Image] = {}
    for rgb, number in zip(overlays, slice_numbers, strict=True):
        scale = max(1, math.ceil(min_size / max(rgb.shape[:2])))
        frame = Image.fromarray(rgb).resize(
            (rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST
        )
        # The label also keeps consecutive frames distinct: Pillow merges identical ones.
        ImageDraw.Draw(frame).text((4, 4), f"slice {number}", fill=(255, 255, 255))
        if legend:
            if frame.width not in strips:
                strips[frame.width] = Image.fromarray(legend_strip(frame.width))
            strip = strips[frame.width]
            framed = Image.new("RGB", (strip.width, frame.height + strip.height))
            framed.paste(frame, (0, 0))
            framed.paste(strip, (0, frame.height))
            frame = framed
        frames.append(frame)
    if not frames:
        raise ValueError("no slices for the GIF")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return len(frames)
