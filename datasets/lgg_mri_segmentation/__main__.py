"""Build the ``lgg_mri_segmentation`` TFDS dataset without TensorFlow.

    python -m datasets.lgg_mri_segmentation --manual_dir M --data_dir D [--config baseline|raw|all]

Run from the project's root (or with the project installed). ``M`` is the Kaggle zip archive
itself (e.g. ``archive.zip``) or a folder holding the download (the zip, the unpacked archive or a
kaggle_3m folder). Writes array_record files under ``D/lgg_mri_segmentation/<config>/1.0.0/``; an
existing build is reused unless ``--overwrite``. A build is renamed into place only when complete:
an interrupted one (Ctrl-C: exit status 130) leaves nothing, and the leftovers of a killed one are
removed by the next build. Bad input stops it with one line naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .lgg_mri_segmentation_dataset_builder import build, data_error_in

NAME = "lgg_mri_segmentation"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m datasets.lgg_mri_segmentation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--manual_dir",
        required=True,
        help="the Kaggle zip archive (e.g. archive.zip), or a folder holding it, the unpacked "
        "archive or kaggle_3m",
    )
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to")
    parser.add_argument(
        "--config",
        choices=["baseline", "raw", "all"],
        default="baseline",
        help="which config to build (default: baseline)",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="preprocessing processes (0: none; default: CPUs, at most 8)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    configs = ["baseline", "raw"] if args.config == "all" else [args.config]
    for config in configs:
        start = time.perf_counter()
        try:
            builder = build(
                args.manual_dir,
                args.data_dir,
                config,
                num_workers=args.num_workers,
                overwrite=args.overwrite,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted: {NAME}/{config} not built in {args.data_dir} (nothing partial is "
                "kept; run the command again to build it)",
                file=sys.stderr,
            )
            return 130
        except Exception as e:
            error = data_error_in(e)
            if error is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            return 2
        splits = ", ".join(
            f"{name}: {info.num_examples}" for name, info in builder.info.splits.items()
        )
        print(
            f"{NAME}/{config}: {splits} examples in {builder.data_dir} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
