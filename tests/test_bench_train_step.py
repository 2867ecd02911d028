"""benchmarks/train_step.py keeps working: variant parsing, the table, and real steps at tiny size.

XLA:CPU compiles even a tiny U-Net train step in tens of seconds on this machine, so the fast tests
build steps in-process (one JAX compile each); the end-to-end subprocess run is marked slow.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _requires import needs_torch
from benchmarks import train_step as bench
from unet_jax.model import UNet

TINY = dict(batch=2, image_size=16, features=2)


def test_parse_variants():
    assert bench.parse_variant("torch") == bench.Variant("torch", "torch")
    assert bench.parse_variant("torch:cl").channels_last
    v = bench.parse_variant("jax:conv=im2col,bf16,flags=noynn+fastmath")
    assert (v.framework, v.conv, v.functional, v.bf16) == ("jax", "im2col", True, True)
    assert v.xla_flags == (bench.FLAG_PRESETS["noynn"] + " " + bench.FLAG_PRESETS["fastmath"])
    assert not bench.parse_variant("jax").functional
    for bad in ("tf", "jax:conv=fft", "jax:flags=nope", "torch:x", "jax:layout=nchw,conv=im2col"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)


def test_format_table():
    res = [
        {
            "variant": "torch",
            "median_ms": 100.0,
            "min_ms": 90.0,
            "max_ms": 120.0,
            "examples_per_s": 80.0,
            "ratio_to_torch": 1.0,
            "compile_s": 1.0,
        },
        {
            "variant": "jax",
            "median_ms": 50.0,
            "min_ms": 49.0,
            "max_ms": 51.0,
            "examples_per_s": 160.0,
            "ratio_to_torch": 0.5,
            "compile_s": 20.0,
        },
    ]
    table = bench.format_table(res)
    assert "| `jax` | 50 | 49-51 | 160.0 | 0.50 | - | 20.0 |" in table


@pytest.mark.parametrize("conv", ["xla", "im2col", "shift9"])
def test_functional_forward_matches_model(conv):
    # The functional variants must be the same function as unet_jax.model.UNet (training mode).
    model = UNet(3, 1, 2, rngs=nnx.Rngs(0))
    model.train()
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    v = bench.Variant("t", "jax", functional=True, conv=conv)
    got, new_stats = jax.jit(lambda p, s, x: bench.functional_unet(p, s, x, v))(
        nnx.to_pure_dict(params), nnx.to_pure_dict(stats), x
    )
    want = model(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(new_stats["encoder1"]["norm1"]["running_var"]),
        np.asarray(model.encoder1.norm1.running_var[...]),
        rtol=1e-5,
    )


@needs_torch
def test_torch_and_jax_steps_run_and_learn():
    for spec in ("torch", "jax"):
        step = bench.make_step(bench.parse_variant(spec), threads=1, **TINY)
        losses = [step() for _ in range(3)]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in losses), (spec, losses)
        # Same batch every step: Adam must lower the Dice loss.
        assert losses[-1] < losses[0], (spec, losses)


@needs_torch
@pytest.mark.slow
def test_run_benchmark_end_to_end():
    res = bench.run_benchmark(
        ["torch", "jax:conv=im2col"], reps=2, threads=1, log=lambda s: None, **TINY
    )
    assert [r["variant"] for r in res] == ["torch", "jax:conv=im2col"]
    assert res[0]["ratio_to_torch"] == 1.0
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in res)
