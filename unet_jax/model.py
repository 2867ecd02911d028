"""The baseline's U-Net in Flax NNX.

Architecture (the baseline's, brain-segmentation-pytorch): 4 down / 4 up levels with ``features * (1, 2, 4, 8)`` channels and a
``16 * features`` bottleneck; each block is 2 x (3x3 conv, no bias -> BatchNorm -> ReLU); 2x2 max
pool down; 2x2 stride-2 transposed conv (with bias) up; skips concatenated as (upsampled, encoder);
a final 1x1 conv with bias. Inputs are NHWC; the output is **logits** (apply ``jax.nn.sigmoid``
outside, so losses can use the numerically stable log-sigmoid forms).

Two choices made for speed and exactness:

* The 2x2 stride-2 transposed convolution is written as a per-pixel matmul to ``4 * C_out``
  channels followed by depth-to-space. That is the same linear map (each output pixel receives
  exactly one input pixel) and avoids XLA's slow transposed-convolution lowering (JAX issue
  #23783). The kernel is stored as ``(C_in, 2, 2, C_out)``, i.e. PyTorch's ``(C_in, C_out, kH, kW)``
  permuted, so weights convert either way with a transpose.
* BatchNorm follows PyTorch's conventions exactly (momentum 0.1 on the *new* value, eps 1e-5,
  biased variance to normalise, unbiased variance in the running estimate), so converted weights
  and statistics behave identically in both modes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from unet_jax.config import Config

# PyTorch's default init for conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# Matching it keeps training dynamics comparable with the baseline.
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the last, with PyTorch's ``BatchNorm2d`` semantics.

    Training mode (``use_running_average=False``) normalises with the biased batch variance and
    updates ``running_var`` with the unbiased one; eval mode uses the running statistics.
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(
        self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5, dtype=jnp.float32
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            # E[(x - mean)^2] is more accurate than E[x^2] - mean^2 in float32.
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * mean
            self.running_var[...] = (1 - m) * self.running_var[...] + m * unbiased
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return ((x32 - mean) * inv + self.bias[...]).astype(self.dtype)


class ConvBlock(nnx.Module):
    """2 x (3x3 conv without bias -> BatchNorm -> ReLU)."""

    def __init__(self, in_channels: int, features: int, *, dtype, rngs: nnx.Rngs):
        def conv3x3(channels_in: int) -> nnx.Conv:
            return nnx.Conv(
                channels_in,
                features,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=dtype,
                kernel_init=_torch_kernel_init,
                rngs=rngs,
            )

        self.conv1 = conv3x3(in_channels)
        self.norm1 = BatchNorm(features, dtype=dtype)
        self.conv2 = conv3x3(features)
        self.norm2 = BatchNorm(features, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        return jax.nn.relu(self.norm2(self.conv2(x)))


class UpConv(nnx.Module):
    """2x2 stride-2 transposed convolution as a per-pixel matmul followed by depth-to-space.

    ``kernel[ci, a, b, co]`` is PyTorch's ``weight[ci, co, a, b]``: output pixel
    ``(2i + a, 2j + b)`` receives ``x[i, j] @ kernel[:, a, b, :] + bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
        # PyTorch's fan_in for ConvTranspose2d weight (C_in, C_out, 2, 2) is C_out * 4.
        fan_in = out_channels * 4
        bound = 1.0 / math.sqrt(fan_in)
        shape = (in_channels, 2, 2, out_channels)
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        )
        self.bias = nnx.Param(_torch_bias_init(fan_in)(rngs.params(), (out_channels,)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, cin = x.shape
        cout = self.kernel.shape[-1]
        k = self.kernel[...].astype(self.dtype).reshape(cin, 4 * cout)
        y = jnp.dot(x.astype(self.dtype), k).reshape(n, h, w, 2, 2, cout)
        y = y + self.bias[...].astype(self.dtype)
        # (n, h, a, w, b, c) -> (n, 2h, 2w, c)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, cout)


def model_to_pure(model: nnx.Module) -> dict:
    """The model's parameters and BatchNorm statistics as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model))


def load_pure(model: nnx.Module, pure: dict) -> None:
    """Set the model's parameters and BatchNorm statistics from :func:`model_to_pure`'s dict."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def named_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of a nested dict (:func:`model_to_pure`'s, or Orbax's metadata of one) by
    dotted path: ``{"encoder1.conv1.kernel": leaf}`` (the tensor names of a model file)."""
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool with stride 2 (H and W even)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UNet(nnx.Module):
    """The baseline U-Net. ``UNet(3, 1, 32)`` has exactly 7,763,041 parameters.

    Args:
      in_channels: input channels (3 for the LGG slices: pre-contrast, FLAIR, post-contrast).
      out_channels: output channels (1: lesion logit).
      features: channels of the first level (32 in the baseline).
      dtype: compute dtype (``jnp.bfloat16`` on accelerators); parameters and BatchNorm
        statistics stay float32 and the logits are returned as float32.
      rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        features: int = 32,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        f = features
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.dtype = dtype
        self.encoder1 = ConvBlock(in_channels, f, dtype=dtype, rngs=rngs)
        self.encoder2 = ConvBlock(f, 2 * f, dtype=dtype, rngs=rngs)
        self.encoder3 = ConvBlock(2 * f, 4 * f, dtype=dtype, rngs=rngs)
        self.encoder4 = ConvBlock(4 * f, 8 * f, dtype=dtype, rngs=rngs)
        self.bottleneck = ConvBlock(8 * f, 16 * f, dtype=dtype, rngs=rngs)
        self.upconv4 = UpConv(16 * f, 8 * f, dtype=dtype, rngs=rngs)
        self.decoder4 = ConvBlock(16 * f, 8 * f, dtype=dtype, rngs=rngs)
        self.upconv3 = UpConv(8 * f, 4 * f, dtype=dtype, rngs=rngs)
        self.decoder3 = ConvBlock(8 * f, 4 * f, dtype=dtype, rngs=rngs)
        self.upconv2 = UpConv(4 * f, 2 * f, dtype=dtype, rngs=rngs)
        self.decoder2 = ConvBlock(4 * f, 2 * f, dtype=dtype, rngs=rngs)
        self.upconv1 = UpConv(2 * f, f, dtype=dtype, rngs=rngs)
        self.decoder1 = ConvBlock(2 * f, f, dtype=dtype, rngs=rngs)
        self.conv = nnx.Conv(
            f,
            out_channels,
            (1, 1),
            use_bias=True,
            dtype=dtype,
            kernel_init=_torch_kernel_init,
            bias_init=_torch_bias_init(f),
            rngs=rngs,
        )

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC input of rank 4, got shape {x.shape}")
        _, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"UNet was built for {self.in_channels} input channels, got {c} (shape {x.shape}); "
                "inputs are NHWC"
            )
        if h % 16 or w % 16:
            raise ValueError(
                f"UNet needs height and width divisible by 16 (4 poolings), got {h}x{w}"
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC images -> NHWC float32 logits of the same height and width."""
        self._check_input(x)
        x = x.astype(self.dtype)
        e1 = self.encoder1(x)
        e2 = self.encoder2(max_pool_2x2(e1))
        e3 = self.encoder3(max_pool_2x2(e2))
        e4 = self.encoder4(max_pool_2x2(e3))
        b = self.bottleneck(max_pool_2x2(e4))
        d4 = self.decoder4(jnp.concatenate([self.upconv4(b), e4], axis=-1))
        d3 = self.decoder3(jnp.concatenate([self.upconv3(d4), e3], axis=-1))
        d2 = self.decoder2(jnp.concatenate([self.upconv2(d3), e2], axis=-1))
        d1 = self.decoder1(jnp.concatenate([self.upconv1(d2), e1], axis=-1))
        return self.conv(d1).astype(jnp.float32)


def build_model(config: Config, seed: int = 0) -> UNet:
    """A freshly initialised UNet for ``config``'s model settings."""
    return UNet(
        config.in_channels,
        config.out_channels,
        config.features,
        dtype=jnp.dtype(config.dtype),
        rngs=nnx.Rngs(seed),
    )


def abstract_model(config: Config) -> UNet:
    """A UNet with shape-only leaves (no memory, no compute), to restore into."""
    return nnx.eval_shape(lambda: build_model(config))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (``nnx.Param``); BatchNorm statistics are not counted."""
    params = nnx.state(model, nnx.Param)
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
