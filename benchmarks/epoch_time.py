"""Epoch time, side by side: the PyTorch baseline, tuned PyTorch and unet_jax.

On the same data, batch size and image size, in one run, with alternating repetitions:

1. ``baseline``: the PyTorch baseline as the report ran it (``benchmarks/torch_baseline``: fp32,
   NCHW, DataLoader with 0 workers, per-example scikit-image augmentation and lesion-weighted
   sampling, ``loss.item()`` every step);
2. ``torch_tuned``: the same with channels_last, autocast (bf16; fp16 + GradScaler on CUDA without
   bf16), ``--tuned-workers`` DataLoader workers, the losses fetched once at the end instead of
   every step, and on CUDA pinned memory and cuDNN autotuning;
3. ``unet_jax``: the device-resident pipeline and the real ``unet_jax.train_steps.Trainer`` step.

Reported for each, median of the repetitions with the spread (min-max):

* data-pipeline examples/s — baseline/tuned: iterating the DataLoader alone; unet_jax: the jitted
  ``ResidentData.train_batch`` (gather, normalise, [resize], augment);
* train-step examples/s, data excluded — a step on one fixed pre-made batch (unet_jax: the
  Trainer's own jitted, donated step with the batch function replaced by the fixed batch);
* train-step examples/s, data included — baseline/tuned: the loop pulling from the DataLoader;
  unet_jax: ``Trainer.train_step()`` with sampling and augmentation inside the jitted step;
* projected epoch time for the real training split: 3,336 / (examples/s, data included);
* peak memory — CPU: the peak RSS of the variant's own worker process over its RSS before it
  loaded any data (DataLoader workers' peaks in the JSON); GPU: ``torch.cuda.max_memory_allocated``
  / JAX ``memory_stats()['peak_bytes_in_use']``;
* the ratios to unet_jax (unet_jax's examples/s over the variant's; > 1 means unet_jax is faster);
* on a GPU also the achieved TFLOP/s and model FLOP utilisation, from FLOPs counted here.

Image size: the data is stored at 256x256. Below that, both frameworks resize every example on
the fly before augmenting: unet_jax on device inside its step (anti-aliased linear, masks
thresholded at 0.5), PyTorch with scikit-image's anti-aliased linear ``resize`` in the Dataset
(:class:`benchmarks.runners.ResizePair`), so both pay for it.

Each variant lives in its own worker process (memory is attributable, DataLoader workers fork
safely, and only one variant computes at a time). Usage::

    # 2-core CPU, a few minutes
    python -m benchmarks.epoch_time --data_dir /tmp/lead/tfds --device cpu \\
        --image-size 128 --features 32 --batch 16 --steps 5 --reps 3 --out epoch_cpu.json
    # GPU, full size (benchmarks/gpu_run.sh runs this at batch 16 and 32, and full_epoch.py)
    JAX_PLATFORMS=cpu python -m benchmarks.epoch_time --data_dir DIR --device gpu --steps 20 \
        --reps 3 --tuned-workers 8

``JAX_PLATFORMS=cpu`` keeps this parent process (which never computes) off the GPU; the unet_jax
worker is started with ``JAX_PLATFORMS=cuda`` and a memory fraction of 0.45, as the two frameworks
share the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from benchmarks.cli import add_data_args, data_from_args, resize_note, run_cli
from benchmarks.data import REAL_TRAIN_EXAMPLES
from benchmarks.flops import peak_tflops, training_flops_per_example, unet_forward_flops
from benchmarks.machine import fmt_summary, format_machine, machine_info, summarize
from benchmarks.runners import examples_needed
from benchmarks.workers import round_robin, started

VARIANTS = ("baseline", "torch_tuned", "unet_jax")
TASKS = ("data", "step_fixed", "step_data")
TASK_TITLES = {
    "data": "data pipeline ex/s",
    "step_fixed": "train ex/s, data excluded",
    "step_data": "train ex/s, data included",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--steps", type=int, default=5, help="steps (batches) per measurement")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--features", type=int, default=32, help="U-Net features of the first level")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {VARIANTS} (unet_jax is always included)",
    )
    p.add_argument("--tuned-workers", type=int, default=2, help="DataLoader workers of torch_tuned")
    p.add_argument(
        "--jax-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="unet_jax compute dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for model FLOP utilisation (default: from a table "
        "of dense bf16 peaks by GPU name)",
    )
    add_data_args(p)
    return p


def variant_specs(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{variant: (runner kind, runner kwargs)}`` for the requested variants."""
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {VARIANTS}")
    if "unet_jax" not in names:
        names.append("unet_jax")
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    # Spawned (not forked) DataLoader workers when JAX runs in the same process.
    ctx = "spawn" if args.inprocess else None
    common = dict(image_size=args.image_size, features=args.features, seed=args.seed)
    specs = {
        "baseline": (
            "torch",
            dict(
                batch=args.batch,
                tuned=False,
                workers=0,
                device=torch_device,
                mp_context=ctx,
                **common,
            ),
        ),
        "torch_tuned": (
            "torch",
            dict(
                batch=args.batch,
                tuned=True,
                workers=args.tuned_workers,
                device=torch_device,
                mp_context=ctx,
                **common,
            ),
        ),
        "unet_jax": ("jax", dict(batch_sizes=[args.batch], dtype=args.jax_dtype, **common)),
    }
    return {n: specs[n] for n in VARIANTS if n in names}


