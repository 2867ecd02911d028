"""Input-pipeline throughput: unet_jax's on-device pipeline vs the baseline's per-example path.

Measures examples/s, on the same data and machine, in one run with alternating repetitions:

* ``unet_jax``: ``ResidentData.train_batch`` jitted — lesion-weighted sampling, gather from the
  device-resident uint8 split, per-volume normalisation, [resize], and the baseline's random
  scale / rotation / flip as one affine warp — each batch to ``block_until_ready``; at every
  ``--batch-sizes`` entry.
* ``baseline``: the PyTorch baseline's path (``benchmarks/torch_baseline/data.py``:
  ``BaselineDataset`` over float32 volumes with lesion-weighted sampling and per-example
  scikit-image Scale, Rotate, HorizontalFlip, batched by its ``DataLoader``) at every
  ``--workers`` entry and batch size. A fresh DataLoader iterator per measurement; its start-up
  and first ``max(1, workers)`` batches are not timed (see ``benchmarks/runners.py``).

Prints a markdown table (median and min-max of the repetitions) and the speed-up of unet_jax over
the baseline with 0 workers (the report's setting) and with the most workers; ``--out`` writes
JSON. Each pipeline runs in its own worker process. Usage::

    python -m benchmarks.input_pipeline --data_dir /tmp/lead/tfds --batch-sizes 16,32 \\
        --workers 0,2 --reps 3 --out input_pipeline.json
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.cli import add_data_args, data_from_args, resize_note, run_cli
from benchmarks.machine import fmt_summary, format_machine, machine_info, summarize
from benchmarks.runners import AUG, examples_needed
from benchmarks.workers import round_robin, started

#: The goal: unet_jax at least this many times the baseline's 0-worker throughput.
GOAL_SPEEDUP = 20.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="output size (default: the stored size, 256; smaller sizes are resized "
        "on the fly by both pipelines)",
    )
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--workers", default="0,2", help="baseline DataLoader worker counts")
    p.add_argument("--steps", type=int, default=20, help="unet_jax batches per measurement")
    p.add_argument(
        "--baseline-steps",
        type=int,
        default=4,
        help="baseline batches per measurement (it is ~30x slower)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--pipelines",
        default="unet_jax,baseline",
        help="comma-separated subset of unet_jax,baseline",
    )
    add_data_args(p)
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def analyse(
    tasks: list[tuple[str, dict[str, Any]]], results: dict[int, list[dict]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (one per pipeline setting) and speed-ups (unet_jax over each baseline setting at the
    same batch size, ratio of medians)."""
    rows = []
    for i, (name, kw) in enumerate(tasks):
        rows.append(
            {
                "pipeline": name,
                "batch": kw["batch"],
                "workers": kw.get("workers"),
                "examples_per_s": summarize([r["examples_per_s"] for r in results[i]]),
                "startup_s": (
                    summarize([r["startup_s"] for r in results[i]])
                    if "startup_s" in results[i][0]
                    else None
                ),
            }
        )
    speedups = []
    for ours in (r for r in rows if r["pipeline"] == "unet_jax"):
        for base in (
            r for r in rows if r["pipeline"] == "baseline" and r["batch"] == ours["batch"]
        ):
            speedups.append(
                {
                    "batch": ours["batch"],
                    "baseline_workers": base["workers"],
                    "speedup": ours["examples_per_s"]["median"] / base["examples_per_s"]["median"],
                }
            )
    return rows, speedups


