"""Where unet_jax's CPU train step loses to PyTorch: the 3x3 convolutions' weight grads.

Two measurements, in one process, alternating repetitions, medians:

1. **Step breakdown** of the whole U-Net (float32, training-mode BatchNorm, a mean-sigmoid loss):
   forward only; forward + gradient w.r.t. the input only (every activation gradient, no weight
   gradient); forward + gradients w.r.t. the parameters (the training step's work minus the
   optimiser). The difference of the last two is what the weight gradients cost. The same three for
   PyTorch (``requires_grad`` on the input only, or on the parameters only).
2. **One 3x3 convolution's weight gradient** at each level of the U-Net (batch, size / 2^l,
   features * 2^l channels in and out), by: XLA's own (``jax.vjp`` of ``lax.conv_general_dilated``),
   nine shifted matmuls (``shift9``), nine shifted matmuls over 4,096-pixel chunks summed
   (``shift9_chunked``), one im2col matmul (``im2col``), nine matmuls on the flattened padded
   grid where every shift is a contiguous row offset (``flat9``: no strided slicing), nine shifted
   matmuls in channel-major (C, N, H, W) layout so the pixel axis is contracted as the minor one
   (``cnhw_shift9``), the ``flat9`` scheme through numpy's OpenBLAS on zero-copy views
   (``openblas_flat9``: what a plain BLAS reaches outside XLA), and PyTorch's
   ``aten.convolution_backward`` (oneDNN on CPU). All are checked against PyTorch's result first.

Usage::

    python -m benchmarks.conv_grad --batch 16 --image-size 128 --features 32 --reps 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.cli import run_cli
from benchmarks.machine import format_machine, machine_info, summarize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--levels", type=int, default=4, help="U-Net levels for the per-layer table")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def _conv(x, w):
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def weight_grad_fns(shape: tuple[int, int, int, int]) -> dict[str, Callable]:
    """``{name: jitted (x, dy) -> dW (3, 3, C, C)}`` for NHWC ``shape`` (C in = C out)."""
    import jax
    import jax.numpy as jnp

    b, s, _, c = shape
    k = b * s * s

    def shifted(x):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, i : i + s, j : j + s, :].reshape(k, c) for i in range(3) for j in range(3)]

    def xla(x, dy):
        return jax.vjp(lambda w: _conv(x, w), jnp.zeros((3, 3, c, c), x.dtype))[1](dy)[0]

    def shift9(x, dy):
        d = dy.reshape(k, c)
        return jnp.stack([xs.T @ d for xs in shifted(x)]).reshape(3, 3, c, c)

    def shift9_chunked(x, dy):
        kc = 4096 if k % 4096 == 0 else k
        d = dy.reshape(k // kc, kc, c)
        dims = (((1,), (1,)), ((0,), (0,)))
        return jnp.stack(
            [jax.lax.dot_general(xs.reshape(k // kc, kc, c), d, dims).sum(0) for xs in shifted(x)]
        ).reshape(3, 3, c, c)

    def im2col(x, dy):
        cols = jnp.concatenate(shifted(x), axis=-1)
        return (cols.T @ dy.reshape(k, c)).reshape(3, 3, c, c)

    def flat9(x, dy):
        # On the padded grid (b, s+2, s+2) flattened to rows, the input under kernel tap (i, j)
        # of output pixel q is row q + i*(s+2) + j; dy sits at the grid's top-left (zeros
        # elsewhere), so each tap is one matmul of a contiguous row window.
        g = s + 2
        rows = b * g * g
        xf = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(rows, c)
        xf = jnp.pad(xf, ((0, 2 * g + 2), (0, 0)))
        dg = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(rows, c)
        return jnp.stack(
            [
                jax.lax.slice_in_dim(xf, i * g + j, i * g + j + rows).T @ dg
                for i in range(3)
                for j in range(3)
            ]
        ).reshape(3, 3, c, c)

    def cnhw_shift9(x, dy):
        xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))
        dt = jnp.transpose(dy, (3, 0, 1, 2)).reshape(c, k)
        return jnp.stack(
            [
                xt[:, :, i : i + s, j : j + s].reshape(c, k) @ dt.T
                for i in range(3)
                for j in range(3)
            ]
        ).reshape(3, 3, c, c)

    return {
        n: jax.jit(f)
        for n, f in (
            ("xla", xla),
            ("shift9", shift9),
            ("shift9_chunked", shift9_chunked),
            ("im2col", im2col),
            ("flat9", flat9),
            ("cnhw_shift9", cnhw_shift9),
        )
    }


def openblas_weight_grad(x: np.ndarray, dy: np.ndarray) -> tuple[Callable, np.ndarray]:
    """The ``flat9`` weight gradient in numpy (OpenBLAS sgemm on zero-copy row windows)."""
    b, s, _, c = x.shape
    g = s + 2
    rows = b * g * g

    def fn():
        xf = np.zeros((rows + 2 * g + 2, c), np.float32)
        xf[:rows].reshape(b, g, g, c)[:, 1:-1, 1:-1] = x
        dg = np.zeros((b, g, g, c), np.float32)
        dg[:, :s, :s] = dy
        dg = dg.reshape(rows, c)
        return np.stack(
            [xf[i * g + j : i * g + j + rows].T @ dg for i in range(3) for j in range(3)]
        ).reshape(3, 3, c, c)

    return fn, fn()


def torch_weight_grad(x: np.ndarray, dy: np.ndarray) -> tuple[Callable, np.ndarray]:
    """PyTorch's weight gradient of a 3x3 'same' conv (NCHW tensors), and its result as HWIO."""
    import torch

    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tdy = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
    c = x.shape[-1]
    tw = torch.zeros(c, c, 3, 3)

    def fn():
        return torch.ops.aten.convolution_backward(
            tdy, tx, tw, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, (False, False, True)
        )[1]

    return fn, fn().permute(2, 3, 1, 0).numpy()


