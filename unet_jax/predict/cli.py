"""The command line of ``unet_jax.predict``; what it does is its ``--help``."""

from __future__ import annotations

import argparse
import math
import sys

from unet_jax.predict.export import FORMATS
from unet_jax.predict.inputs import PredictError
from unet_jax.predict.run import predict
from unet_jax.pretrained import DEFAULT_MODEL

__all__ = ["DESCRIPTION", "EPILOG", "main"]

DESCRIPTION = (
    "Segment new MRI slices with a packaged model (the default), a trained checkpoint or a "
    "converted one."
)

EPILOG = """\
models: with neither --checkpoint nor --model, the packaged model (`--list-models` prints the
  packaged models' cards: recipe, training data, measured DSC). --model takes a packaged
  model's name or a .safetensors file written by `python -m unet_jax.pretrained export`.

inputs: slice files (8-bit; 3 channels pre-contrast, FLAIR, post-contrast, or 1 channel taken
  as FLAIR), patient folders of <patient>_<n> slices (one volume each, ordered by n) or a
  kaggle_3m root of patient folders. Loose files are grouped into volumes by <patient>; a file
  without _<n> is a volume of its own. A mask <stem>_mask.<ext> beside a slice is its ground truth.

preprocessing: the checkpoint's data-set config (baseline or raw), exactly as in training.
  baseline: slices the baseline drops (first and last, outside the crop) get empty masks
  (processed = 0); volumes of fewer than 3 slices keep their ends.

prediction: the sigmoid probabilities at the model's size (with --tta the mean over the image
  and its left-right mirror; with several checkpoints the mean over them) are resized
  bilinearly to each slice's own geometry and thresholded there (>= threshold); unless
  --no-lcc, only the largest 3D connected component of each volume is kept.

ensembles: --checkpoint A B C (or --checkpoint A --checkpoint B ...), e.g. the folds of a cv5
  run or several seeds, and any --model given too. Every checkpoint must agree on
  dataset_config, image_size, in_channels and out_channels (else exit 2 naming the two that
  differ), and on threshold unless --threshold is given; they may have been trained on
  different data (the folds of cv5; only experiments.evaluate, which scores their validation
  patients, refuses that). --step N applies to all; --step N1 N2 ... gives one per checkpoint
  (best: a workdir's best checkpoint); a step that does not exist is named with those that do.

outputs (DIR is made complete or not at all):
  <volume>/<stem>_pred.png     binary mask (0/255) in the input slice's size
  <volume>/<stem>_overlay.png  FLAIR with the outlines of the prediction (red), ground truth
                               (green), both (yellow); the input slice's size, pixel for pixel,
                               so no legend drawn in it (its PNG Description names the colours)
  <volume>/<volume>.gif        the volume's overlays, animated (upscaled to >= 256 px), the
                               legend in a strip below each frame
  legend.png                   the overlay colours
  predictions.csv              one row per slice and per volume: sizes, processed, lesion
                               pixels and fraction, true_pixels; with ground truth, dsc and
                               accuracy in the input geometry (a slice's wherever it has a
                               mask, empty vs empty: dsc 1; a volume's when all its slices
                               have one), and dsc_model, dsc_model_lcc, accuracy_model as the
                               training evaluation computes them, on the processed slices at
                               the stored size (dsc_model_lcc is its per_patient.csv's dsc_lcc)
  predict.json                 the settings of the run
  with --format nifti (needs nibabel: pip install 'unet-jax[nifti]'), per volume also
  <volume>/<volume>_flair.nii.gz (and _pre-contrast, _post-contrast for 3-channel input)
                               the input channels, uint8
  <volume>/<volume>_pred.nii.gz  the predicted mask (0/1 uint8), equal to the _pred.png masks
  <volume>/<volume>_truth.nii.gz the ground truth (0/1), when every slice has a mask
    3D arrays data[x, y, z]: x the column, y the row, z the slice in slice-number order (0 =
    the first); affine diag(-1, -1, 1): 1 mm spacing (nominal: the TIFFs carry none), axes
    L, P, S, so ITK-SNAP or 3D Slicer shows each axial slice as the PNGs do.

exit status: 0 done, 2 bad input, checkpoint or output, 130 interrupted."""