def format_table(rows: list[dict[str, Any]], speedups: list[dict[str, Any]]) -> str:
    lines = [
        "| pipeline | batch | DataLoader workers | examples/s | start-up s (untimed) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = "-" if r["workers"] is None else str(r["workers"])
        lines.append(
            f"| `{r['pipeline']}` | {r['batch']} | {w} | "
            f"{fmt_summary(r['examples_per_s'])} | "
            f"{fmt_summary(r['startup_s'], 2)} |"
        )
    if speedups:
        lines += [
            "",
            "| batch | unet_jax / baseline with 0 workers | unet_jax / baseline with N workers |",
            "|---:|---:|---:|",
        ]
        for b in sorted({s["batch"] for s in speedups}):
            mine = sorted(
                (s for s in speedups if s["batch"] == b), key=lambda s: s["baseline_workers"]
            )
            w0 = next((s for s in mine if s["baseline_workers"] == 0), None)
            wn = mine[-1]
            w0_text = "-" if w0 is None else f"{w0['speedup']:.1f}x"
            lines.append(f"| {b} | {w0_text} | {wn['speedup']:.1f}x (N={wn['baseline_workers']}) |")
    return "\n".join(lines)


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns the JSON-able result."""
    before = machine_info()
    split, data_label = data_from_args(args)
    stored = split.images.shape[1]
    size = args.image_size or stored
    resize = resize_note(stored, size, "pipelines")
    batches, workers = _ints(args.batch_sizes), _ints(args.workers)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    if not pipelines or set(pipelines) - {"unet_jax", "baseline"}:
        raise SystemExit(f"--pipelines must name unet_jax and/or baseline, got {args.pipelines!r}")
    log(
        f"input_pipeline: {size}x{size} ({resize}), batch sizes {batches}, baseline workers "
        f"{workers}, {args.reps} reps"
    )
    log(f"data: {data_label}")
    ctx = "spawn" if args.inprocess else None
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    tasks: list[tuple[str, dict[str, Any]]] = []
    if "unet_jax" in pipelines:
        specs["unet_jax"] = (
            "jax",
            dict(batch_sizes=batches, image_size=size, seed=args.seed, build_trainer=False),
        )
        tasks += [("unet_jax", {"task": "data", "steps": args.steps, "batch": b}) for b in batches]
    if "baseline" in pipelines:
        need = examples_needed(args.baseline_steps, max(workers, default=0), max(batches))
        if need > split.num_examples:
            raise SystemExit(
                f"{split.num_examples} examples are fewer than the {need} one "
                "baseline measurement needs: fewer --baseline-steps or more data"
            )
        specs["baseline"] = (
            "torch",
            dict(
                batch=batches[0], image_size=size, seed=args.seed, build_model=False, mp_context=ctx
            ),
        )
        tasks += [
            ("baseline", {"task": "data", "steps": args.baseline_steps, "batch": b, "workers": w})
            for w in workers
            for b in batches
        ]
    env = {"unet_jax": {"JAX_PLATFORMS": "cpu"}}
    with started(specs, split, inprocess=args.inprocess, env=env, log=log) as handles:
        del split
        results = round_robin(handles, tasks, args.reps, log=log)
        infos = {n: h.info for n, h in handles.items()}
        for h in handles.values():
            h.finish()
    rows, speedups = analyse(tasks, results)
    after = machine_info()
    table = format_table(rows, speedups)
    w0 = [s["speedup"] for s in speedups if s["baseline_workers"] == 0]
    goal = (
        f"goal (>= {GOAL_SPEEDUP:.0f}x the baseline with 0 workers): "
        + ("met" if w0 and min(w0) >= GOAL_SPEEDUP else "NOT met")
        + f" (min {min(w0):.1f}x)"
        if w0
        else "goal: not evaluated (needs both pipelines and 0 workers)"
    )
    log("")
    log(f"machine: {format_machine(before)}")
    log(f"load average after: {after['loadavg']}")
    log(
        f"data: {data_label}; output {size}x{size} ({resize}); augmentation scale {AUG[0]},"
        f" angle {AUG[1]}, flip {AUG[2]}; jax device "
        f"{infos.get('unet_jax', {}).get('device', '-')}"
    )
    log(
        f"median (min-max) of {args.reps} alternating repetitions; unet_jax {args.steps} batches, "
        f"baseline {args.baseline_steps} batches per measurement:"
    )
    log("")
    log(table)
    log("")
    log(goal)
    return {
        "benchmark": "input_pipeline",
        "command": command,
        "args": vars(args),
        "machine": before,
        "loadavg_after": after["loadavg"],
        "data": data_label,
        "image_size": size,
        "resize": resize,
        "infos": infos,
        "results": rows,
        "speedups": speedups,
        "goal": goal,
        "table": table,
        "raw": {str(i): results[i] for i in results},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, run, print the table, optionally write JSON (``--out``)."""
    return run_cli("benchmarks.input_pipeline", build_parser, run, argv)


if __name__ == "__main__":
    main()
