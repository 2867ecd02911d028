"""A run's ``(train, validation)`` splits, read from the built TFDS data set.

This module only reads a data set that is already built: building it (from the Kaggle download,
or from the project's synthetic data) is the caller's step, ``experiments.data.ensure_built``, so
the core never imports the builder in ``datasets/``. The files are read through TFDS's read-only
builder (features.json stores plain tensors), so the builder need not be registered.

Where the built data is (:func:`configured_data_dir`):

* ``source="lgg"``: ``config.data_dir``, else TFDS's default (``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``).
* ``source="synthetic"``: ``<config.data_dir or <workdir>/synthetic>/tfds``, beside the generated
  download in ``.../manual``; without ``config.data_dir`` it belongs to a workdir.

Splits: ``holdout`` gives the baseline's train/validation patients; ``fold`` gives fold
``config.fold`` of ``config.num_folds`` deterministic patient-level folds over all patients.

A split is read into a :class:`SplitData` (host numpy arrays, no JAX), which
:mod:`unet_jax.input_pipeline` then places on the devices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.config import Config
from unet_jax.lgg import MANUAL_DOWNLOAD_INSTRUCTIONS, patient_folds

DATASET = "lgg_mri_segmentation"

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class DataNotFoundError(FileNotFoundError):
    """The built data set (or the download to build it from) is not there; the message says
    what to do."""


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split on the host, slices in (patient, slice) order.

    Attributes:
      images: uint8 (N, H, W, C).
      masks: uint8 (N, H, W, 1) in {0, 1}.
      volume: int32 (N,) index of each slice's patient in ``patients``.
      slice_index: int32 (N,) original 1-based slice number.
      mean, std: float32 (P, C) per-volume channel statistics of ``images / 255``-space values.
      patients: patient ids (folder names), one per volume.
    """

    images: np.ndarray
    masks: np.ndarray
    volume: np.ndarray
    slice_index: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    patients: tuple[str, ...]

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}"
            )
        if self.masks.shape != self.images.shape[:3] + (1,):
            raise ValueError(f"masks shape {self.masks.shape} != {self.images.shape[:3] + (1,)}")
        if self.volume.shape != (n,) or self.slice_index.shape != (n,):
            raise ValueError("volume and slice_index must have one entry per slice")
        p = len(self.patients)
        if self.mean.shape != (p, self.images.shape[-1]) or self.std.shape != self.mean.shape:
            raise ValueError(
                f"mean/std must be (patients, channels) = {(p, self.images.shape[-1])}"
            )
        if n and (self.volume.min() < 0 or self.volume.max() >= p):
            raise ValueError("volume indices out of range")
        if (
            not np.all(np.isfinite(self.mean))
            or not np.all(np.isfinite(self.std))
            or np.any(self.std <= 0)
        ):
            bad = [
                self.patients[i]
                for i in range(p)
                if not (
                    np.all(np.isfinite(self.mean[i]))
                    and np.all(np.isfinite(self.std[i]))
                    and np.all(self.std[i] > 0)
                )
            ]
            raise ValueError(f"non-finite or non-positive channel statistics for patients {bad}")

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes

    def volume_slices(self, v: int) -> np.ndarray:
        """Indices of the slices of volume ``v``, in order."""
        return np.flatnonzero(self.volume == v)


def _decode_text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _decode_text(x.item())
    return str(x)


def split_from_records(records: Sequence[dict[str, Any]]) -> SplitData:
    """Build :class:`SplitData` from TFDS example dicts (``image``, ``mask``, ``patient_id``,
    ``slice_index``, ``channel_mean``, ``channel_std``), sorting by (patient, slice)."""
    if not records:
        raise ValueError("the split holds no examples")
    keys = [(_decode_text(r["patient_id"]), int(r["slice_index"])) for r in records]
    order = sorted(range(len(records)), key=lambda i: keys[i])
    patients = tuple(sorted({k[0] for k in keys}))
    pindex = {p: i for i, p in enumerate(patients)}
    images = np.stack([np.asarray(records[i]["image"], np.uint8) for i in order])
    masks = np.stack([np.asarray(records[i]["mask"], np.uint8) for i in order])
    if masks.ndim == 3:
        masks = masks[..., None]
    volume = np.array([pindex[keys[i][0]] for i in order], np.int32)
    slice_index = np.array([keys[i][1] for i in order], np.int32)
    c = images.shape[-1]
    mean = np.zeros((len(patients), c), np.float32)
    std = np.zeros((len(patients), c), np.float32)
    for i in order:
        v = pindex[keys[i][0]]
        mean[v] = np.asarray(records[i]["channel_mean"], np.float32)
        std[v] = np.asarray(records[i]["channel_std"], np.float32)
    return SplitData(images, masks, volume, slice_index, mean, std, patients)


