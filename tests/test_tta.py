"""Test-time augmentation and ensembles on hand-made "models" whose outputs are known (the
real model through them: test_evaluate.py and test_predict.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.tta import average_probabilities, probabilities


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _images():
    # (N, H, W, C) = (2, 3, 4, 1): distinct values, not mirror-symmetric.
    return jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4, 1) / 10 - 1


def test_without_tta_it_is_the_sigmoid_of_the_logits():
    x = _images()
    np.testing.assert_allclose(probabilities(lambda a: a, x), _sigmoid(np.asarray(x)), rtol=1e-6)


def test_tta_averages_the_mirrored_outputs_mirrored_back():
    x = np.asarray(_images())

    # A model that looks at its input's left neighbour (column 0 sees 0): not mirror-equivariant,
    # so TTA changes its output, to the mean of the two passes computed here by hand.
    def shift(a):
        return jnp.pad(a, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]

    plain = _sigmoid(np.asarray(shift(x)))
    mirrored = _sigmoid(np.asarray(shift(x[:, :, ::-1])))[:, :, ::-1]
    got = np.asarray(probabilities(shift, jnp.asarray(x), tta=True))
    np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=1e-6)
    assert not np.allclose(got, plain)  # the mirror pass counted
    # A mirror-equivariant model (pointwise) is unchanged by TTA.
    np.testing.assert_allclose(
        probabilities(lambda a: 2 * a, jnp.asarray(x), tta=True), _sigmoid(2 * x), rtol=1e-6
    )


def test_an_ensemble_is_the_mean_of_its_members_probabilities():
    x = _images()
    members = [lambda a: a, lambda a: -a, lambda a: 3 * a]
    want = np.mean([_sigmoid(k * np.asarray(x)) for k in (1, -1, 3)], axis=0)
    np.testing.assert_allclose(average_probabilities(members, x), want, rtol=1e-6)
    # Averaged as probabilities, not logits: the mean logit of these is x, whose sigmoid differs.
    assert not np.allclose(want, _sigmoid(np.asarray(x)))
    with pytest.raises(ValueError, match="at least one model"):
        average_probabilities([], x)
