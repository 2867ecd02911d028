"""A volume as the model's data set stores it, and a prediction mapped back onto its slices.

The one entry point is :func:`prepare_volume`, for both data-set configs; its inverse is
:func:`restore_prediction`. The builder and ``unet_jax.predict`` both go through them, so the
stored form and the way back agree by construction (as nnU-Net's preprocessor and export).

- ``raw``: the slices as stored (uint8), each volume standardised by its own channel mean and
  std of ``image / 255`` (:func:`channel_stats_uint8`); the geometry is the identity.
- ``baseline``: the baseline's per-volume preprocessing (brain-segmentation-pytorch), below.

Per patient volume of slices (images ``(N, H, W, 3)`` uint8, masks ``(N, H, W)`` uint8 0/255), the
baseline does, in this order:

1. drop the first and the last slice;
2. threshold: set every value below 10 % of the volume's maximum to 0 (kept in the output);
3. crop to the smallest z/y/x box holding a non-zero value (of any channel) after the threshold;
4. pad the shorter in-plane axis with zeros to a square (``floor(d/2)`` before, ``ceil(d/2)``
   after);
5. resize each slice to ``size x size`` like ``skimage.transform.resize(..., mode="constant",
   cval=0, anti_aliasing=False)``: an order-2 spline for the images (converted to float in
   [0, 1] first, output clipped to the input's range), nearest neighbour (order 0) for the masks;
6. rescale intensities: ``clip((v - p10) / (p99 - p10), 0, 1)`` with the 10th and 99th percentiles
   of the whole volume (``skimage.exposure.rescale_intensity(v, in_range=(p10, p99))``);
7. standardise each channel by the volume's mean and standard deviation.

How it is computed here, and why it is the same: skimage resizes the 4D volume with
``scipy.ndimage.zoom(order=2, mode="grid-constant", grid_mode=True)`` and scale 1 along z and the
channels. A spline interpolation is a tensor product of 1D operators and, with ``cval=0``, linear;
along an axis of scale 1 it is the identity. So the resize equals two matrix products per slice
and channel, ``M_y @ slice @ M_x.T``, whose ``(size, n)`` matrices are the 1D zoom of the identity
(:func:`zoom_matrix`). That matches skimage's result up to float rounding (about 1e-15) and is
tens of times faster than the 3D zoom the baseline runs.

Storage: :func:`preprocess_volume` returns the rescaled intensities ``r`` of step 6 quantised to
uint8 (``rint(255 * r)``) plus the per-channel mean and std of the *unquantised* ``r`` (float32),
so that ``(image / 255 - mean) / std`` reproduces step 7 up to the quantisation error
(at most ``0.5 / 255 / std`` in standardised units; see the data set's README for measurements).

:class:`VolumeGeometry` records what was kept (z range, crop box, padding, output size), and
:func:`restore_prediction` maps a prediction, at the stored size or the model's, back onto the
original slices (nearest neighbour; :func:`resize_masks` is its in-plane building block).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from unet_jax.lgg import SLICE_SIZE

# fmt: off
__all__ = [
    "MODES", "THRESHOLD_FRACTION", "VolumeGeometry", "PreprocessedVolume", "threshold_volume",
    "crop_bounds", "square_padding", "zoom_matrix", "nearest_indices", "resize_volume",
    "resize_masks", "rescale_percentiles", "channel_stats", "channel_stats_uint8",
    "baseline_geometry", "preprocess_volume_float", "preprocess_volume", "preprocess_images",
    "standardise", "prepare_volume", "resize_probabilities", "restore_prediction",
]
# fmt: on

#: The data-set configs (``Config.dataset_config``): how a volume is stored for the model.
MODES = ("baseline", "raw")
Mode = Literal["baseline", "raw"]

#: Values below this fraction of the volume's maximum are set to 0 (step 2).
THRESHOLD_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
    """Where the preprocessed slices come from in the original volume.

    Attributes:
      num_slices: number of slices of the original volume (before dropping the ends).
      in_shape: ``(H, W)`` of the original slices.
      z_range: ``(z0, z1)``: the preprocessed slices are original slices ``z0 .. z1 - 1``
        (0-based indices into the original, sorted volume; slice number ``z + 1``).
      crop_box: ``(y0, y1, x0, x1)``, half-open, in original pixel coordinates.
      padding: ``(top, bottom, left, right)`` zero rows/columns added to the crop to make it square.
      out_size: side the (square, padded) crop was resized to; ``None`` when the slices are
        stored in their own size (``raw``: the identity geometry).
    """

    num_slices: int
    in_shape: tuple[int, int]
    z_range: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    padding: tuple[int, int, int, int]
    out_size: int | None

    @classmethod
    def identity(cls, num_slices: int, in_shape: tuple[int, int]) -> VolumeGeometry:
        """Every slice kept whole and not resized (the ``raw`` config)."""
        h, w = in_shape
        return cls(num_slices, (h, w), (0, num_slices), (0, h, 0, w), (0, 0, 0, 0), None)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the padded crop: the field of view of a stored slice."""
        y0, y1, x0, x1 = self.crop_box
        top, bottom, left, right = self.padding
        return y1 - y0 + top + bottom, x1 - x0 + left + right

    @property
    def square_size(self) -> int:
        """Side of the padded square crop (before resizing to ``out_size``)."""
        return self.padded_shape[0]

    @property
    def num_kept(self) -> int:
        """Number of preprocessed slices."""
        return self.z_range[1] - self.z_range[0]