def _time(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, Any]]:
    """Median seconds of each zero-argument ``fn`` (which must block until done), alternating."""
    for f in fns.values():
        f()  # compile / warm up
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    return {n: summarize(v) for n, v in times.items()}


def layer_table(
    batch: int, size: int, features: int, levels: int, reps: int, log=print
) -> list[dict[str, Any]]:
    """Per-level weight-gradient timings (ms) and agreement with PyTorch."""
    import jax

    rows = []
    for lvl in range(levels):
        s, c = size >> lvl, features << lvl
        shape = (batch, s, s, c)
        kx, kd = jax.random.split(jax.random.key(lvl))
        x = jax.random.normal(kx, shape)
        dy = jax.random.normal(kd, shape)
        torch_fn, ref = torch_weight_grad(np.asarray(x), np.asarray(dy))
        fns = weight_grad_fns(shape)
        blas_fn, blas_got = openblas_weight_grad(np.asarray(x), np.asarray(dy))
        err = {}
        for n, f in [*fns.items(), ("openblas_flat9", lambda *_: blas_got)]:
            got = np.asarray(f(x, dy))
            err[n] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            if err[n] > 1e-4:
                raise AssertionError(
                    f"{n} weight gradient differs from PyTorch's by {err[n]:.2e} "
                    f"(relative) at {shape}"
                )
        timed = {n: (lambda f=f: jax.block_until_ready(f(x, dy))) for n, f in fns.items()}
        timed["openblas_flat9"] = blas_fn
        timed["torch"] = torch_fn
        res = _time(timed, reps)
        row = {
            "shape": shape,
            "max_rel_err": err,
            "ms": {n: 1e3 * r["median"] for n, r in res.items()},
            "raw": res,
        }
        rows.append(row)
        log(f"  {shape}: " + "  ".join(f"{n} {v:.1f} ms" for n, v in row["ms"].items()))
    return rows


def step_breakdown(batch: int, size: int, features: int, reps: int) -> dict[str, dict[str, float]]:
    """Forward / + input gradients / + parameter gradients of the whole U-Net, both frameworks."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from benchmarks.torch_baseline.unet import UNet as TorchUNet
    from unet_jax.model import UNet

    model = UNet(3, 1, features, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))

    def loss(p, x):
        return jnp.mean(jax.nn.sigmoid(nnx.merge(graphdef, p, rest, copy=True)(x)))

    jfns = {
        "forward": jax.jit(loss),
        "input grads": jax.jit(jax.grad(loss, argnums=1)),
        "param grads": jax.jit(jax.grad(loss, argnums=0)),
    }
    tmodel = TorchUNet(3, 1, features)
    tmodel.train()
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())

    def t_forward():
        with torch.no_grad():
            torch.sigmoid(tmodel(tx)).mean()

    def t_grad(wrt_input: bool):
        def fn():
            for p in tmodel.parameters():
                p.requires_grad_(not wrt_input)
                p.grad = None
            xi = tx.clone().requires_grad_(wrt_input)
            torch.sigmoid(tmodel(xi)).mean().backward()

        return fn

    timed = {f"jax {n}": (lambda f=f: jax.block_until_ready(f(params, x))) for n, f in jfns.items()}
    timed.update(
        {
            "torch forward": t_forward,
            "torch input grads": t_grad(True),
            "torch param grads": t_grad(False),
        }
    )
    res = _time(timed, reps)
    for p in tmodel.parameters():
        p.requires_grad_(True)
    out = {fw: {n: 1e3 * res[f"{fw} {n}"]["median"] for n in jfns} for fw in ("jax", "torch")}
    for fw in out:
        out[fw]["weight grads (param - input)"] = out[fw]["param grads"] - out[fw]["input grads"]
    return out


NOT_XLA = ("openblas_flat9", "torch")


def format_tables(breakdown: dict, layers: list[dict]) -> str:
    lines = ["| step part (ms) | unet_jax | PyTorch | ratio |", "|---|---:|---:|---:|"]
    for n in breakdown["jax"]:
        j, t = breakdown["jax"][n], breakdown["torch"][n]
        lines.append(f"| {n} | {j:.0f} | {t:.0f} | {j / t:.2f}x |")
    names = list(layers[0]["ms"])
    lines += [
        "",
        "| conv input = output (N, H, W, C) | " + " | ".join(names) + " | best XLA / torch |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for r in layers:
        best = min(v for n, v in r["ms"].items() if n not in NOT_XLA)
        lines.append(
            f"| {tuple(r['shape'])} | "
            + " | ".join(f"{r['ms'][n]:.1f}" for n in names)
            + f" | {best / r['ms']['torch']:.2f}x |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    """Run both measurements; returns the JSON-able result."""
    before = machine_info()
    log(
        f"conv_grad: batch {args.batch}, {args.image_size}x{args.image_size}, features "
        f"{args.features}, {args.reps} reps"
    )
    breakdown = step_breakdown(args.batch, args.image_size, args.features, args.reps)
    layers = layer_table(args.batch, args.image_size, args.features, args.levels, args.reps, log)
    table = format_tables(breakdown, layers)
    log("")
    log(f"machine: {format_machine(before)}")
    log(f"median of {args.reps} alternating repetitions; float32 on the CPU")
    log("")
    log(table)
    return {
        "benchmark": "conv_grad",
        "command": command,
        "args": vars(args),
        "machine": before,
        "breakdown_ms": breakdown,
        "layers": layers,
        "table": table,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, run, print the tables, optionally write JSON (``--out``)."""
    return run_cli("benchmarks.conv_grad", build_parser, run, argv)


if __name__ == "__main__":
    main()
