"""Side-by-side benchmark of ONE U-Net training step: PyTorch vs unet_jax.

A training step is forward + backward + Adam update with the baseline's Dice loss and BatchNorm in
training mode, on the same model (same architecture and parameter count) and the same random batch.

Every variant runs in its own worker subprocess (so each can have its own ``XLA_FLAGS``, which XLA
reads once at start-up). The parent starts the workers one after another, waits until each has
compiled and warmed up, then drives them **round-robin, one step at a time**: rep 1 of every
variant, then rep 2 of every variant... Only one worker computes at any moment (the others block
on their stdin), so all variants see the same background load of this shared machine, and noise
spreads evenly instead of favouring whichever variant ran in the quiet minute. Medians are
reported.

Variant strings (``--variants``, comma-separated lists are split on ``;``)::

    torch                 PyTorch, fp32, NCHW (benchmarks/torch_baseline/unet.py)
    torch:cl              ... with channels_last memory format
    jax                   unet_jax.model.UNet as it is (jitted, donated state)
    jax:fn,conv=im2col    functional re-implementation with options (below)
    jax:flags=noynn       any variant plus an XLA flag preset (see ``FLAG_PRESETS``)

JAX options (comma-separated after ``jax:``)::

    fn             functional forward (same params, same numerics) instead of the NNX model;
                   implied by conv=/layout=/bn= options
    conv=xla|im2col|shift9
                   3x3 conv as lax.conv (default), as one im2col matmul (9 shifted slices
                   concatenated on channels), or as 9 shifted matmuls summed
    layout=nhwc|nchw
                   activation layout for lax.conv (conv=xla only)
    bn=twopass|onepass|none
                   BatchNorm statistics as mean then E[(x-mean)^2] (the model's), as E[x], E[x^2]
                   in one pass, or no BatchNorm at all (to *measure its cost*, not a real model)
    bf16           bfloat16 compute (speed check only; params and BN statistics stay float32)
    prec=default|high|highest
                   jax.default_matmul_precision for the step
    remat=block    jax.checkpoint around every conv block (recompute in the backward pass)
    flags=A+B      XLA flag presets joined by '+', or raw=--xla_... for one raw flag

Example (the numbers in benchmarks/RESULTS.md)::

    python -m benchmarks.train_step --batch 8 --image-size 128 --reps 7 \
        --variants "torch;torch:cl;jax;jax:fn,conv=im2col;jax:flags=noynn"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# XLA flag presets that can be combined per variant (flags=a+b); all exist in jaxlib 0.10.2
# (strings of libjax_common.so). None paid reliably on the 2-core CPU (benchmarks/RESULTS.md), so
# none is applied by default anywhere.
FLAG_PRESETS: dict[str, str] = {
    # YNNPACK library fusions (the default CPU path for dots/convs in recent jaxlib) switched off
    # or widened.
    "noynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynnall": "--xla_cpu_experimental_ynn_fusion_type="
    "individual_dot,individual_convolution,dot,eltwise,reduce",
    "ynnconv": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",
    # XNNPACK fusions (older path) and oneDNN.
    "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "noxnn": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednnfusion": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "onednncc": "--xla_cpu_experimental_onednn_custom_call=true",
    # GPU: convolutions (and the other command types) captured in CUDA command buffers, so a
    # step's many small kernels launch as one graph (A/B on a GPU; no effect on the CPU).
    "gpucmdconv": "--xla_gpu_enable_command_buffer="
    "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONVOLUTION,WHILE,CONDITIONAL",
    # Math and runtime knobs.
    "fastmath": "--xla_cpu_enable_fast_math=true",
    "nothunk": "--xla_cpu_use_thunk_runtime=false",
    "eigen1": "--xla_cpu_multi_thread_eigen=false",
    "noemit": "--xla_cpu_use_fusion_emitters=false",
    "concsched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


# --------------------------------------------------------------------------------------------
# Variant specification
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked configuration, parsed from a variant string."""

    name: str
    framework: str  # "torch" or "jax"
    channels_last: bool = False
    functional: bool = False
    conv: str = "xla"
    layout: str = "nhwc"
    bn: str = "twopass"
    bf16: bool = False
    precision: str | None = None
    remat: str | None = None
    xla_flags: str = ""


