"""Losses against explicit numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.losses import bce_dice_loss, dice_loss, get_loss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_dice_loss(logits, labels, smooth=1.0):
    p = _sigmoid(logits.astype(np.float64)).ravel()
    y = labels.astype(np.float64).ravel()
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


@pytest.fixture
def batch():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 16, 16, 1).astype(np.float32) * 3
    labels = (rng.rand(3, 16, 16, 1) > 0.8).astype(np.float32)
    return logits, labels


def test_dice_loss_is_the_baselines_whole_batch_formula(batch):
    logits, labels = batch
    got = float(jax.jit(dice_loss)(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(_np_dice_loss(logits, labels), abs=1e-6)


def test_dice_loss_hand_checked_cases():
    big = 30.0  # sigmoid(30) == 1 in float32
    y = np.zeros((1, 2, 2, 1), np.float32)
    y[0, 0, 0, 0] = 1
    perfect = np.where(y > 0, big, -big)
    # p == y: 1 - (2*1 + 1) / (1 + 1 + 1) = 0
    assert float(dice_loss(jnp.asarray(perfect), jnp.asarray(y))) == pytest.approx(0.0, abs=1e-6)
    # all wrong: 1 - (0 + 1) / (3 + 1 + 1) = 0.8
    wrong = np.where(y > 0, -big, big)
    assert float(dice_loss(jnp.asarray(wrong), jnp.asarray(y))) == pytest.approx(0.8, abs=1e-6)
    # empty truth and empty prediction: smooth makes it 0, not NaN
    assert float(dice_loss(jnp.full((1, 2, 2, 1), -big), jnp.zeros((1, 2, 2, 1)))) == pytest.approx(
        0.0, abs=1e-6
    )


def test_bce_dice(batch):
    logits, labels = batch
    p = _sigmoid(logits.astype(np.float64))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    got = float(bce_dice_loss(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(bce + _np_dice_loss(logits, labels), rel=1e-5)


def test_get_loss_names():
    assert get_loss("dice") is dice_loss
    with pytest.raises(ValueError, match="valid"):
        get_loss("focal")
