"""Time the full build of the ``lgg_mri_segmentation`` TFDS dataset (both configs), on this machine.

    python benchmarks/build_dataset.py                       # restores ../shared/lgg into a tmp dir
    python benchmarks/build_dataset.py --manual_dir M        # an existing download
    python benchmarks/build_dataset.py --quantisation        # also measure the uint8 storage error

Each config is built from scratch into a fresh data directory, with the given number of worker
processes; the report gives wall time, CPU time of this process and its workers, examples, and
size on disk. ``--quantisation`` recomputes every baseline volume in float64 and compares the
stored form ``(image / 255 - channel_mean) / channel_std`` with the baseline's exact
standardisation ``(r - mean(r)) / std(r)``.

Not a test: it needs the real data (``../shared/lgg`` or ``--manual_dir``) and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quantisation_error(manual_dir: Path, data_dir: Path) -> dict:
    import numpy as np
    import tensorflow_datasets as tfds

    from datasets.lgg_mri_segmentation import archive, kaggle
    from unet_jax import preprocess

    source = archive.open_source(manual_dir)
    patients = {p.patient_id: p for p in kaggle.list_patients(source)}
    max_err, sq_sum, count, max_r = 0.0, 0.0, 0, 0.0
    for split in ("train", "validation"):
        ds = tfds.data_source("lgg_mri_segmentation/baseline", data_dir=str(data_dir), split=split)
        index = tfds.builder("lgg_mri_segmentation/baseline", data_dir=str(data_dir)).info.metadata[
            "patients"
        ][split]
        for pid, start, n in index:
            images, masks = kaggle.read_patient(source, patients[pid])
            r, _, _ = preprocess.preprocess_volume_float(images, masks)
            mean, std = preprocess.channel_stats(r)
            exact = (r - mean) / std
            for k in range(n):
                ex = ds[start + k]
                stored = preprocess.standardise(ex["image"], ex["channel_mean"], ex["channel_std"])
                err = stored.astype(np.float64) - exact[k]
                max_err = max(max_err, float(np.abs(err).max()))
                sq_sum += float((err**2).sum())
                count += err.size
                max_r = max(max_r, float(np.abs(ex["image"] / 255.0 - r[k]).max()))
    return {
        "max_abs_error_standardised": max_err,
        "rms_error_standardised": (sq_sum / count) ** 0.5,
        "max_abs_error_r": max_r,
        "values": count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--manual_dir",
        type=Path,
        default=None,
        help="the download; default: restore ../shared/lgg into a temporary folder",
    )
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["raw", "baseline"])
    parser.add_argument(
        "--quantisation",
        action="store_true",
        help="also measure the quantisation error of the baseline config",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    from datasets.lgg_mri_segmentation import build

    tmp = Path(tempfile.mkdtemp(prefix="lgg_bench_"))
    try:
        manual_dir = args.manual_dir
        results: dict = {"cpus": os.cpu_count(), "num_workers": args.num_workers, "configs": {}}
        if manual_dir is None:
            restore = REPO.parent / "shared" / "lgg" / "restore.py"
            if not restore.exists():
                print(f"no real data: {restore} not found; pass --manual_dir", file=sys.stderr)
                return 1
            start = time.perf_counter()
            subprocess.run([sys.executable, str(restore), str(tmp / "manual")], check=True)
            results["restore_s"] = round(time.perf_counter() - start, 1)
            manual_dir = tmp / "manual"
        total = 0.0
        for config in args.configs:
            data_dir = tmp / f"data_{config}"
            cpu0, start = _cpu_seconds(), time.perf_counter()
            builder = build(manual_dir, data_dir, config, num_workers=args.num_workers)
            wall = time.perf_counter() - start
            total += wall
            results["configs"][config] = {
                "wall_s": round(wall, 1),
                "cpu_s": round(_cpu_seconds() - cpu0, 1),
                "examples": {s: i.num_examples for s, i in builder.info.splits.items()},
                "disk_mb": round(_du(Path(builder.data_dir)) / 2**20, 1),
            }
            print(f"{config}: {results['configs'][config]}", flush=True)
        results["total_wall_s"] = round(total, 1)
        with open("/proc/loadavg") as f:
            results["loadavg_after"] = f.read().split()[:3]
        if args.quantisation and "baseline" in args.configs:
            start = time.perf_counter()
            results["quantisation"] = _quantisation_error(manual_dir, tmp / "data_baseline")
            results["quantisation"]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
