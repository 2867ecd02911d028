"""Evaluate checkpoints on their validation patients, alone or as an ensemble, with or without
test-time augmentation: ``python -m experiments.evaluate``.

    python -m experiments.evaluate --checkpoint RUN [--checkpoint RUN2 ...] [--model NAME ...]
                                   [--step N] [--tta] [--threshold T] [--data_dir D]
                                   [--manual_dir M] [--out DIR]

``RUN`` is a training workdir (its best checkpoint) or a checkpoint folder
(:func:`unet_jax.checkpoint.load_model`); ``NAME`` a packaged model or a ``.safetensors`` model
file (:mod:`unet_jax.pretrained`), evaluated on the validation patients of its config (default
output ``runs/evaluate-<NAME>``). Several checkpoints are an ensemble: their
probabilities are averaged (with ``--tta``, each over the image and its mirror image first), and
they must agree on what shapes the inputs and the output (preprocessing, input size, channels,
and the threshold unless ``--threshold`` sets it: ``unet_jax.predict.check_ensemble``), else
the command stops naming the field. Metrics are those of training's
evaluation: per patient at the stored 256x256 resolution, DSC after the largest 3D component
(the headline), HD95, volume difference.

The patients are the members' validation split, so the members must have been trained on the
same data set (:func:`check_same_data`: ``source``, ``dataset_config``, ``split``, with
``split='fold'`` also ``fold`` and ``num_folds``, and for synthetic data the settings it is
generated from: ``seed``, ``synthetic_patients``, ``synthetic_slices``); otherwise the command
stops in one line naming the two members and the fields (exit 2). An ensemble of the folds of
``cv5`` is therefore not evaluated here (each fold trained on the others' validation patients,
and which fold's patients to score would be arbitrary): the out-of-fold numbers of ``cv5`` are
the fair estimate, and ``python -m unet_jax.predict`` (``--checkpoint
runs/cv5/fold{0,1,2,3,4}``) is where the ensemble of folds is used, on new data.

Writes ``<out>/per_patient.csv`` and ``<out>/summary.json`` (default ``<first run>/evaluate``,
``evaluate-tta``, ``evaluate-ensemble<N>[-tta]``) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Config fields that say which data set, and so which validation patients, a model was trained
#: on: always, with ``split='fold'`` (the folds are deterministic: ``unet_jax.lgg.patient_folds``)
#: and for synthetic data (generated from these: ``experiments.data.synthetic_params``).
DATA_FIELDS = ("source", "dataset_config", "split")
FOLD_FIELDS = ("fold", "num_folds")
SYNTHETIC_FIELDS = ("seed", "synthetic_patients", "synthetic_slices")


def _data_fields(a, b) -> tuple[str, ...]:
    """The fields of :data:`DATA_FIELDS` (and, where both configs use them, of
    :data:`FOLD_FIELDS` and :data:`SYNTHETIC_FIELDS`) that name the data of two configs."""
    fields = DATA_FIELDS
    if a.split == b.split == "fold":
        fields += FOLD_FIELDS
    if a.source == b.source == "synthetic":
        fields += SYNTHETIC_FIELDS
    return fields


def check_same_data(members: Sequence[tuple[str, Any]]) -> None:
    """Refuse an ensemble (``(label, config)`` per member) whose members were trained on
    different data: they are scored on the validation patients of their common data set and
    split, which must then be one (see the module docstring). One line naming the first
    member, the first that differs from it and the fields, as
    :func:`unet_jax.predict.check_ensemble`."""
    from unet_jax.predict import PredictError

    first_label, first = members[0]
    for label, config in members[1:]:
        differ = [
            f"{f} {getattr(first, f)!r} vs {getattr(config, f)!r}"
            for f in _data_fields(first, config)
            if getattr(first, f) != getattr(config, f)
        ]
        if differ:
            raise PredictError(
                f"members {first_label} and {label} were trained on different data "
                f"({', '.join(differ)}); an ensemble is evaluated only on the validation "
                "patients of members trained on the same data set (source, dataset_config, "
                "split, fold and num_folds; for synthetic data also seed, synthetic_patients, "
                "synthetic_slices): use python -m unet_jax.predict to run an ensemble of "
                "folds on new data"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="RUN",
        help="training workdir or checkpoint folder (repeat for an ensemble)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="a packaged model's name or a .safetensors model file (repeat, or add "
        "--checkpoint, for an ensemble)",
    )
    parser.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    parser.add_argument("--tta", action="store_true", help="average over the mirror image too")
    parser.add_argument(
        "--threshold",
        type=float,
        help="probability threshold (default: the checkpoints'; members that differ need it)",
    )
    parser.add_argument("--data_dir", help="TFDS data directory (default: the config's)")
    parser.add_argument("--manual_dir", help="the Kaggle download, if the data is not built")
    parser.add_argument("--out", help="output folder (default: <first RUN>/evaluate[...])")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.model:
        parser.error("give at least one --checkpoint or --model")
    return args


def evaluate_checkpoints(
    paths: list[str | Path],
    *,
    step: int | None = None,
    tta: bool = False,
    threshold: float | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> tuple[dict, list[dict], list[str]]:
    """Per-patient metrics of one checkpoint or an ensemble; returns (summary, rows, notes)."""
    from flax import nnx

    from experiments.data import load_run_data
    from unet_jax import evaluate
    from unet_jax.checkpoint import load_model
    from unet_jax.input_pipeline import make_mesh, validation_data
    from unet_jax.predict import check_ensemble
    from unet_jax.pretrained import is_model_reference

    models, members = [], []
    for path in paths:
        # A model file has no steps: --step applies to the checkpoints of the ensemble.
        model, config, _ = load_model(path, step=None if is_model_reference(path) else step)
        models.append(model)
        members.append((str(path), config))
        # Checked as each member is loaded: a mismatch is reported before the rest are read.
        check_ensemble(members, threshold)  # the same preprocessing, as predict
        check_same_data(members)  # the same validation patients
    config = members[0][1]
    threshold = config.threshold if threshold is None else threshold
    notes: list[str] = []
    changes = {k: v for k, v in (("data_dir", data_dir), ("manual_dir", manual_dir)) if v}
    first = Path(paths[0])
    workdir = first if (first / "config.json").is_file() else first.parent
    _, val_split = load_run_data(config.replace(**changes), workdir)
    mesh = make_mesh()
    size = None if config.image_size == val_split.images.shape[1] else config.image_size
    val = validation_data(val_split, mesh, config.batch_size, config.sampling, size)
    graphdef, *_ = nnx.split(models[0], nnx.Param, nnx.BatchStat)
    variables = [nnx.split(m, nnx.Param, nnx.BatchStat)[1:] for m in models]

    def apply_fn(v, x):
        return nnx.merge(graphdef, *v, copy=True)(x)

    ensemble = len(models) > 1
    step_fn = evaluate.make_predict_step(apply_fn, val, threshold, tta, ensemble)
    out = evaluate.predict_split(step_fn, variables if ensemble else variables[0], val)
    rows = evaluate.per_volume(out["pred"], evaluate.eval_truth(val), val_split, out)
    summary = evaluate.summarize(rows)
    summary.update(checkpoints=[str(p) for p in paths], tta=tta, step=step, threshold=threshold)
    return summary, rows, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from unet_jax import rundir
    from unet_jax.checkpoint import CheckpointError
    from unet_jax.predict import PredictError
    from unet_jax.pretrained import is_model_reference, resolve

    members = args.checkpoint + args.model
    try:
        for name in args.model:  # a --model value is a model, never taken for a checkpoint path
            resolve(name)
        summary, rows, notes = evaluate_checkpoints(
            members,
            step=args.step,
            tta=args.tta,
            threshold=args.threshold,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
        )
    except (ValueError, CheckpointError, PredictError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    n = len(members)
    default = "evaluate" + (f"-ensemble{n}" if n > 1 else "") + ("-tta" if args.tta else "")
    first = Path(members[0])
    if is_model_reference(members[0]):  # never into the installed package's weights folder
        out = Path(
            args.out or Path("runs") / f"{default}-{first.name.removesuffix('.safetensors')}"
        )
    else:
        out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / default
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_per_patient_csv(rows, out / rundir.PER_PATIENT_FILE)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for note in notes:
        print(f"note: {note}")
    print(
        f"{len(rows)} patients, {'ensemble of ' + str(n) if n > 1 else 'one model'}"
        f"{', TTA' if args.tta else ''}: mean DSC {summary['val_dsc']:.4f} "
        f"(median {summary['val_dsc_median']:.4f}), mean HD95 {summary.get('val_hd95')} "
        f"-> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
