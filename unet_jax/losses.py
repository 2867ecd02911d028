"""Segmentation losses on logits (jit-able).

``dice_loss`` is the baseline's loss exactly: the sigmoid outputs and the labels of the whole
batch flattened into one vector, smooth 1: ``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)``.
Every function takes an optional per-example ``weights`` vector (0 for the padding examples of an
evaluation batch, 1 otherwise) so padded batches give the exact loss of the real examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _example_weights(weights: jax.Array | None, n: int, ndim: int) -> jax.Array:
    w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    return w.reshape((n,) + (1,) * (ndim - 1))


def dice_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None, smooth: float = 1.0
) -> jax.Array:
    """The baseline's Dice loss over the whole batch as one vector (scalar)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    y = labels.astype(jnp.float32)
    w = _example_weights(weights, logits.shape[0], logits.ndim)
    inter = jnp.sum(w * p * y)
    denom = jnp.sum(w * p) + jnp.sum(w * y)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def dice_loss_per_example(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Dice loss of each example separately, shape (N,)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    y = labels.astype(jnp.float32)
    axes = tuple(range(1, logits.ndim))
    inter = jnp.sum(p * y, axis=axes)
    denom = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def bce_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean binary cross-entropy on logits over the (weighted) examples' pixels."""
    x = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
    w = _example_weights(weights, logits.shape[0], logits.ndim)
    per_pixel_weight = jnp.broadcast_to(w, x.shape)
    return jnp.sum(x * per_pixel_weight) / jnp.maximum(jnp.sum(per_pixel_weight), 1.0)


def bce_dice_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None, smooth: float = 1.0
) -> jax.Array:
    """BCE + the baseline's Dice loss (equal weights)."""
    return bce_loss(logits, labels, weights) + dice_loss(logits, labels, weights, smooth)


LOSSES = {"dice": dice_loss, "bce_dice": bce_dice_loss}


def get_loss(name: str):
    """Loss function by config name (``dice`` or ``bce_dice``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}") from None
