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
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from unet_jax.config import Config
from unet_jax.input_pipeline import SplitData, concat, select_patients, split_from_records
from unet_jax.lgg import MANUAL_DOWNLOAD_INSTRUCTIONS, patient_folds

DATASET = "lgg_mri_segmentation"

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class DataNotFoundError(FileNotFoundError):
    """The built data set (or the download to build it from) is not there; the message says
    what to do."""


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
