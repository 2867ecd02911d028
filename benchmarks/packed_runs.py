"""Packed runs (several seeds in one program) against the same runs one after another.

``Config.pack_runs`` (``experiments.run --seeds ... --set pack_runs=true``) trains the seeds of a
run side by side (:class:`unet_jax.train_steps.PackedTrainer`); this script measures when that pays.
For each number of runs R it times one epoch of R runs: alone (R trainers, one after another,
each an epoch in one dispatch), packed with ``vmap`` and packed with ``unroll``. After a
compile-and-warm-up epoch each, the variants alternate so they see the same background load;
medians. Throughput is training images per second over all R runs.

    python -m benchmarks.packed_runs --runs 1,2,4 --image-size 64 --features 8 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.cli import run_cli
from benchmarks.data import add_small_setup_args, small_resident_setup
from benchmarks.machine import format_machine, machine_info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="1,2,4", help="numbers of runs to pack, comma-separated")
    add_small_setup_args(p, reps=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default="alone,vmap,unroll")
    return p


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    import jax

    from unet_jax.train_steps import PackedTrainer, Trainer

    info = machine_info()
    log(format_machine(info))
    log(f"command: {command}")
    cfg, mesh, data = small_resident_setup(args, "packed_runs", dtype=args.dtype)
    modes = [m for m in args.modes.split(",") if m]
    counts = [int(r) for r in args.runs.split(",") if r]
    rows, results = [], {}
    for r in counts:
        trainers = {m: [Trainer(cfg.replace(seed=s), data, mesh) for s in range(r)] for m in modes}
        n = trainers[modes[0]][0].steps_per_epoch
        packs = {m: PackedTrainer(trainers[m], m) for m in modes if m != "alone"}

        def epoch(mode: str) -> None:
            if mode == "alone":
                jax.block_until_ready([t.train_steps(n) for t in trainers[mode]])
            else:
                jax.block_until_ready(packs[mode].train_steps(n))

        first = {}
        for m in modes:
            t0 = time.perf_counter()
            epoch(m)
            first[m] = time.perf_counter() - t0
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.reps):
            for m in modes:
                t0 = time.perf_counter()
                epoch(m)
                times[m].append(time.perf_counter() - t0)
        base = statistics.median(times["alone"]) if "alone" in times else None
        for m in modes:
            med = statistics.median(times[m])
            rows.append(
                f"| {r} | {m} | {first[m]:.2f} | {med:.3f} | {r * n * args.batch / med:.0f} | "
                + (f"{base / med:.2f}x |" if base else "— |")
            )
        results[r] = {"first": first, "times": times, "steps_per_epoch": n}
    table = "\n".join(
        [
            f"one epoch of R runs, batch {args.batch} each, {args.image_size}x{args.image_size}, "
            f"features {args.features}, {args.dtype}; {jax.devices()[0].device_kind}",
            "| R | variant | first epoch s (compile) | epoch s, median | images/s | "
            "speed-up vs alone |",
            "|---:|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    log(table)
    return {"machine": info, "command": command, "results": results, "table": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli("benchmarks.packed_runs", build_parser, run, argv)


if __name__ == "__main__":
    main()
