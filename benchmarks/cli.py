"""The command-line pieces the benchmark scripts share: the data options, the resize note of their
tables, and ``main`` (parse, run, write ``--out``)."""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks.data import load_data


def add_data_args(parser) -> None:
    """The data and output options shared by ``epoch_time`` and ``input_pipeline``."""
    parser.add_argument(
        "--data_dir",
        "--data-dir",
        dest="data_dir",
        default=None,
        help="TFDS data dir holding lgg_mri_segmentation/baseline (else synthetic data)",
    )
    parser.add_argument(
        "--patients",
        type=int,
        default=None,
        help="use only the first N patients (less memory; rates are per example)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--inprocess",
        action="store_true",
        help="run every variant in this process (tests; memory is not "
        "attributable, DataLoader workers use 'spawn')",
    )
    parser.add_argument(
        "--synthetic", default="100,33,256", help="synthetic fallback: patients,slices,stored size"
    )


def data_from_args(args) -> tuple[Any, str]:
    """:func:`load_data` for the options of :func:`add_data_args`: ``(split, label)``."""
    synthetic = tuple(int(x) for x in args.synthetic.split(","))
    return load_data(args.data_dir, patients=args.patients, synthetic=synthetic, seed=0)


def resize_note(stored: int, size: int, where: str) -> str:
    """How examples stored at ``stored`` reach ``size`` (``where``: who resizes)."""
    return f"resized on the fly {stored}->{size} in both {where}" if size != stored else "no resize"


def run_cli(module: str, build_parser, run, argv: list[str] | None) -> dict[str, Any]:
    """Shared ``main`` of the benchmark scripts: parse ``argv``, ``run(args, command=...)``, and
    write the result as JSON when ``--out`` is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = run(args, command=" ".join([f"python -m {module}", *argv]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return out
