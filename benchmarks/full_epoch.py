"""Measured epochs of the real training loop, end to end.

``benchmarks/epoch_time.py`` times steps and *projects* an epoch; this script runs the product's
own ``unet_jax.train.train_and_evaluate`` for a few epochs and *measures* them: the jitted steps
with on-device sampling and augmentation, the host loop and its loss logging, and in the last two
epochs the evaluation of the validation split and the Orbax checkpoint. Only those two epochs
evaluate (``eval_every_epochs`` = ``--epochs`` - 1), so: epoch 1 = training + compilation; epochs
2 .. E-2 = pure training; epoch E-1 adds the first evaluation (with its compilation) and a
checkpoint; epoch E adds a steady-state evaluation and checkpoint.

Reported: epoch 1, the median (min-max) of the pure training epochs, the last epoch, and
evaluation + checkpoint as the last epoch minus that median; images/s of the training epochs; the
projection of the whole recipe (``config.epochs`` epochs, evaluating every
``config.eval_every_epochs``) from these numbers.

Data: the real ``baseline`` splits from ``--data_dir`` when built there, else synthetic splits of
the real sizes (100 x 33 = 3,300 training and 10 x 33 = 330 validation slices of 256x256; the
step's cost does not depend on the pixel values).

Usage::

    python -m benchmarks.full_epoch --exp baseline --epochs 5               # synthetic, full size
    python -m benchmarks.full_epoch --exp baseline --data_dir D --epochs 5  # real data
    python -m benchmarks.full_epoch --exp smoke --epochs 4 --set batch_size=8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import run_cli
from benchmarks.data import synthetic_reason
from benchmarks.machine import fmt_summary, format_machine, machine_info, summarize
from unet_jax.synthetic import disc_split


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--exp", default="baseline", help="experiment whose config is run")
    p.add_argument("--epochs", type=int, default=5, help="epochs to run (>= 4)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    p.add_argument(
        "--data_dir",
        "--data-dir",
        dest="data_dir",
        default=None,
        help="TFDS data dir holding lgg_mri_segmentation/baseline (else synthetic)",
    )
    p.add_argument(
        "--synthetic",
        default="100,10,33,256",
        help="synthetic fallback: train patients,validation patients,slices,size",
    )
    p.add_argument("--workdir", default=None, help="run directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def load_splits(config, data_dir: str | None, synthetic: tuple[int, int, int, int]):
    """``(train, validation, label)``: the real splits the config names, else synthetic ones."""
    from unet_jax.data import is_built, load_data

    if data_dir and is_built(Path(data_dir), config.dataset_config):
        train, val = load_data(config, data_dir)
        return train, val, f"real data: {config.dataset_config} from {data_dir}"
    n_train, n_val, slices, size = synthetic
    train = disc_split(n_train, slices, size, seed=0)
    val = disc_split(n_val, slices, size, seed=1)
    why = synthetic_reason(data_dir)
    return (
        train,
        val,
        (
            f"SYNTHETIC data ({why}): {n_train} + {n_val} patients x {slices} slices "
            f"of {size}x{size}"
        ),
    )


def summarise(
    epoch_ends: list[float],
    t0: float,
    *,
    steps_per_epoch: int,
    batch: int,
    recipe_epochs: int,
    eval_every: int,
) -> dict[str, Any]:
    """Per-epoch walls from the epoch-end times and what they imply for the whole recipe."""
    walls = [b - a for a, b in zip([t0] + epoch_ends[:-1], epoch_ends)]
    if len(walls) < 4:
        raise ValueError(f"need >= 4 epochs (compile, training, 2 evaluated), got {len(walls)}")
    train_s = summarize(walls[1:-2])
    train_med = train_s["median"]
    eval_ckpt = walls[-1] - train_med
    n_evals = sum(
        1 for e in range(1, recipe_epochs + 1) if e % eval_every == 0 or e == recipe_epochs
    )
    return {
        "epoch_walls_s": walls,
        "first_epoch_s": walls[0],
        "train_epoch_s": train_s,
        "first_eval_epoch_s": walls[-2],
        "last_epoch_s": walls[-1],
        "eval_and_checkpoint_s": eval_ckpt,
        "train_images_per_s": steps_per_epoch * batch / train_med,
        "recipe_projection_s": walls[0]
        + (recipe_epochs - 1) * train_med
        + n_evals * max(eval_ckpt, 0.0),
    }


def run(args: argparse.Namespace, log=print, command: str = "") -> dict[str, Any]:
    """Run the measurement described by parsed ``args``; returns the JSON-able result."""
    import jax

    from experiments import configs
    from unet_jax.config import override
    from unet_jax.input_pipeline import SamplerSpec
    from unet_jax.train import train_and_evaluate

    if args.epochs < 4:
        raise SystemExit("--epochs must be >= 4 (compile epoch, training epochs, 2 evaluated)")
    runs = configs.get_configs(args.exp)
    if len(runs) != 1:
        raise SystemExit(
            f"--exp {args.exp} has several runs ({', '.join(runs)}); pick a single one"
        )
    recipe = next(iter(runs.values()))
    changes = dict(item.split("=", 1) for item in args.set)
    recipe = override(recipe, changes)
    config = override(
        recipe, {"epochs": str(args.epochs), "eval_every_epochs": str(args.epochs - 1)}
    )
    synthetic = tuple(int(x) for x in args.synthetic.split(","))
    before = machine_info()
    with tempfile.TemporaryDirectory(prefix="unet_jax_full_epoch_") as tmp:
        workdir = Path(args.workdir or tmp)
        train, val, label = load_splits(config, args.data_dir, synthetic)
        log(
            f"full_epoch: {args.exp}, {args.epochs} epochs, batch {config.batch_size}, "
            f"{config.image_size}x{config.image_size}, features {config.features}, dtype "
            f"{config.dtype}; {jax.device_count()} x {jax.devices()[0].device_kind}"
        )
        log(f"data: {label}; {train.num_examples} train / {val.num_examples} validation slices")
        ends: list[float] = []
        evals: list[dict] = []

        def on_epoch_end(epoch: int, last_eval: dict) -> None:
            ends.append(time.perf_counter())
            if last_eval.get("epoch") == epoch:
                evals.append(last_eval)
            log(
                f"  epoch {epoch}: {ends[-1] - (ends[-2] if len(ends) > 1 else t0):.2f} s"
                + (
                    f", val DSC {last_eval['val_dsc']:.4f}"
                    if last_eval.get("epoch") == epoch
                    else ""
                )
            )

        t0 = time.perf_counter()
        train_and_evaluate(
            config,
            workdir / "run",
            data=(train, val),
            restart=True,
            progress=False,
            on_epoch_end=on_epoch_end,
        )
    # The sampler's own count (floored at 1), as the training loop runs it.
    steps_per_epoch = SamplerSpec(train.num_examples, config.batch_size).steps_per_epoch
    res = summarise(
        ends,
        t0,
        steps_per_epoch=steps_per_epoch,
        batch=config.batch_size,
        recipe_epochs=recipe.epochs,
        eval_every=recipe.eval_every_epochs,
    )
    t = res["train_epoch_s"]
    table = "\n".join(
        [
            "| epoch 1 (compile) s | training epoch s | last epoch (+eval +ckpt) s | eval + ckpt s "
            "| train img/s | recipe projection |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {res['first_epoch_s']:.2f} | {fmt_summary(t, 2)} | {res['last_epoch_s']:.2f} "
            f"| {res['eval_and_checkpoint_s']:.2f} | {res['train_images_per_s']:.0f} "
            f"| {recipe.epochs} epochs: {res['recipe_projection_s'] / 60:.1f} min |",
        ]
    )
    log("")
    log(f"machine: {format_machine(before)}")
    log(
        f"{steps_per_epoch} steps of {config.batch_size} per epoch ({train.num_examples} slices, "
        f"last partial batch dropped); {val.num_examples} validation slices evaluated in the last "
        f"two epochs (the first of them also compiles the evaluation; epoch walls "
        f"{', '.join(f'{w:.2f}' for w in res['epoch_walls_s'])} s)"
    )
    log(table)
    return {
        "benchmark": "full_epoch",
        "command": command,
        "args": vars(args),
        "machine": before,
        "data": label,
        "config": config.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "evals": evals,
        **res,
        "table": table,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, run, print the table, optionally write JSON (``--out``)."""
    return run_cli("benchmarks.full_epoch", build_parser, run, argv)


if __name__ == "__main__":
    main()
