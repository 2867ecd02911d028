"""Independent reference implementations shared by the tests (NumPy, SciPy, scikit-image, Pillow).

- ``read_image`` / ``read_volume``: a slice file, or a patient folder of numbered slices with
  their masks (``NAME_<k>.<ext>`` beside ``NAME_<k>_mask.<ext>``), read with Pillow.
- ``skimage_baseline``: the baseline's preprocessing of one volume written out with scikit-image
  (3D resize, as the baseline calls it).
- ``np_dsc``: Dice similarity coefficient, 1 when both masks are empty.
- ``largest_component``: largest 3D face-connected component, the lowest label on ties.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.exposure import rescale_intensity
from skimage.transform import resize


def read_image(path: Path) -> np.ndarray:
    """One image file as an array (the file is closed afterwards)."""
    with Image.open(path) as im:
        return np.asarray(im)


def read_volume(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) of a patient folder: ``<folder name>_<k>.<ext>`` stacked in numeric order
    of k, each with its mask ``<folder name>_<k>_mask.<ext>`` (any image extension)."""
    name = folder.name
    numbered = [
        p for p in folder.glob(f"{name}_*") if p.stem[len(name) + 1 :].isdigit()
    ]  # not the masks ("<k>_mask")
    numbered.sort(key=lambda p: int(p.stem[len(name) + 1 :]))
    images = np.stack([read_image(p) for p in numbered])
    masks = np.stack([read_image(p.with_name(f"{p.stem}_mask{p.suffix}")) for p in numbered])
    return images, masks


def skimage_baseline(images: np.ndarray, masks: np.ndarray, size: int = 256):
    """The baseline's preprocessing of one volume, with scikit-image (3D resize, as it calls it).

    Returns (r, mask, z_range, crop_box): r float64 (Z, size, size, 3) in [0, 1] before the
    per-channel standardisation; mask uint8 {0, 1}; z_range the kept slices [start, stop) as
    0-based indices into the input (its first kept slice's 1-based number is start + 1);
    crop_box (y0, y1, x0, x1) in the input's pixels.
    """
    v = images[1:-1].copy()
    m = masks[1:-1]
    v[v < v.max() * 0.1] = 0
    zs = np.nonzero(v.max(axis=(1, 2, 3)))[0]
    ys = np.nonzero(v.max(axis=(0, 2, 3)))[0]
    xs = np.nonzero(v.max(axis=(0, 1, 3)))[0]
    box = np.s_[zs[0] : zs[-1] + 1, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    v, m = v[box], m[box]
    a, b = v.shape[1], v.shape[2]
    if a != b:
        d = (max(a, b) - min(a, b)) / 2.0
        pad = (int(np.floor(d)), int(np.ceil(d)))
        padding = ((0, 0), (0, 0), pad) if a > b else ((0, 0), pad, (0, 0))
        m = np.pad(m, padding, mode="constant", constant_values=0)
        v = np.pad(v, padding + ((0, 0),), mode="constant", constant_values=0)
    m = resize(m, (m.shape[0], size, size), order=0, mode="constant", cval=0, anti_aliasing=False)
    v = resize(
        v, (v.shape[0], size, size, 3), order=2, mode="constant", cval=0, anti_aliasing=False
    )
    p10, p99 = np.percentile(v, 10), np.percentile(v, 99)
    r = rescale_intensity(v, in_range=(p10, p99))
    z_range = (int(zs[0]) + 1, int(zs[-1]) + 2)  # +1: the dropped first slice
    crop_box = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
    return r, (m > 0).astype(np.uint8), z_range, crop_box


def np_dsc(a: np.ndarray, b: np.ndarray) -> float:
    """DSC of two masks (nonzero = lesion): 2|A&B| / (|A|+|B|), 1 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def largest_component(volume: np.ndarray) -> np.ndarray:
    """The largest 3D face-connected component of a mask as bool (the lowest label on ties; an
    empty mask stays empty)."""
    labels, n = ndimage.label(volume)
    if n == 0:
        return volume.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
