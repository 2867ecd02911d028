"""Whole experiments end to end: the wall time a user waits, from the command to the finished
report, with a cold and a warm compilation cache.

``benchmarks/full_epoch.py`` measures epochs inside one run; this script runs the product's
command, ``python -m experiments.run --exp=NAME``, as a user does (a fresh process, the data set
read, every run of the experiment trained, evaluated, checkpointed and reported, the comparison
of a multi-run experiment written) and measures its wall time. Each experiment runs twice: with
an empty persistent compilation cache (cold) and again with the cache the first run filled
(warm, ``--restart``). The time is split using the runs' own accounts (``metrics.jsonl``'s
summary ``seconds``): compile, the visible cost of evaluations and checkpoints (main-thread time
for them; their work overlaps training on a worker thread), training (the rest of the
``train_and_evaluate`` calls), and outside training (process start, imports, reading the data
set, reports: the wall time minus the calls).

Data: the real ``baseline`` data set from ``--data_dir``, else a synthetic one in the Kaggle
layout (``--synthetic patients,min_slices,max_slices``, default of the real data's size: 110
patients of 20 to 48 slices) built once into the work folder.

Usage::

    python -m benchmarks.full_run --exp baseline --exp run1 --exp ablation --exp cv5   # GPU
    python -m benchmarks.full_run --exp run1 --synthetic 10,6,8 \\
        --set image_size=32 --set features=4 --set epochs=2                           # CPU, small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import run_cli
from benchmarks.machine import format_machine, machine_info

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--exp", action="append", default=[], help="experiment (repeatable)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field of every run (repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="RUN",
        help="sub-runs of multi-run experiments (repeatable; as experiments.run)",
    )
    p.add_argument("--data_dir", default=None, help="built TFDS data dir (else synthetic)")
    p.add_argument(
        "--synthetic", default="110,20,48", help="synthetic data: patients,min_slices,max_slices"
    )
    p.add_argument(
        "--synthetic_dir",
        default=None,
        help="build the synthetic data set here once; reuse it where it is already built",
    )
    p.add_argument(
        "--caches",
        default="cold,warm",
        help="which runs: cold (empty compilation cache), warm (the filled one)",
    )
    p.add_argument("--workdir", default=None, help="where runs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def _summaries(workdir: Path) -> list[dict[str, Any]]:
    """The summary records of every run under ``workdir`` (one, or one per sub-run)."""
    out = []
    for metrics in sorted(workdir.rglob("metrics.jsonl")):
        records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        out += [r for r in records if r.get("type") == "summary"][-1:]
    return out


def _run(exp: str, args, data_dir: Path, workdir: Path, cache: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        f"--exp={exp}",
        "--data_dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        "--compile_cache",
        str(cache),
        "--restart",
    ]
    cmd += [f"--set={s}" for s in args.set] + [f"--only={o}" for o in args.only]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs = _summaries(workdir)
    seconds = [r.get("seconds", {}) for r in runs]

    def total(key: str) -> float:
        return sum(s.get(key, 0.0) for s in seconds)

    in_calls = total("total")
    visible = total("epoch_end_visible")
    return {
        "exp": exp,
        "runs": len(runs),
        "wall_s": wall,
        "compile_s": total("compile"),
        "train_s": in_calls - total("compile") - visible,
        "eval_ckpt_visible_s": visible,
        "eval_ckpt_background_s": total("epoch_end_background"),
        "outside_training_s": wall - in_calls,
        "epochs": sum(int(r.get("epochs", 0)) for r in runs),
        "best_val_dsc": [r.get("best_val_dsc") for r in runs],
    }


def _synthetic_data(root: Path, spec: str) -> Path:
    from datasets.lgg_mri_segmentation import build
    from unet_jax.data import is_built
    from unet_jax.synthetic import write_synthetic_kaggle3m

    data_dir = root / spec.replace(",", "_") / "tfds"
    if not is_built(data_dir, "baseline"):
        patients, low, high = (int(x) for x in spec.split(","))
        manual = data_dir.parent / "manual"
        write_synthetic_kaggle3m(manual, num_patients=patients, slices=(low, high), seed=0)
        build(manual, data_dir, "baseline")
    return data_dir


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| experiment | cache | runs | epochs | wall s | compile s | train s "
        "| eval+ckpt visible s | per epoch s | eval+ckpt background s | outside training s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_epoch = r["eval_ckpt_visible_s"] / max(r["epochs"], 1)
        lines.append(
            f"| {r['exp']} | {r['cache']} | {r['runs']} | {r['epochs']} | {r['wall_s']:.1f} "
            f"| {r['compile_s']:.1f} | {r['train_s']:.1f} | {r['eval_ckpt_visible_s']:.2f} "
            f"| {per_epoch:.3f} | {r['eval_ckpt_background_s']:.1f} "
            f"| {r['outside_training_s']:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    info = machine_info()
    log(format_machine(info))
    log(f"command: {command}")
    with tempfile.TemporaryDirectory(prefix="unet_jax_full_run_") as tmp:
        root = Path(args.workdir or tmp)
        if args.data_dir:
            data_dir, label = Path(args.data_dir), f"real data in {args.data_dir}"
        else:
            data_dir = _synthetic_data(Path(args.synthetic_dir or root / "data"), args.synthetic)
            label = f"SYNTHETIC data ({args.synthetic}: patients,min_slices,max_slices)"
        log(f"data: {label}")
        rows = []
        for exp in args.exp or ["run1"]:
            cache = root / f"xla_cache_{exp}"
            for kind in args.caches.split(","):
                row = _run(exp, args, data_dir, root / "runs" / exp, cache)
                row["cache"] = kind
                rows.append(row)
                log(f"  {exp} ({kind}): {row['wall_s']:.1f} s")
    table = format_table(rows)
    log(table)
    return {"machine": info, "command": command, "data": label, "rows": rows, "table": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_cli("benchmarks.full_run", build_parser, run, argv)


if __name__ == "__main__":
    main()
