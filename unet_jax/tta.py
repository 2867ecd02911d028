"""Probabilities of one model or several, with test-time augmentation: what evaluation and
``unet_jax.predict`` threshold.

Test-time augmentation (TTA) averages the probabilities of the image and of its mirror image
(mirrored back): the one flip training augments with (``unet_jax.augment``: left-right), as
nnU-Net mirrors by default. An ensemble (several checkpoints: the folds of ``cv5``, or several
seeds) averages the members' probabilities, each with TTA when asked. Averaging happens on
probabilities, before any resize or threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["TTA_FLIPS", "average_probabilities", "probabilities"]

#: The flips TTA averages over, by image axis of an (N, H, W, C) batch: none, left-right.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,))


def probabilities(
    apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array, tta: bool = False
) -> jax.Array:
    """``sigmoid(apply_fn(images))``; with ``tta`` the mean over :data:`TTA_FLIPS` (each flip's
    output flipped back). Pure: use inside ``jax.jit``."""
    flips = TTA_FLIPS if tta else ((),)
    total = None
    for axes in flips:
        x = jnp.flip(images, axes) if axes else images
        p = jax.nn.sigmoid(apply_fn(x).astype(jnp.float32))
        p = jnp.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return total / len(flips)


def average_probabilities(
    apply_fns: Sequence[Callable[[jax.Array], jax.Array]], images: jax.Array, tta: bool = False
) -> jax.Array:
    """The mean of :func:`probabilities` over several models (an ensemble; one model: its own)."""
    if not apply_fns:
        raise ValueError("average_probabilities needs at least one model")
    total = sum(probabilities(f, images, tta) for f in apply_fns)
    return total / len(apply_fns)