def parse_variant(spec: str) -> Variant:
    """Parse ``torch``, ``torch:cl``, ``jax`` or ``jax:opt,opt=value,...`` (see the module
    docstring)."""
    spec = spec.strip()
    framework, _, opts = spec.partition(":")
    if framework == "torch":
        cl = False
        for opt in filter(None, opts.split(",")):
            if opt in ("cl", "channels_last"):
                cl = True
            else:
                raise ValueError(f"unknown torch option {opt!r} in {spec!r}")
        return Variant(spec, "torch", channels_last=cl)
    if framework != "jax":
        raise ValueError(f"variant must start with 'torch' or 'jax', got {spec!r}")
    kw: dict[str, Any] = {}
    flags: list[str] = []
    for opt in filter(None, opts.split(",")):
        key, eq, value = opt.partition("=")
        if key == "fn" and not eq:
            kw["functional"] = True
        elif key == "bf16" and not eq:
            kw["bf16"] = True
        elif key == "conv" and value in ("xla", "im2col", "shift9"):
            kw.update(conv=value, functional=True)
        elif key == "layout" and value in ("nhwc", "nchw"):
            kw.update(layout=value, functional=True)
        elif key == "bn" and value in ("twopass", "onepass", "none"):
            kw.update(bn=value, functional=True)
        elif key == "prec" and value in ("default", "high", "highest"):
            kw["precision"] = value
        elif key == "remat" and value == "block":
            kw.update(remat=value, functional=True)
        elif key == "flags":
            for preset in value.split("+"):
                if preset not in FLAG_PRESETS:
                    raise ValueError(
                        f"unknown flag preset {preset!r}; valid: {sorted(FLAG_PRESETS)}"
                    )
                flags.append(FLAG_PRESETS[preset])
        elif key == "raw" and value.startswith("--xla"):
            flags.append(value)
        else:
            raise ValueError(f"unknown jax option {opt!r} in {spec!r}")
    if kw.get("layout") == "nchw" and kw.get("conv", "xla") != "xla":
        raise ValueError("layout=nchw is only implemented for conv=xla")
    return Variant(spec, "jax", xla_flags=" ".join(flags), **kw)


# --------------------------------------------------------------------------------------------
# Shared data
# --------------------------------------------------------------------------------------------