def worker_env(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Per-variant environment of the worker processes."""
    if args.device == "gpu":
        # Two frameworks share the GPU: keep JAX from preallocating most of its memory.
        jax_env = {
            "JAX_PLATFORMS": "cuda",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get(
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45"
            ),
        }
    else:
        jax_env = {"JAX_PLATFORMS": "cpu"}
    return {"unet_jax": jax_env}


def analyse(
    per_task: dict[str, dict[str, list[dict[str, Any]]]],
    infos: dict[str, dict],
    memory: dict[str, dict],
    *,
    train_examples: int,
    flops_per_example: float,
    peak: float | None,
    gpu: bool,
) -> list[dict[str, Any]]:
    """Per-variant result rows (medians, spreads, epoch projection, memory, ratios, TFLOP/s).

    ``per_task[variant][task]`` holds the raw results of every repetition.
    """
    rows = []
    for name, tasks in per_task.items():
        row: dict[str, Any] = {"variant": name, "info": infos[name], "memory": memory[name]}
        for task in TASKS:
            row[task] = summarize([r["examples_per_s"] for r in tasks[task]])
        row["epoch_s"] = summarize(
            [train_examples / r["examples_per_s"] for r in tasks["step_data"]]
        )
        startups = [r["startup_s"] for r in tasks["step_data"] if "startup_s" in r]
        row["loader_startup_s"] = summarize(startups) if startups else None
        mem = memory[name]
        row["peak_mem_mb"] = mem.get("device_peak_mb") if gpu else mem.get("peak_rss_delta_mb")
        row["mem_kind"] = "device peak" if gpu else "peak RSS delta"
        tf = {}
        for task in ("step_fixed", "step_data"):
            tflops = row[task]["median"] * flops_per_example / 1e12
            tf[task] = {"tflops": tflops, "mfu": tflops / peak if peak else None}
        row["achieved"] = tf
        rows.append(row)
    ref = next(r for r in rows if r["variant"] == "unet_jax")
    for row in rows:
        row["ratio_unet_jax"] = {t: ref[t]["median"] / row[t]["median"] for t in TASKS}
        row["ratio_unet_jax"]["epoch"] = row["epoch_s"]["median"] / ref["epoch_s"]["median"]
        if row["peak_mem_mb"] and ref["peak_mem_mb"]:
            row["ratio_unet_jax"]["memory"] = row["peak_mem_mb"] / ref["peak_mem_mb"]
    return rows


def format_table(rows: list[dict[str, Any]], train_examples: int, gpu: bool) -> str:
    """The markdown table of :func:`analyse`'s rows."""
    mem_title = "peak GPU mem MiB" if gpu else "peak RSS delta MiB"
    head = (
        ["variant"]
        + [TASK_TITLES[t] for t in TASKS]
        + [f"epoch s ({train_examples:,} ex)", mem_title, "unet_jax speed-up: data / excl. / incl."]
    )
    if gpu:
        head += ["TFLOP/s excl. / incl.", "MFU excl. / incl."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        ratios = r["ratio_unet_jax"]
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        cells = (
            [f"`{r['variant']}`"]
            + [fmt_summary(r[t]) for t in TASKS]
            + [fmt_summary(r["epoch_s"]), mem, " / ".join(f"{ratios[t]:.2f}x" for t in TASKS)]
        )
        if gpu:
            a = r["achieved"]
            cells.append(f"{a['step_fixed']['tflops']:.1f} / {a['step_data']['tflops']:.1f}")
            cells.append(
                " / ".join(
                    "-" if a[t]["mfu"] is None else f"{100 * a[t]['mfu']:.1f}%"
                    for t in ("step_fixed", "step_data")
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns the JSON-able result."""
    if args.jax_dtype is None:
        args.jax_dtype = "bfloat16" if args.device == "gpu" else "float32"
    before = machine_info()
    split, data_label = data_from_args(args)
    real = not data_label.startswith("SYNTHETIC")
    train_examples = split.num_examples if real and args.patients is None else REAL_TRAIN_EXAMPLES
    resize = resize_note(split.images.shape[1], args.image_size, "frameworks")
    log(
        f"epoch_time: device {args.device}, batch {args.batch}, {args.image_size}x{args.image_size}"
        f" ({resize}), features {args.features}, {args.steps} steps x {args.reps} reps"
    )
    log(f"data: {data_label}")
    specs = variant_specs(args)
    # Each measurement is `steps` batches after max(1, workers) start-up batches of a fresh
    # DataLoader iterator, all within one epoch of the loader.
    need = examples_needed(args.steps, args.tuned_workers, args.batch)
    if need > split.num_examples:
        raise SystemExit(
            f"{split.num_examples} examples are fewer than the {need} one measurement "
            "needs: use fewer --steps or more data"
        )
    tasks = [(name, {"task": task, "steps": args.steps}) for task in TASKS for name in specs]
    with started(specs, split, inprocess=args.inprocess, env=worker_env(args), log=log) as handles:
        del split  # the workers hold their own copies
        results = round_robin(handles, tasks, args.reps, log=log)
        infos = {n: h.info for n, h in handles.items()}
        memory = {n: h.finish() for n, h in handles.items()}
    per_task: dict[str, dict[str, list]] = {n: {} for n in specs}
    for i, (name, kw) in enumerate(tasks):
        per_task[name][kw["task"]] = results[i]
    for name, tasks_ in per_task.items():
        for t, rs in tasks_.items():
            losses = [r["loss"] for r in rs if "loss" in r]
            if not all(math.isfinite(x) for x in losses):
                raise RuntimeError(f"{name} {t}: non-finite training loss {losses}")

    flops_fwd = unet_forward_flops(args.features, args.image_size)
    flops_train = training_flops_per_example(args.features, args.image_size)
    jax_info = infos["unet_jax"]
    gpu = args.device == "gpu"
    peak = args.peak_tflops or (peak_tflops(jax_info.get("device_kind")) if gpu else None)
    rows = analyse(
        per_task,
        infos,
        memory,
        train_examples=train_examples,
        flops_per_example=flops_train,
        peak=peak,
        gpu=gpu,
    )
    after = machine_info()
    flops = {
        "analytic_forward_per_example": flops_fwd,
        "analytic_training_per_example (3x forward)": flops_train,
        **(jax_info.get("flops") or {}),
    }
    table = format_table(rows, train_examples, gpu)
    xf = flops.get("xla_forward_per_example")
    xt = flops.get("xla_train_step_per_example")
    log("")
    log(f"machine: {format_machine(before)}")
    log(f"load average after: {after['loadavg']}")
    log(
        f"data: {data_label}; image {args.image_size} ({resize}); batch {args.batch}; "
        f"features {args.features}; unet_jax dtype {args.jax_dtype}; torch_tuned workers "
        f"{args.tuned_workers}"
    )
    log(
        f"FLOPs per example: analytic forward {flops_fwd / 1e9:.3f} G, training (3x) "
        f"{flops_train / 1e9:.3f} G; XLA cost analysis: forward "
        f"{'-' if xf is None else f'{xf / 1e9:.3f} G'}, whole train step "
        f"{'-' if xt is None else f'{xt / 1e9:.3f} G'}"
    )
    if gpu:
        log(
            f"peak for MFU: {peak} TFLOP/s ({'--peak-tflops' if args.peak_tflops else 'table'}, "
            f"device {jax_info.get('device_kind')})"
        )
    if not gpu and not all(m.get("attributable") for m in memory.values()):
        log(
            "note: --inprocess: every variant shares one process, so its peak RSS is not "
            "attributable to a variant"
        )
    log(f"median (min-max) of {args.reps} alternating repetitions of {args.steps} steps:")
    log("")
    log(table)
    return {
        "benchmark": "epoch_time",
        "command": command,
        "args": vars(args),
        "machine": before,
        "loadavg_after": after["loadavg"],
        "data": data_label,
        "resize": resize,
        "train_examples": train_examples,
        "flops": flops,
        "peak_tflops": peak,
        "results": rows,
        "raw": per_task,
        "table": table,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, run, print the table, optionally write JSON (``--out``)."""
    return run_cli("benchmarks.epoch_time", build_parser, run, argv)


if __name__ == "__main__":
    main()