def _step(text: str) -> int | None:
    if text == "best":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number nor 'best': {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unet_jax.predict",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        action="extend",
        default=[],
        metavar="CKPT",
        help="a training workdir (its best checkpoint unless --step) or a "
        "checkpoint written by `python -m unet_jax.convert`; several (or the option "
        "repeated): an ensemble averaging their probabilities",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="a packaged model's name or a .safetensors model file (default, with no "
        f"--checkpoint: {DEFAULT_MODEL}); several, or with --checkpoint: an ensemble",
    )
    parser.add_argument(
        "--list-models", action="store_true", help="print the packaged models' cards and exit"
    )
    parser.add_argument(
        "--step",
        type=_step,
        nargs="+",
        action="extend",
        default=None,
        metavar="STEP",
        help="use the checkpoint of this training step instead of the best; one for all "
        "checkpoints or one per checkpoint ('best' for a workdir's best)",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="slice files (.tif/.tiff/.png), patient folders or a kaggle_3m root; "
        "files are grouped into volumes by their <patient>_<n> prefix, a file "
        "without _<n> is a volume of its own",
    )
    parser.add_argument("--output", metavar="DIR", help="new (or empty) folder for the results")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability threshold (default: the checkpoint's, 0.5)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the probabilities of each image and its "
        "left-right mirror (the flip training augments with; twice the compute)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png (default): masks, overlays and a GIF per volume; nifti: those and one "
        "set of .nii.gz volumes per volume (see below; needs nibabel)",
    )
    parser.add_argument(
        "--no-lcc",
        action="store_true",
        help="keep every predicted component (default: only the largest 3D "
        "connected component of each volume)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch (default 16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input/checkpoint/output, 130
    interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_models:
        from unet_jax import pretrained

        print("\n\n".join(pretrained.describe(name) for name in pretrained.MODELS))
        return 0
    missing = [f"--{n}" for n in ("input", "output") if not getattr(args, n)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from unet_jax import pretrained

    try:
        for name in args.model:  # a --model value is a model, never taken for a checkpoint path
            pretrained.resolve(name)
    except pretrained.PretrainedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    members = args.checkpoint + args.model
    if not members:
        members = [DEFAULT_MODEL]
        print(
            f"using the packaged model {DEFAULT_MODEL} (--list-models: its card; --checkpoint "
            "or --model: another)",
            file=sys.stderr,
        )
    try:
        summary = predict(
            members,
            args.input,
            args.output,
            step=args.step,
            threshold=args.threshold,
            lcc=not args.no_lcc,
            tta=args.tta,
            format=args.format,
            batch_size=args.batch_size,
            progress=False if args.no_progress else None,
        )
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for r in summary.rows:
        if r["level"] != "volume":
            continue
        line = f"{r['volume']}: {r['slices']} slices, lesion {r['lesion_pixels']} px"
        if "dsc" in r:
            line += f", DSC {r['dsc']:.4f}"
            if "dsc_model_lcc" in r:
                line += f" (as evaluated in training, after LCC: {r['dsc_model_lcc']:.4f})"
        print(line)
    rate = summary.slices / summary.seconds if summary.seconds > 0 else math.inf
    how = [f"ensemble of {len(members)}"] if len(members) > 1 else []
    how += ["TTA"] if args.tta else []
    print(
        f"wrote {summary.output}: {summary.volumes} volume(s), {summary.slices} slices in "
        f"{summary.seconds:.1f} s ({rate:.1f} slices/s) on {summary.device}"
        + (f" ({', '.join(how)})" if how else "")
    )
    return 0