def select_patients(data: SplitData, patients: Sequence[str]) -> SplitData:
    """The sub-split of the given patients (in sorted order); unknown ids are an error."""
    missing = sorted(set(patients) - set(data.patients))
    if missing:
        raise ValueError(f"patients not in this data: {missing}")
    keep_p = sorted(set(patients))
    old = [data.patients.index(p) for p in keep_p]
    remap = np.full(len(data.patients), -1, np.int32)
    remap[old] = np.arange(len(old), dtype=np.int32)
    rows = np.flatnonzero(np.isin(data.volume, old))
    return SplitData(
        data.images[rows],
        data.masks[rows],
        remap[data.volume[rows]],
        data.slice_index[rows],
        data.mean[old],
        data.std[old],
        tuple(keep_p),
    )


def concat(a: SplitData, b: SplitData) -> SplitData:
    """Two splits with disjoint patients as one (e.g. train + validation for k folds)."""
    if set(a.patients) & set(b.patients):
        raise ValueError(f"splits share patients: {sorted(set(a.patients) & set(b.patients))}")
    merged = SplitData(
        np.concatenate([a.images, b.images]),
        np.concatenate([a.masks, b.masks]),
        np.concatenate([a.volume, b.volume + len(a.patients)]),
        np.concatenate([a.slice_index, b.slice_index]),
        np.concatenate([a.mean, b.mean]),
        np.concatenate([a.std, b.std]),
        a.patients + b.patients,
    )
    return select_patients(merged, merged.patients)  # back to sorted patient order


def default_data_dir() -> Path:
    """TFDS's default data directory."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets")).expanduser()


def configured_data_dir(config: Config, workdir: str | Path | None = None) -> Path:
    """The TFDS data directory ``config`` reads from (and builds into); see the module docstring.

    Raises:
      ValueError: an unknown ``config.source``, or synthetic data with neither
        ``config.data_dir`` nor a ``workdir``.
    """
    if config.source == "synthetic":
        if config.data_dir:
            return Path(config.data_dir).expanduser() / "tfds"
        if workdir is None:
            raise ValueError(
                "synthetic data without config.data_dir lives in its run's workdir "
                "(<workdir>/synthetic/tfds): pass data_dir, or build it with "
                "experiments.data.ensure_built(config, workdir)"
            )
        return Path(workdir) / "synthetic" / "tfds"
    return Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()


def built_version_dir(data_dir: str | Path, dataset_config: str) -> Path | None:
    """``<data_dir>/lgg_mri_segmentation/<config>/<version>`` of the newest prepared version."""
    root = Path(data_dir) / DATASET / dataset_config
    if not root.is_dir():
        return None
    # Prepared versions only: an interrupted build leaves an ``incomplete.*`` folder instead.
    versions = [
        p for p in root.iterdir() if _VERSION.match(p.name) and (p / "dataset_info.json").is_file()
    ]
    if not versions:
        return None
    return max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))


def is_built(data_dir: str | Path, dataset_config: str) -> bool:
    """Whether ``lgg_mri_segmentation/<config>`` is prepared under ``data_dir``."""
    return built_version_dir(data_dir, dataset_config) is not None


def not_built_error(
    data_dir: str | Path, dataset_config: str, tried: Sequence[Path] = ()
) -> DataNotFoundError:
    """The error for a data set that is not built (and, if ``tried``, no download found)."""
    where = Path(data_dir) / DATASET / dataset_config
    searched = (
        f" and no Kaggle download was found in: {', '.join(str(p) for p in tried)}" if tried else ""
    )
    return DataNotFoundError(
        f"The LGG data set is not built in {where}{searched}.\n\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}\n"
        "Then pass --manual_dir DIR (or put it in <data_dir>/downloads/manual), or run "
        "`python -m experiments.run --exp=smoke` for the built-in demo on synthetic data."
    )


def read_split(data_dir: str | Path, dataset_config: str, split: str) -> SplitData:
    """One split (``train`` or ``validation``) of the built data set, without TensorFlow.

    Raises:
      DataNotFoundError: ``lgg_mri_segmentation/<dataset_config>`` is not built in ``data_dir``.
    """
    import tensorflow_datasets as tfds

    path = built_version_dir(data_dir, dataset_config)
    if path is None:
        raise not_built_error(data_dir, dataset_config)
    source = tfds.builder_from_directory(str(path)).as_data_source(split)
    return split_from_records([source[i] for i in range(len(source))])


def load_data(config: Config, data_dir: str | Path | None = None) -> tuple[SplitData, SplitData]:
    """``(train, validation)`` splits for ``config`` from the built data set.

    Args:
      config: names the data set config (``dataset_config``) and the split (``split``,
        ``fold``, ``num_folds``).
      data_dir: the TFDS data directory holding the built data set; default:
        :func:`configured_data_dir` (synthetic data then needs ``config.data_dir``).

    Raises:
      DataNotFoundError: the data set is not built there (with the download instructions).
      ValueError: an unknown split or an out-of-range fold.
    """
    # Source, split and fold were validated when the config was built (unet_jax.config).
    data_dir = configured_data_dir(config) if data_dir is None else Path(data_dir)
    train = read_split(data_dir, config.dataset_config, "train")
    val = read_split(data_dir, config.dataset_config, "validation")
    if config.split == "holdout":
        return train, val
    everyone = concat(train, val)
    train_ids, val_ids = patient_folds(everyone.patients, k=config.num_folds)[config.fold]
    return select_patients(everyone, train_ids), select_patients(everyone, val_ids)
