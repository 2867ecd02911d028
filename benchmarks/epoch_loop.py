"""One epoch as one dispatch (``lax.scan``) against one dispatch per step, side by side.

``Config.epoch_loop`` chooses between them (``auto``: the loop on accelerators, steps on the
CPU); this script measures what that choice is based on. Both variants train the same Trainer
setup on the same synthetic split; after a compile-and-warm-up epoch each, epochs alternate
(device loop, host steps, device loop, ...) so both see the same background load; medians.

    python -m benchmarks.epoch_loop --image-size 64 --features 8 --batch 8 --reps 5
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
    add_small_setup_args(p, reps=5)
    return p


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    import jax

    from unet_jax.train_steps import Trainer

    info = machine_info()
    log(format_machine(info))
    log(f"command: {command}")
    cfg, mesh, data = small_resident_setup(args, "epoch_loop")

    def trainer() -> Trainer:
        return Trainer(cfg, data, mesh)

    loop, steps = trainer(), trainer()
    n = loop.steps_per_epoch

    def epoch_loop() -> None:
        jax.block_until_ready(loop.train_steps(n))

    def epoch_steps() -> None:
        jax.block_until_ready([steps.train_step() for _ in range(n)])

    variants = {"device loop (lax.scan)": epoch_loop, "host steps": epoch_steps}
    first = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    host = statistics.median(times["host steps"])
    lines = [
        f"{n} steps per epoch, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"features {args.features}; {jax.devices()[0].device_kind}",
        "| variant | first epoch s (compile) | epoch s, median (min-max) | vs host steps |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(
            f"| {name} | {first[name]:.2f} | {med:.3f} ({min(values):.3f}-{max(values):.3f}) "
            f"| {med / host:.2f}x |"
        )
    table = "\n".join(lines)
    log(table)
    return {"machine": info, "command": command, "times": times, "first": first, "table": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli("benchmarks.epoch_loop", build_parser, run, argv)


if __name__ == "__main__":
    main()
