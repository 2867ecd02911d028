"""Segmentation losses on logits (jit-able).

``dice_loss`` is the baseline's loss exactly: the sigmoid outputs and the labels of the whole
batch flattened into one vector, smooth 1: ``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """The baseline's Dice loss over the whole batch as one vector (scalar)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    y = labels.astype(jnp.float32)
    inter = jnp.sum(p * y)
    denom = jnp.sum(p) + jnp.sum(y)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy on logits over all pixels of the batch."""
    x = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
    return jnp.mean(x)


def bce_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """BCE + the baseline's Dice loss (equal weights)."""
    return bce_loss(logits, labels) + dice_loss(logits, labels, smooth)


LOSSES = {"dice": dice_loss, "bce_dice": bce_dice_loss}


def get_loss(name: str):
    """Loss function by config name (``dice`` or ``bce_dice``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}") from None
