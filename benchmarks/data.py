"""The data the benchmarks run on, and its hand-over to worker processes.

:func:`load_data` reads the real training split (the built TFDS data set under ``--data_dir``) or,
when it is absent, generates synthetic arrays of the same layout
(:func:`unet_jax.synthetic.disc_split`) and says so in its label (printed in every table). The
split is handed to worker processes through a temporary ``.npy`` cache (:func:`save_split` /
:func:`load_saved_split`), so the TFDS data set is read once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: Training slices of the real split (the baseline's preprocessing); epochs are projected for this many examples
#: when the data at hand is synthetic or a subset.
REAL_TRAIN_EXAMPLES = 3336
#: The TFDS config benchmarked; the data set name comes from ``unet_jax.data.DATASET`` (imported
#: where it is used, as ``unet_jax.data`` pulls in JAX).
DATASET_CONFIG = "baseline"


def synthetic_reason(data_dir: str | None) -> str:
    """Why synthetic data stands in for the real split (the ``SYNTHETIC data (...)`` labels)."""
    return "no --data_dir given" if not data_dir else f"no built data set under {data_dir}"


def load_data(
    data_dir: str | None,
    *,
    patients: int | None = None,
    synthetic: tuple[int, int, int] = (100, 33, 256),
    seed: int = 0,
):
    """The training split to benchmark on, and a label saying what it is.

    Real data: ``lgg_mri_segmentation/<DATASET_CONFIG>`` ``train`` from the TFDS data directory
    ``data_dir`` (read without TensorFlow). When ``data_dir`` is not given or holds no such built
    data set, synthetic arrays (:func:`unet_jax.synthetic.disc_split` with
    ``synthetic = (patients, slices, size)``) are used instead and the label starts with
    ``SYNTHETIC``. ``patients`` keeps only the
    first that many patients.
    """
    from unet_jax.data import DATASET, is_built, select_patients
    from unet_jax.synthetic import disc_split

    if data_dir and is_built(Path(data_dir), DATASET_CONFIG):
        from unet_jax.data import read_split

        name = f"{DATASET}/{DATASET_CONFIG}"
        split = read_split(data_dir, DATASET_CONFIG, "train")
        label = f"real data: {name} train, {data_dir}"
    else:
        why = synthetic_reason(data_dir)
        split = disc_split(*synthetic, seed=seed)
        label = (
            f"SYNTHETIC data ({why}): {synthetic[0]} patients x {synthetic[1]} slices of "
            f"{synthetic[2]}x{synthetic[2]}"
        )
    if patients is not None and patients < len(split.patients):
        split = select_patients(split, split.patients[:patients])
        label += f" (first {patients} patients)"
    label += (
        f"; {split.num_examples} slices of {split.images.shape[1]}x{split.images.shape[2]}, "
        f"{len(split.patients)} patients"
    )
    return split, label


_SPLIT_ARRAYS = ("images", "masks", "volume", "slice_index", "mean", "std")


def save_split(split, directory: str | Path) -> None:
    """Write a SplitData as plain ``.npy`` files (for worker processes; never in the repo)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name in _SPLIT_ARRAYS:
        np.save(d / f"{name}.npy", getattr(split, name))
    (d / "patients.json").write_text(json.dumps(list(split.patients)))


def load_saved_split(directory: str | Path):
    """Inverse of :func:`save_split`."""
    from unet_jax.data import SplitData

    d = Path(directory)
    arrays = {name: np.load(d / f"{name}.npy") for name in _SPLIT_ARRAYS}
    return SplitData(patients=tuple(json.loads((d / "patients.json").read_text())), **arrays)


def add_small_setup_args(p: Any, reps: int) -> None:
    """The arguments :func:`small_resident_setup` reads, with the step benchmarks' defaults."""
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--synthetic", default="6,12,256", help="patients,slices,stored size")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--out", default=None, help="also write the results as JSON here")


def small_resident_setup(args: Any, name: str, **fields: Any):
    """``(config, mesh, resident data)`` of the step benchmarks (``epoch_loop``, ``packed_runs``):
    a ``disc_split`` of ``args.synthetic`` ("patients,slices,stored size") on the device, the
    config's augmentation, resized on device to ``args.image_size``."""
    from unet_jax.config import Config
    from unet_jax.input_pipeline import AugmentSpec, ResidentData, make_mesh
    from unet_jax.synthetic import disc_split

    patients, slices, stored = (int(x) for x in args.synthetic.split(","))
    split = disc_split(patients, slices, stored, seed=0)
    cfg = Config(
        name=name,
        features=args.features,
        image_size=args.image_size,
        batch_size=args.batch,
        **fields,
    )
    mesh = make_mesh()
    size = None if args.image_size == stored else args.image_size
    aug = AugmentSpec(cfg.aug_scale, cfg.aug_angle, cfg.aug_flip, size)
    return cfg, mesh, ResidentData(split, mesh, cfg.batch_size, cfg.sampling, aug)