def make_batch(batch: int, image_size: int, seed: int = 0):
    """The same float32 NHWC images and {0,1} masks for every variant (numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    # Blob-free but non-trivial labels: ~10% foreground keeps the Dice loss away from its limits.
    y = (rng.random((batch, image_size, image_size, 1)) < 0.1).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------------------------
# PyTorch step
# --------------------------------------------------------------------------------------------


def make_torch_step(
    v: Variant, batch: int, image_size: int, features: int, threads: int
) -> Callable[[], float]:
    """Return a closure running one PyTorch training step and returning its loss."""
    import torch

    from benchmarks.torch_baseline.train import dice_loss
    from benchmarks.torch_baseline.unet import UNet as TorchUNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchUNet(3, 1, features).train()
    x_np, y_np = make_batch(batch, image_size)
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y_np).permute(0, 3, 1, 2).contiguous()
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = dice_loss(torch.sigmoid(model(x)), y)  # the baseline's loss, smooth 1
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------------------------
# JAX: functional forward with the model's own parameter pytree (for formulation variants)
# --------------------------------------------------------------------------------------------


def _conv3x3(x, kernel, v: Variant):
    """3x3, stride 1, padding 1 convolution of x (layout per ``v``) with an HWIO kernel."""
    import jax.numpy as jnp
    from jax import lax

    if v.conv == "xla":
        dn = ("NHWC", "HWIO", "NHWC") if v.layout == "nhwc" else ("NCHW", "HWIO", "NCHW")
        return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    n, h, w, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    if v.conv == "im2col":
        # (N,H,W,9*Cin) @ (9*Cin, Cout): row order (i, j, ci) matches kernel.reshape(9*Cin, Cout).
        cols = jnp.concatenate(shifted, axis=-1)
        return jnp.dot(cols, kernel.reshape(9 * cin, -1))
    # shift9: 9 matmuls of the shifted input with each tap, summed.
    out = None
    for t, s in enumerate(shifted):
        y = jnp.dot(s, kernel[t // 3, t % 3])
        out = y if out is None else out + y
    return out


def _batchnorm(x, p, s, v: Variant, momentum: float = 0.1, eps: float = 1e-5):
    """PyTorch-convention BatchNorm in training mode; returns (y, new_stats)."""
    import jax.numpy as jnp
    from jax import lax

    caxis = x.ndim - 1 if v.layout == "nhwc" else 1
    axes = tuple(a for a in range(x.ndim) if a != caxis)
    bshape = [1] * x.ndim
    bshape[caxis] = -1
    if v.bn == "none":
        return x, s
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes)
    if v.bn == "twopass":
        var = jnp.mean(jnp.square(x32 - mean.reshape(bshape)), axis=axes)
    else:  # onepass: both sums in one read of x (less accurate for large means)
        var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes) - jnp.square(mean), 0.0)
    n = math.prod(x.shape) // x.shape[caxis]
    new = {
        "running_mean": (1 - momentum) * s["running_mean"] + momentum * mean,
        "running_var": (1 - momentum) * s["running_var"] + momentum * var * (n / max(n - 1, 1)),
    }
    inv = lax.rsqrt(var + eps) * p["scale"]
    y = (x32 - mean.reshape(bshape)) * inv.reshape(bshape) + p["bias"].reshape(bshape)
    return y.astype(x.dtype), new


def _block(x, p, s, v: Variant):
    import jax

    dt = x.dtype
    new = {}
    for i in (1, 2):
        x = _conv3x3(x, p[f"conv{i}"]["kernel"].astype(dt), v)
        x, new[f"norm{i}"] = _batchnorm(x, p[f"norm{i}"], s[f"norm{i}"], v)
        x = jax.nn.relu(x)
    return x, new


def _upconv(x, p, v: Variant):
    import jax.numpy as jnp

    k = p["kernel"].astype(x.dtype)  # (Cin, 2, 2, Cout)
    cin, _, _, cout = k.shape
    if v.layout == "nhwc":
        n, h, w, _ = x.shape
        y = jnp.dot(x, k.reshape(cin, 4 * cout)).reshape(n, h, w, 2, 2, cout)
        y = y + p["bias"].astype(x.dtype)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, cout)
    n, _, h, w = x.shape
    y = (
        jnp.einsum("nchw,cabo->noabhw", x, k)
        + p["bias"].astype(x.dtype)[None, :, None, None, None, None]
    )
    return y.transpose(0, 1, 4, 2, 5, 3).reshape(n, cout, 2 * h, 2 * w)


def _pool(x, v: Variant):
    if v.layout == "nhwc":
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def functional_unet(params: dict, stats: dict, x, v: Variant):
    """The U-Net of unet_jax.model on pure dicts (its own state layout); returns (logits, stats)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16 if v.bf16 else jnp.float32
    cax = -1 if v.layout == "nhwc" else 1
    h = x.astype(dt)
    if v.layout == "nchw":
        h = h.transpose(0, 3, 1, 2)
    block = _block
    if v.remat == "block":
        block = jax.checkpoint(_block, static_argnums=(3,))
    new: dict = {}

    def run(name, inp):
        out, new[name] = block(inp, params[name], stats[name], v)
        return out

    e1 = run("encoder1", h)
    e2 = run("encoder2", _pool(e1, v))
    e3 = run("encoder3", _pool(e2, v))
    e4 = run("encoder4", _pool(e3, v))
    b = run("bottleneck", _pool(e4, v))
    d = b
    for lvl, skip in ((4, e4), (3, e3), (2, e2), (1, e1)):
        up = _upconv(d, params[f"upconv{lvl}"], v)
        d = run(f"decoder{lvl}", jnp.concatenate([up, skip], axis=cax))
    k = params["conv"]["kernel"].astype(dt)  # (1, 1, F, out)
    if v.layout == "nhwc":
        logits = jnp.dot(d, k[0, 0]) + params["conv"]["bias"].astype(dt)
    else:
        logits = jnp.einsum("nchw,co->nhwo", d, k[0, 0]) + params["conv"]["bias"].astype(dt)
    return logits.astype(jnp.float32), new