@dataclasses.dataclass(frozen=True)
class PreprocessedVolume:
    """A volume in the stored form (see :func:`prepare_volume`).

    Attributes:
      image: ``(Z, S, S, 3)`` uint8; ``baseline``: ``rint(255 * r)`` with ``r`` in [0, 1] the
        rescaled intensity; ``raw``: the slices as given, ``(Z, H, W, 3)``.
      mask: ``(Z, S, S)`` (``raw``: ``(Z, H, W)``) uint8 in {0, 1}, or ``None`` when no masks
        were given.
      channel_mean: ``(3,)`` float32, per-channel mean over the volume of the unquantised ``r``
        (``raw``: of ``image / 255``).
      channel_std: ``(3,)`` float32, the same for the standard deviation.
      geometry: where the slices come from.
    """

    image: np.ndarray
    mask: np.ndarray | None
    channel_mean: np.ndarray
    channel_std: np.ndarray
    geometry: VolumeGeometry


def threshold_volume(volume: np.ndarray, fraction: float = THRESHOLD_FRACTION) -> np.ndarray:
    """Return a copy of ``volume`` with values below ``fraction * volume.max()`` set to 0."""
    out = np.array(volume, copy=True)
    out[out < out.max() * fraction] = 0
    return out


def crop_bounds(volume: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Smallest box ``(z0, z1, y0, y1, x0, x1)`` (half-open) holding the non-zero values.

    Args:
      volume: ``(Z, H, W)`` or ``(Z, H, W, C)``; a voxel counts when any channel is non-zero.

    Raises:
      ValueError: when the volume is all zeros.
    """
    nonzero = volume != 0
    if nonzero.ndim == 4:
        nonzero = nonzero.any(axis=3)
    bounds = []
    for axis in range(3):
        hits = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            raise ValueError("the volume is all zeros after the threshold: nothing to crop to")
        bounds += [int(hits[0]), int(hits[-1]) + 1]
    return tuple(bounds)  # type: ignore[return-value]


def square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding that makes a ``height x width`` image square.

    The shorter axis gets ``floor(d / 2)`` before and ``ceil(d / 2)`` after, ``d`` the difference.
    """
    diff = abs(height - width)
    before, after = diff // 2, diff - diff // 2
    if height > width:
        return (0, 0, before, after)
    if width > height:
        return (before, after, 0, 0)
    return (0, 0, 0, 0)


@functools.lru_cache(maxsize=64)
def _zoom_matrix_cached(n_in: int, n_out: int, order: int) -> np.ndarray:
    # Zooming the rows of the identity gives the impulse responses: row i of the result is
    # the output for input e_i, i.e. column i of the operator.
    eye = np.eye(n_in, dtype=np.float64)
    zoomed = ndimage.zoom(
        eye, (1.0, n_out / n_in), order=order, mode="grid-constant", cval=0.0, grid_mode=True
    )
    out = np.ascontiguousarray(zoomed.T)
    out.setflags(write=False)
    return out


def zoom_matrix(n_in: int, n_out: int, order: int = 2) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of ``scipy.ndimage.zoom`` along one axis.

    Uses the settings of ``skimage.transform.resize(mode="constant", cval=0)``: ``grid_mode=True``,
    ``mode="grid-constant"``, ``cval=0`` (so the operator is linear). Read-only, cached.
    """
    return _zoom_matrix_cached(int(n_in), int(n_out), int(order))


@functools.lru_cache(maxsize=64)
def _nearest_indices_cached(n_in: int, n_out: int) -> np.ndarray:
    # Order-0 zoom of 1..n_in gives, for each output sample, 1 + the source index that
    # ndimage picks (0 where it falls outside): ndimage's own rounding, exactly.
    src = ndimage.zoom(
        np.arange(1, n_in + 1, dtype=np.float64),
        n_out / n_in,
        order=0,
        mode="grid-constant",
        cval=0.0,
        grid_mode=True,
    )
    out = np.rint(src).astype(np.int64) - 1
    out.setflags(write=False)
    return out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` samples in a nearest-neighbour resize from ``n_in``.

    Matches ``scipy.ndimage.zoom(order=0, grid_mode=True, mode="grid-constant")`` (and so
    ``skimage.transform.resize(order=0, mode="constant")``); ``-1`` marks a sample that falls
    outside the input (filled with 0). Read-only, cached.
    """
    return _nearest_indices_cached(int(n_in), int(n_out))


_UINT8_TO_FLOAT = np.arange(256, dtype=np.float64) * (1.0 / 255)  # skimage's img_as_float


def _resize_channels_first(volume: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize_volume` with a ``(Z, C, size, size)`` result (cheaper: no float transpose)."""
    z, h, w, c = volume.shape
    # (Z, C, H, W) planes so that both products are plain batched matmuls on contiguous memory.
    if volume.dtype == np.uint8:
        # skimage converts with x * (1 / 255) (not x / 255): the same floats, by table look-up.
        planes = _UINT8_TO_FLOAT[np.ascontiguousarray(volume.transpose(0, 3, 1, 2))]
        lo, hi = _UINT8_TO_FLOAT[volume.min()], _UINT8_TO_FLOAT[volume.max()]
    else:
        planes = np.ascontiguousarray(volume.transpose(0, 3, 1, 2), dtype=np.float64)
        lo, hi = float(planes.min()), float(planes.max())
    if h == w == size:
        # Scale 1: the zoom is the identity (zoom_matrix is exactly the identity matrix; common
        # for crops whose long side spans the whole slice): skip the products.
        out = planes
    else:
        m_y, m_x = zoom_matrix(h, size), zoom_matrix(w, size)
        out = np.matmul(np.matmul(m_y, planes.reshape(z * c, h, w)), m_x.T)
        out = out.reshape(z, c, size, size)
    if not lo <= 0.0 <= hi and out.min() <= 0.0 <= out.max():
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # skimage keeps cval in range when it was used
    np.clip(out, lo, hi, out=out)
    return out


def resize_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """Order-2 spline resize of every slice to ``size x size``, as skimage resizes the volume.

    Args:
      volume: ``(Z, H, W, C)`` uint8 (converted to float in [0, 1] as skimage does) or float.
      size: output side.

    Returns:
      ``(Z, size, size, C)`` float64, clipped to the input's value range like skimage's
      ``clip=True`` (widened to include ``cval=0`` when the output reaches it).
    """
    return np.ascontiguousarray(_resize_channels_first(volume, size).transpose(0, 2, 3, 1))


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(Z, H, W)`` masks to ``(Z, size, size)``, or to
    ``(Z, height, width)`` for ``size=(height, width)`` (dtype kept)."""
    out_h, out_w = (size, size) if np.ndim(size) == 0 else size
    _, h, w = masks.shape
    iy, ix = nearest_indices(h, out_h), nearest_indices(w, out_w)
    out = masks[:, np.clip(iy, 0, None)][:, :, np.clip(ix, 0, None)]
    if (iy < 0).any() or (ix < 0).any():
        out[:, iy < 0] = 0
        out[:, :, ix < 0] = 0
    return out


def resize_probabilities(probs: Any, size: int | tuple[int, int]) -> Any:
    """Bilinear resize of ``(Z, h, w[, K])`` probabilities (or logits) to ``(Z, size, size[,
    K])``, or to ``(Z, height, width[, K])`` for ``size=(height, width)``: how a prediction at
    the model's size is brought to the stored (or original) size before it is thresholded,
    instead of repeating binary pixels. Antialiased when it shrinks (as the images are);
    half-pixel centres (``jax.image.resize``). Pure jax: runs inside ``jit`` and on host arrays.
    """
    import jax  # here, not at the top: the data-set builder's workers never need it
    import jax.numpy as jnp

    out_h, out_w = (size, size) if np.ndim(size) == 0 else size
    probs = jnp.asarray(probs, jnp.float32)
    if probs.shape[1:3] == (out_h, out_w):
        return probs
    shape = (probs.shape[0], out_h, out_w, *probs.shape[3:])
    return jax.image.resize(probs, shape, "linear", antialias=True)


def rescale_percentiles(
    volume: np.ndarray, low: float = 10.0, high: float = 99.0, *, inplace: bool = False
) -> np.ndarray:
    """``skimage.exposure.rescale_intensity(volume, in_range=(p_low, p_high))`` for volume >= 0.

    The percentiles are taken over the whole volume (all channels). Returns float64 in [0, 1];
    with ``inplace=True`` it overwrites ``volume`` (float64) instead of allocating a copy.
    """
    p_lo, p_hi = np.percentile(volume, [low, high])
    out = volume if inplace else np.empty(volume.shape, np.float64)
    np.clip(volume, p_lo, p_hi, out=out)
    if p_hi != p_lo:
        out -= p_lo
        out /= p_hi - p_lo
    else:
        # skimage's degenerate case: nothing to stretch, clip to the output range.
        np.clip(out, 0.0, 1.0, out=out)
    return out


def channel_stats(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std over all other axes, in float64."""
    axes = tuple(range(volume.ndim - 1))
    return volume.mean(axis=axes), volume.std(axis=axes)


def channel_stats_uint8(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``images / 255`` over a uint8 volume ``(..., C)``, in float64,
    from exact histograms of the values (the ``raw`` config's per-volume statistics)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(images.shape[-1]), np.empty(images.shape[-1])
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean[c] = counts @ values / n
        std[c] = np.sqrt(counts @ (values - mean[c]) ** 2 / n)
    return mean, std


def _channel_stats_channels_first(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``(Z, C, H, W)``, two-pass like ``np.std``, in float64."""
    z, c = r.shape[:2]
    mean, std = np.empty(c), np.empty(c)
    for k in range(c):
        x = r[:, k].reshape(z, -1)
        mean[k] = x.mean()
        d = x - mean[k]
        std[k] = np.sqrt(np.einsum("ij,ij->", d, d) / d.size)
    return mean, std


def baseline_geometry(
    images: np.ndarray, *, size: int = SLICE_SIZE, drop_ends: bool = True
) -> VolumeGeometry:
    """The geometry the baseline's preprocessing keeps for ``images`` (``(N, H, W, 3)`` uint8)."""
    return _geometry(images, size=size, drop_ends=drop_ends)[0]


def _geometry(
    images: np.ndarray, *, size: int, drop_ends: bool
) -> tuple[VolumeGeometry, np.ndarray]:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    n, h, w, _ = images.shape
    start = 1 if drop_ends else 0
    if n - 2 * start < 1:
        raise ValueError(f"a volume of {n} slices has none left after dropping the first and last")
    thresholded = threshold_volume(images[start : n - start])
    z0, z1, y0, y1, x0, x1 = crop_bounds(thresholded)
    geometry = VolumeGeometry(
        num_slices=n,
        in_shape=(h, w),
        z_range=(start + z0, start + z1),
        crop_box=(y0, y1, x0, x1),
        padding=square_padding(y1 - y0, x1 - x0),
        out_size=size,
    )
    return geometry, thresholded[z0:z1, y0:y1, x0:x1]


def _pad(volume: np.ndarray, padding: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = padding
    if not any(padding):
        return volume
    widths = [(0, 0), (top, bottom), (left, right)] + [(0, 0)] * (volume.ndim - 3)
    return np.pad(volume, widths, mode="constant", constant_values=0)


def _preprocess_channels_first(
    images: np.ndarray, masks: np.ndarray | None, size: int, drop_ends: bool
) -> tuple[np.ndarray, np.ndarray | None, VolumeGeometry]:
    """Steps 1-6 with ``r`` as ``(Z, 3, size, size)`` (all later steps are layout-free)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    geometry, cropped = _geometry(images, size=size, drop_ends=drop_ends)
    r = rescale_percentiles(
        _resize_channels_first(_pad(cropped, geometry.padding), size), inplace=True
    )
    mask_out = None
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
        (z0, z1), (y0, y1, x0, x1) = geometry.z_range, geometry.crop_box
        m = _pad(masks[z0:z1, y0:y1, x0:x1], geometry.padding)
        mask_out = (resize_masks(m, size) > 0).astype(np.uint8)
    return r, mask_out, geometry


def preprocess_volume_float(
    images: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    size: int = SLICE_SIZE,
    drop_ends: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, VolumeGeometry]:
    """Steps 1-6 in float64: the baseline's rescaled intensities before standardisation.

    Args:
      images: ``(N, H, W, 3)`` uint8, slices sorted by slice number.
      masks: ``(N, H, W)`` uint8 (0/255 or 0/1) or ``None``.
      size: output side.
      drop_ends: drop the first and last slice (the baseline does).

    Returns:
      ``(r, mask, geometry)``: ``r`` ``(Z, size, size, 3)`` float64 in [0, 1]; ``mask``
      ``(Z, size, size)`` uint8 in {0, 1} or ``None``.
    """
    r, mask, geometry = _preprocess_channels_first(images, masks, size, drop_ends)
    return np.ascontiguousarray(r.transpose(0, 2, 3, 1)), mask, geometry


def preprocess_volume(
    images: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    size: int = SLICE_SIZE,
    drop_ends: bool = True,
) -> PreprocessedVolume:
    """The baseline's preprocessing of one volume, in the stored form (see the module docstring).

    Args:
      images: ``(N, H, W, 3)`` uint8, slices sorted by slice number.
      masks: ``(N, H, W)`` uint8 (0/255 or 0/1), or ``None`` (inference).
      size: output side (the baseline's is :data:`unet_jax.lgg.SLICE_SIZE`).
      drop_ends: drop the first and last slice (the baseline does).

    Returns:
      A :class:`PreprocessedVolume`; standardise with :func:`standardise`.

    Raises:
      ValueError: on wrong shapes or dtypes, fewer than 3 slices (with ``drop_ends``), or a volume
        that is all zeros after the threshold.
    """
    r, mask, geometry = _preprocess_channels_first(images, masks, size, drop_ends)
    mean, std = _channel_stats_channels_first(r)
    # Quantise in place, then transpose the uint8 result (8x less memory than the floats).
    r *= 255.0
    np.rint(r, out=r)
    image = np.ascontiguousarray(r.astype(np.uint8).transpose(0, 2, 3, 1))
    return PreprocessedVolume(
        image=image,
        mask=mask,
        channel_mean=mean.astype(np.float32),
        channel_std=std.astype(np.float32),
        geometry=geometry,
    )


def preprocess_images(
    images: np.ndarray, *, size: int = SLICE_SIZE, drop_ends: bool = True
) -> PreprocessedVolume:
    """Preprocess a volume given only its images (inference); ``mask`` of the result is None."""
    return preprocess_volume(images, None, size=size, drop_ends=drop_ends)


def standardise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The network input: ``(image / 255 - mean) / std`` per channel, in float32.

    Args:
      image: ``(..., 3)`` uint8 as stored.
      mean, std: ``(3,)`` per-channel statistics of the volume the image belongs to.
    """
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def prepare_volume(
    images: np.ndarray,
    masks: np.ndarray | None = None,
    mode: Mode = "baseline",
    *,
    size: int = SLICE_SIZE,
    drop_ends: bool = True,
) -> PreprocessedVolume:
    """A volume as the model's data set stores it, for either data-set config.

    Args:
      images: ``(N, H, W, 3)`` uint8, slices sorted by slice number.
      masks: ``(N, H, W)`` uint8 (0/255 or 0/1, any non-zero value is lesion), or ``None``.
      mode: ``"baseline"`` (:func:`preprocess_volume`) or ``"raw"`` (the slices as given, the
        volume's channel statistics of ``image / 255``, the identity geometry).
      size: ``baseline``: output side.
      drop_ends: ``baseline``: drop the first and last slice (the baseline does).

    Raises:
      ValueError: for an unknown mode, and as :func:`preprocess_volume`.
    """
    if mode == "baseline":
        return preprocess_volume(images, masks, size=size, drop_ends=drop_ends)
    if mode != "raw":
        raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}"
        )
    mask = None
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
        mask = (masks > 0).astype(np.uint8)
    mean, std = channel_stats_uint8(images)
    return PreprocessedVolume(
        image=images,
        mask=mask,
        channel_mean=mean.astype(np.float32),
        channel_std=std.astype(np.float32),
        geometry=VolumeGeometry.identity(images.shape[0], images.shape[1:3]),
    )


def restore_prediction(
    prediction: np.ndarray,
    geometry: VolumeGeometry,
    method: Literal["nearest", "linear"] = "nearest",
) -> np.ndarray:
    """Map a prediction on the stored slices back onto the original volume (the inverse of
    :func:`prepare_volume`'s geometry).

    Each predicted slice covers a stored slice's field of view (the padded crop), at the stored
    size or at the model's (the model sees the stored slices resized): it is resized to the
    padded crop, the padding is removed, and the result is placed in the crop box; pixels
    outside the crop box and slices outside ``z_range`` (the dropped ends, empty slices) are 0.
    ``method="linear"`` resizes probabilities bilinearly (:func:`resize_probabilities`; the
    caller thresholds the result: what ``unet_jax.predict`` does); ``"nearest"`` repeats pixels
    (the order-0 rule of the mask resize, as :func:`resize_masks`; for binary masks).

    Args:
      prediction: ``(Z, h, w)`` or ``(Z, h, w, K)`` (any dtype for ``nearest``, e.g. a binary
        mask; probabilities for ``linear``), ``Z == geometry.num_kept``.
      geometry: from :func:`prepare_volume` (or :func:`baseline_geometry`).

    Returns:
      ``(num_slices, H, W[, K])``: the dtype of ``prediction`` (``nearest``) or float32.
    """
    prediction = np.asarray(prediction)
    if prediction.ndim < 3 or prediction.shape[0] != geometry.num_kept:
        raise ValueError(
            f"prediction has shape {prediction.shape}, expected ({geometry.num_kept}, h, w)[+(K,)]"
        )
    side_y, side_x = geometry.padded_shape
    top, bottom, left, right = geometry.padding
    y0, y1, x0, x1 = geometry.crop_box
    h, w = geometry.in_shape
    z0, z1 = geometry.z_range
    if method == "linear":
        full = np.asarray(resize_probabilities(prediction, (side_y, side_x)))
        out = np.zeros((geometry.num_slices, h, w) + prediction.shape[3:], np.float32)
        out[z0:z1, y0:y1, x0:x1] = full[:, top : side_y - bottom, left : side_x - right]
        return out
    if method != "nearest":
        raise ValueError(f"unknown method {method!r}; valid: nearest, linear")
    iy = nearest_indices(prediction.shape[1], side_y)
    ix = nearest_indices(prediction.shape[2], side_x)
    if (iy < 0).any() or (ix < 0).any():  # cannot happen for a resize within the grid
        raise ValueError("nearest-neighbour mapping fell outside the prediction")
    # Gather only the rows and columns inside the padding, not the whole padded crop.
    crop = prediction[:, iy[top : side_y - bottom]][:, :, ix[left : side_x - right]]
    out = np.zeros((geometry.num_slices, h, w) + prediction.shape[3:], prediction.dtype)
    out[z0:z1, y0:y1, x0:x1] = crop
    return out
