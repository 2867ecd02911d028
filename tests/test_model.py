"""UNet structure, shapes, input checks, bfloat16 option and a training step that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unet_jax.losses import dice_loss
from unet_jax.model import UNet, count_params


def test_parameter_count_matches_baseline():
    model = nnx.eval_shape(lambda: UNet(3, 1, 32, rngs=nnx.Rngs(0)))
    assert count_params(model) == 7_763_041


def test_parameter_count_formula_for_other_widths():
    # Independent count: per block 9*cin*f + 9*f*f conv weights + 4f BN affine; up: 4*cin*cout + cout.
    def expected(cin, f):
        def block(a, b):
            return 9 * a * b + 9 * b * b + 4 * b

        enc = block(cin, f) + block(f, 2 * f) + block(2 * f, 4 * f) + block(4 * f, 8 * f)
        bott = block(8 * f, 16 * f)
        up = sum(4 * (2 * c) * c + c for c in (8 * f, 4 * f, 2 * f, f))
        dec = block(16 * f, 8 * f) + block(8 * f, 4 * f) + block(4 * f, 2 * f) + block(2 * f, f)
        return enc + bott + up + dec + f * 1 + 1

    assert expected(3, 32) == 7_763_041
    for cin, f in [(1, 4), (3, 8)]:
        model = nnx.eval_shape(lambda: UNet(cin, 1, f, rngs=nnx.Rngs(0)))
        assert count_params(model) == expected(cin, f)


@pytest.mark.parametrize("h,w", [(32, 32), (48, 64)])
def test_output_shape_and_dtype(h, w):
    model = UNet(3, 1, 4, rngs=nnx.Rngs(0))
    y = model(jnp.zeros((2, h, w, 3)))
    assert y.shape == (2, h, w, 1)
    assert y.dtype == jnp.float32


def test_bad_sizes_and_channels_are_clear_errors():
    model = UNet(3, 1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(jnp.zeros((1, 40, 32, 3)))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="rank 4"):
        model(jnp.zeros((32, 32, 3)))


def test_upconv_equals_transposed_convolution():
    # Independent reference: the definition of a 2x2 stride-2 transposed conv, in numpy loops.
    model = UNet(3, 1, 4, rngs=nnx.Rngs(1))
    up = model.upconv1  # 8 -> 4 channels
    x = np.random.RandomState(0).randn(1, 3, 5, 8).astype(np.float32)
    k = np.asarray(up.kernel[...])
    b = np.asarray(up.bias[...])
    ref = np.zeros((1, 6, 10, 4), np.float32)
    for i in range(3):
        for j in range(5):
            for a in range(2):
                for c in range(2):
                    ref[0, 2 * i + a, 2 * j + c] = x[0, i, j] @ k[:, a, c, :] + b
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_modes_follow_pytorch_conventions():
    model = UNet(3, 1, 4, rngs=nnx.Rngs(0))
    norm = model.encoder1.norm1
    x = np.random.RandomState(0).randn(2, 4, 4, 4).astype(np.float32) * 3 + 1
    y = np.asarray(norm(jnp.asarray(x)))
    mean = x.reshape(-1, 4).mean(0)
    var_b = x.reshape(-1, 4).var(0)
    var_u = x.reshape(-1, 4).var(0, ddof=1)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var_b + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.running_mean[...]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(norm.running_var[...]), 0.9 + 0.1 * var_u, rtol=1e-5)
    model.eval()
    y_eval = np.asarray(norm(jnp.asarray(x)))
    rm, rv = 0.1 * mean, 0.9 + 0.1 * var_u
    np.testing.assert_allclose(y_eval, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    m32 = UNet(3, 1, 4, rngs=nnx.Rngs(0))
    m16 = UNet(3, 1, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m32.eval(), m16.eval()
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(m16, nnx.Param)))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    a, b = m32(x), m16(x)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(jax.nn.sigmoid(a) - jax.nn.sigmoid(b)))) < 0.05


def test_jitted_training_step_decreases_dice_loss_on_fixed_batch():
    model = UNet(3, 1, 4, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-2)
    opt_state = tx.init(params)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 32, 32, 3).astype(np.float32))
    yy, xx = np.mgrid[:32, :32]
    blob = ((yy - 16) ** 2 + (xx - 12) ** 2 < 40).astype(np.float32)
    y = jnp.asarray(np.broadcast_to(blob[None, :, :, None], (4, 32, 32, 1)))
    x = x + 2 * y  # the lesion is brighter: learnable

    @jax.jit
    def step(params, rest, opt_state):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss = dice_loss(m(x), y)
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    losses = []
    for _ in range(40):
        params, rest, opt_state, loss = step(params, rest, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