def make_jax_step(v: Variant, batch: int, image_size: int, features: int) -> Callable[[], float]:
    """Return a closure running one jitted, donated unet_jax training step; returns its loss."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from unet_jax.losses import dice_loss
    from unet_jax.model import UNet

    dtype = jnp.bfloat16 if v.bf16 else jnp.float32
    model = UNet(3, 1, features, dtype=dtype, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.adam(1e-4)

    if v.functional:
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

        def forward(p, s, x):
            return functional_unet(p, s, x, v)
    else:

        def forward(p, s, x):
            m = nnx.merge(graphdef, p, s, copy=True)
            logits = m(x)
            return logits, nnx.state(m, nnx.BatchStat)

    def train_step(p, s, opt_state, x, y):
        def loss_fn(p_):
            logits, new_s = forward(p_, s, x)
            return dice_loss(logits, y), new_s

        (loss, new_s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), new_s, opt_state, loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    x_np, y_np = make_batch(batch, image_size)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    state = [params, stats, tx.init(params)]

    def step() -> float:
        ctx = jax.default_matmul_precision(v.precision) if v.precision else contextlib.nullcontext()
        with ctx:
            state[0], state[1], state[2], loss = step_fn(state[0], state[1], state[2], x, y)
        jax.block_until_ready(state)
        return float(loss)

    return step


def make_step(
    v: Variant, batch: int, image_size: int, features: int, threads: int
) -> Callable[[], float]:
    """Build the step closure of any variant (in the current process)."""
    if v.framework == "torch":
        return make_torch_step(v, batch, image_size, features, threads)
    return make_jax_step(v, batch, image_size, features)


# --------------------------------------------------------------------------------------------
# Worker process and round-robin driver
# --------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    """Build one variant, warm it up, then run one timed step per 'step' line on stdin."""
    v = parse_variant(args.worker)
    t0 = time.perf_counter()
    step = make_step(v, args.batch, args.image_size, args.features, args.threads)
    loss0 = step()  # compiles (JAX) / allocates (torch)
    compile_s = time.perf_counter() - t0
    step()  # second call: steady state (donated buffers reused, allocator warm)
    print(json.dumps({"ready": True, "compile_s": compile_s, "loss0": loss0}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        loss = step()
        ms = (time.perf_counter() - t) * 1e3
        print(json.dumps({"ms": ms, "loss": loss}), flush=True)


def _start_worker(v: Variant, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ)
    if v.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + v.xla_flags).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        "--worker",
        v.name,
        "--batch",
        str(args.batch),
        "--image-size",
        str(args.image_size),
        "--features",
        str(args.features),
        "--threads",
        str(args.threads),
    ]
    from benchmarks.machine import REPO

    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"worker for {v.name!r} died before it was ready (rc {proc.returncode})")
    return proc, json.loads(line)


def run_benchmark(
    variants: list[str],
    batch: int,
    image_size: int,
    features: int,
    reps: int,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark the variants side by side; returns one result dict per variant.

    Each result has ``variant``, ``compile_s``, ``times_ms`` (one per rep, in rep order),
    ``median_ms``, ``min_ms``, ``max_ms``, ``examples_per_s``, ``losses`` and ``ratio_to_torch``
    (median over the first torch variant's median; None without one).
    """
    threads = threads or os.cpu_count() or 1
    args = argparse.Namespace(
        batch=batch, image_size=image_size, features=features, threads=threads
    )
    parsed = [parse_variant(s) for s in variants]
    workers = []
    try:
        for v in parsed:
            proc, info = _start_worker(v, args)
            log(f"  ready {v.name:<40s} compile+first step {info['compile_s']:.1f}s")
            workers.append((v, proc, info))
        times: dict[str, list[float]] = {v.name: [] for v in parsed}
        losses: dict[str, list[float]] = {v.name: [] for v in parsed}
        for r in range(reps):
            # Rotate the starting variant so no variant always runs right after another one.
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for v, proc, _ in order:
                proc.stdin.write("step\n")
                proc.stdin.flush()
                out = json.loads(proc.stdout.readline())
                times[v.name].append(out["ms"])
                losses[v.name].append(out["loss"])
    finally:
        for _, proc, _ in workers:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait(timeout=60)
    results = []
    for v, _, info in workers:
        t = times[v.name]
        med = statistics.median(t)
        results.append(
            {
                "variant": v.name,
                "compile_s": info["compile_s"],
                "times_ms": t,
                "median_ms": med,
                "min_ms": min(t),
                "max_ms": max(t),
                "examples_per_s": batch / med * 1e3,
                "losses": losses[v.name],
                "xla_flags": v.xla_flags,
            }
        )
    ref = next((r for r, v in zip(results, parsed) if v.framework == "torch"), None)
    for r in results:
        r["ratio_to_torch"] = r["median_ms"] / ref["median_ms"] if ref else None
        # Median of the per-rep ratios: each rep's steps ran seconds apart, so this ratio is far
        # less sensitive to the shared machine's load drifting during the run than the ratio of
        # medians.
        r["paired_ratio_to_torch"] = (
            statistics.median(a / b for a, b in zip(r["times_ms"], ref["times_ms"]))
            if ref
            else None
        )
    return results


def format_table(results: list[dict]) -> str:
    """Markdown table: median ms/step, spread (min-max), examples/s, ratios to PyTorch.

    ``x PyTorch`` is the ratio of medians; ``paired`` the median of per-rep ratios (see
    :func:`run_benchmark`). Below 1 means faster than PyTorch.
    """
    lines = [
        "| variant | median ms/step | min-max ms | examples/s | x PyTorch | paired | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['ratio_to_torch']:.2f}" if r.get("ratio_to_torch") else "-"
        paired = f"{r['paired_ratio_to_torch']:.2f}" if r.get("paired_ratio_to_torch") else "-"
        lines.append(
            f"| `{r['variant']}` | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f}"
            f" | {r['examples_per_s']:.1f} | {ratio} | {paired} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())"
    )
    ap.add_argument(
        "--variants",
        default="torch;jax",
        help="';'-separated variant strings (see module docstring)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    variants = [s for s in args.variants.split(";") if s.strip()]
    print(
        f"batch {args.batch}, {args.image_size}x{args.image_size}, features {args.features}, "
        f"{args.reps} reps, {args.threads or os.cpu_count()} threads"
    )
    results = run_benchmark(
        variants, args.batch, args.image_size, args.features, args.reps, args.threads
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
