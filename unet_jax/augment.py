"""On-device data augmentation: random scale, rotation and horizontal flip as one affine warp.

The baseline (brain-segmentation-pytorch) augments each example on the CPU with scikit-image in
three resampling passes: ``rescale`` (then centre-crop or zero-pad back to the input size),
``rotate`` about the image centre with zero fill, and ``fliplr``. Here the same three geometric
operations are composed into ONE affine map per example and the image is resampled once,
inside jit, vmapped over the batch:

- images: bilinear interpolation, zero outside the input (each of the four neighbours that lies
  outside the image contributes 0, exactly as ``skimage.transform.warp(order=1, mode='constant',
  cval=0)`` does);
- masks: nearest neighbour (round half away from zero, as scikit-image does), zero outside, so a
  binary mask stays binary and keeps its dtype.

Coordinate convention (the same as scikit-image's): a pixel's centre has integer coordinates
``(x, y) = (col, row)``; the centre of an ``H x W`` image is ``((W - 1) / 2, (H - 1) / 2)``,
the point ``skimage.transform.rotate`` rotates about. For an example with parameters
``(scale s, angle a degrees, flip f)`` the forward (input -> output) transform about the centre
``c`` is, in the baseline's order, scale by ``s``, then rotate by ``a`` (counter-clockwise on
screen, like ``skimage.transform.rotate``), then mirror left-right if ``f``. The map used for
resampling is its inverse, output -> input:

    p_in = c + (1 / s) * R(a) @ F @ (p_out - c),   R(a) = [[cos a, -sin a], [sin a, cos a]],
                                                    F = diag(-1, 1) if f else I

which :func:`affine_matrix` returns as a 3x3 homogeneous matrix in (x, y) order, directly usable
as ``skimage.transform.AffineTransform(matrix=...)`` / ``warp(inverse_map=...)``.

Identity parameters (scale 1, angle 0, no flip) give integer sample positions and bilinear
weights of exactly 1 and 0, so :func:`apply` returns its input bit for bit; a flip alone is also
an exact permutation of pixels, so flipping twice is the identity. :func:`augment_batch` skips
the warp altogether when all ranges are zero.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "AugmentParams",
    "sample_params",
    "identity_params",
    "affine_matrix",
    "apply",
    "augment_batch",
]

Method = Literal["gather", "map_coordinates"]


class AugmentParams(NamedTuple):
    """Per-example transform parameters (a pytree: vmap/jit friendly).

    Attributes:
      scale: (N,) float32 zoom factor (>1 enlarges the content, like ``skimage.transform.rescale``).
      angle_deg: (N,) float32 rotation in degrees, counter-clockwise on screen (like
        ``skimage.transform.rotate``).
      flip: (N,) bool, mirror left-right (``np.fliplr``) after scaling and rotating.
    """

    scale: jax.Array
    angle_deg: jax.Array
    flip: jax.Array


def sample_params(
    key: jax.Array, batch: int, scale: float, angle: float, flip_prob: float
) -> AugmentParams:
    """Draw parameters as the baseline does: scale ~ U[1-scale, 1+scale], angle ~ U[-angle, angle]
    degrees, flip ~ Bernoulli(flip_prob), independently per example.

    A range of 0 gives exactly 1 (scale) / 0 (angle), and ``flip_prob=0`` never flips.
    """
    k_scale, k_angle, k_flip = jax.random.split(key, 3)
    s = jax.random.uniform(k_scale, (batch,), jnp.float32, 1.0 - scale, 1.0 + scale)
    a = jax.random.uniform(k_angle, (batch,), jnp.float32, -angle, angle)
    f = jax.random.bernoulli(k_flip, flip_prob, (batch,))
    return AugmentParams(scale=s, angle_deg=a, flip=f)


def identity_params(batch: int) -> AugmentParams:
    """Parameters of the identity transform for ``batch`` examples."""
    return AugmentParams(
        scale=jnp.ones((batch,), jnp.float32),
        angle_deg=jnp.zeros((batch,), jnp.float32),
        flip=jnp.zeros((batch,), bool),
    )


def affine_matrix(params: AugmentParams, height: int, width: int) -> jax.Array:
    """Output -> input sampling map of each example, as (N, 3, 3) float32 homogeneous matrices.

    Rows/columns are in scikit-image's (x=col, y=row) order; the transform is about the centre
    ``((width - 1) / 2, (height - 1) / 2)``. See the module docstring for the formula.
    """
    scale = jnp.asarray(params.scale, jnp.float32)
    theta = jnp.deg2rad(jnp.asarray(params.angle_deg, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    inv_s = 1.0 / scale
    # F = diag(f, 1) with f = -1 when flipping: it negates the first column of R(a).
    f = jnp.where(jnp.asarray(params.flip), -1.0, 1.0).astype(jnp.float32)
    a00, a01 = inv_s * cos * f, -inv_s * sin
    a10, a11 = inv_s * sin * f, inv_s * cos
    cx = (width - 1) / 2.0
    cy = (height - 1) / 2.0
    # p_in = A p_out + t with t = c - A c. For identity/flip-only parameters every term here is
    # an exact small integer or half-integer in float32, which keeps those cases exact.
    t0 = cx - (a00 * cx + a01 * cy)
    t1 = cy - (a10 * cx + a11 * cy)
    zeros, ones = jnp.zeros_like(a00), jnp.ones_like(a00)
    return jnp.stack(
        [
            jnp.stack([a00, a01, t0], -1),
            jnp.stack([a10, a11, t1], -1),
            jnp.stack([zeros, zeros, ones], -1),
        ],
        -2,
    )


def _sample_points(matrix: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Input (x, y) positions, each (H, W), sampled for every output pixel under ``matrix``."""
    ys = jnp.arange(height, dtype=jnp.float32)[:, None]
    xs = jnp.arange(width, dtype=jnp.float32)[None, :]
    x_in = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    y_in = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    return x_in, y_in


