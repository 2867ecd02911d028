"""Build the ``lgg_mri_segmentation`` TFDS dataset without TensorFlow.

    python -m datasets.lgg_mri_segmentation --manual_dir M --data_dir D [--config baseline|raw|all]

Run from the project's root (or with the project installed). Writes array_record files under
``D/lgg_mri_segmentation/<config>/1.0.0/``; an existing build is reused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from unet_jax.lgg import LGGDataError

from .lgg_mri_segmentation_dataset_builder import build


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
        help="folder holding the Kaggle download (zip, unpacked archive or kaggle_3m)",
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
        except LGGDataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        splits = ", ".join(
            f"{name}: {info.num_examples}" for name, info in builder.info.splits.items()
        )
        print(
            f"lgg_mri_segmentation/{config}: {splits} examples in {builder.data_dir} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