def _bilinear_gather(image: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Bilinear resampling of an (H, W, C) image at (H', W') points; zero outside.

    Gathers whole pixels (all C channels at once) for each of the four neighbours from the image
    flattened to (H*W, C), which is cheaper than resampling each channel on its own.
    """
    height, width, channels = image.shape
    flat = image.reshape(height * width, channels)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    out = None
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        yi = y0 + dy
        y_ok = (yi >= 0) & (yi < height)
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            ok = y_ok & (xi >= 0) & (xi < width)
            idx = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
            # A neighbour outside the image contributes 0 (zero padding), not a clamped edge value.
            w = jnp.where(ok, wy * wx, 0.0).astype(image.dtype)
            term = w[..., None] * flat[idx]
            out = term if out is None else out + term
    return out


def _nearest_gather(mask: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Nearest-neighbour resampling of an (H, W, C) array; zero outside; dtype kept."""
    height, width, channels = mask.shape
    # lax.round rounds half away from zero, as scikit-image's order-0 warp does (jnp.round would
    # round half to even).
    xi = lax.round(x).astype(jnp.int32)
    yi = lax.round(y).astype(jnp.int32)
    ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    idx = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
    values = mask.reshape(height * width, channels)[idx]
    return jnp.where(ok[..., None], values, jnp.zeros((), mask.dtype))


def _map_coordinates(array: jax.Array, x: jax.Array, y: jax.Array, order: int) -> jax.Array:
    """Same resampling through ``jax.scipy.ndimage.map_coordinates``, one channel at a time."""
    resample = lambda channel: jax.scipy.ndimage.map_coordinates(  # noqa: E731
        channel, [y, x], order=order, mode="constant", cval=0
    )
    return jax.vmap(resample, in_axes=-1, out_axes=-1)(array)


def _warp_one(
    image: jax.Array, mask: jax.Array, matrix: jax.Array, method: Method
) -> tuple[jax.Array, jax.Array]:
    height, width = image.shape[0], image.shape[1]
    x, y = _sample_points(matrix, height, width)
    if method == "gather":
        return _bilinear_gather(image, x, y), _nearest_gather(mask, x, y)
    if method == "map_coordinates":
        return _map_coordinates(image, x, y, order=1), _map_coordinates(mask, x, y, order=0)
    raise ValueError(f"unknown method {method!r}")


def apply(
    images: jax.Array,
    masks: jax.Array,
    params: AugmentParams,
    *,
    method: Method = "gather",
) -> tuple[jax.Array, jax.Array]:
    """Warp a batch with per-example parameters: one affine resampling per example.

    Args:
      images: (N, H, W, C) floating point; resampled bilinearly, zero outside.
      masks: (N, H, W, K) any dtype; resampled by nearest neighbour, zero outside, dtype kept
        (a binary mask stays binary).
      params: :class:`AugmentParams` with leading dimension N.
      method: ``"gather"`` (explicit four-neighbour gather of whole pixels; the default, faster
        on CPU) or ``"map_coordinates"`` (``jax.scipy.ndimage.map_coordinates`` per channel).
        Both compute the same values.

    Returns:
      ``(images, masks)`` with the input shapes and dtypes.

    Pure and jit-compatible; call it inside the jitted training step.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floating point, got {images.dtype}")
    if images.shape[:3] != masks.shape[:3]:
        raise ValueError(f"images {images.shape} and masks {masks.shape} differ in N, H, W")
    height, width = images.shape[1], images.shape[2]
    matrices = affine_matrix(params, height, width)
    return jax.vmap(partial(_warp_one, method=method))(images, masks, matrices)


@partial(jax.jit, static_argnames=("scale", "angle", "flip_prob", "method"))
def augment_batch(
    key: jax.Array,
    images: jax.Array,
    masks: jax.Array,
    scale: float = 0.05,
    angle: float = 15.0,
    flip_prob: float = 0.5,
    method: Method = "gather",
) -> tuple[jax.Array, jax.Array]:
    """Sample parameters (:func:`sample_params`) and warp the batch (:func:`apply`).

    Defaults are the baseline's settings (scale 0.05, angle 15 degrees, flip 0.5). The ranges are
    static: with all three at zero nothing is computed and the inputs come back unchanged.
    Jitted; inside another jitted function it is simply inlined.
    """
    if scale == 0 and angle == 0 and flip_prob == 0:
        return images, masks
    params = sample_params(key, images.shape[0], scale, angle, flip_prob)
    return apply(images, masks, params, method=method)
