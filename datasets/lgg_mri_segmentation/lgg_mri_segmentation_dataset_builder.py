"""TFDS builder of the LGG MRI data (``lgg_mri_segmentation``), built without TensorFlow.

Two configs: ``baseline`` (default; the data exactly as the baseline, brain-segmentation-pytorch,
trains on it) and ``raw`` (every slice as downloaded). Splits ``train`` / ``validation`` by patient,
reproducing the baseline's holdout. Examples are stored in (patient_id, slice_index) order.

Build (no TensorFlow needed)::

    python -m datasets.lgg_mri_segmentation --manual_dir M --data_dir D [--config baseline|raw|all]

or from Python :func:`build`; read with ``tfds.data_source("lgg_mri_segmentation/baseline",
data_dir=D, split="train")``. See README.md beside this file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unet_jax import lgg
from unet_jax.fileio import exclusive_lock
from unet_jax.lgg import CSV_FIELDS, MISSING, SLICE_SIZE, LGGDataError

from . import archive, kaggle
from .worker_pool import PatientPool, default_workers, exit_if_main_rerun_by_worker

log = logging.getLogger(__name__)


class LggConfig(tfds.core.BuilderConfig):
    """A builder config; ``name`` is ``"baseline"`` or ``"raw"``."""


class _ZlibTensor(tfds.features.Tensor):
    """``tfds.features.Tensor(encoding="zlib")`` that also takes bytes already compressed.

    The worker processes compress the pixels (``zlib.compress(array.tobytes(), ZLIB_LEVEL)``, the
    format Tensor stores and decodes), so the one process that writes the files does not spend
    its time in zlib. On disk and in features.json this *is* a plain ``Tensor``: readers need
    nothing from this module.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)

    def encode_example(self, example_data: Any) -> Any:
        if isinstance(example_data, bytes):
            return example_data
        return super().encode_example(example_data)

    @property
    def _fully_qualified_class_name(self) -> str:
        return f"{tfds.features.Tensor.__module__}.{tfds.features.Tensor.__name__}"


def _features() -> tfds.features.FeaturesDict:
    size = SLICE_SIZE
    features: dict[str, Any] = {
        # uint8 pixels, zlib-compressed (tfds.features.Image would need TensorFlow to encode).
        "image": _ZlibTensor((size, size, 3)),
        "mask": _ZlibTensor((size, size, 1)),
        "channel_mean": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "channel_std": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "patient_id": tfds.features.Text(),
        "slice_index": tfds.features.Scalar(dtype=np.int32),
        "num_slices": tfds.features.Scalar(dtype=np.int32),
        "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        "padding": tfds.features.Tensor(shape=(4,), dtype=np.int32),
    }
    for field in CSV_FIELDS:
        features[field] = tfds.features.Scalar(dtype=np.int32)
    return tfds.features.FeaturesDict(features)


class Builder(tfds.core.GeneratorBasedBuilder):
    """The LGG MRI segmentation data (kaggle_3m) as a TFDS dataset; see README.md."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: configs baseline and raw."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = lgg.MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        LggConfig(
            name="baseline",
            description=(
                "The baseline's training data exactly: per volume, first and last slice dropped, "
                "10% threshold, crop, pad to square, resize to 256 (order 2 / nearest), "
                "10th-99th percentile rescaling r in [0, 1], stored as rint(255 r) uint8 with the "
                "per-volume channel mean and std of the unquantised r."
            ),
        ),
        LggConfig(
            name="raw",
            description="Every slice exactly as downloaded (256x256x3 uint8, mask 0/1).",
        ),
    ]
    DEFAULT_CONFIG_NAME = "baseline"

    # Where README.md, CITATIONS.bib and TAGS.txt are. TFDS 4.9.10 infers it from the top-level
    # package name, which finds HuggingFace's `datasets` where that wins the import.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 finds a packaged builder's file through a check that needs the
        # `importlib_resources` backport (undeclared for Python >= 3.9), and by package name
        # (see above); this is what it computes otherwise.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        manual_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Args: num_workers: processes that read and preprocess patients (0: in this process;
        default: the number of CPUs, at most 8); manual_path: where the download is (a folder or
        the zip archive itself; default: the download config's manual_dir); other arguments as
        ``tfds.core.DatasetBuilder``."""
        self._num_workers = default_workers() if num_workers is None else int(num_workers)
        self._manual_path = None if manual_path is None else os.fspath(manual_path)
        # Its worker processes start on first use, so an unused pool costs nothing.
        self._pool = PatientPool(self._num_workers)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(),
            supervised_keys=("image", "mask"),
            homepage="https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        exit_if_main_rerun_by_worker()
        manual_dir = self._manual_path
        if manual_dir is None:
            try:
                manual_dir = dl_manager.manual_dir
            except AssertionError as e:  # TFDS's own check: missing or empty directory
                raise LGGDataError(str(e)) from None
            except NotADirectoryError as e:  # a file: the zip archive itself
                manual_dir = e.filename
        source = archive.open_source(manual_dir)
        log.info("Reading the LGG data from %s", source.describe())
        patients = kaggle.list_patients(source)
        table = kaggle.read_data_csv(source)
        metadata = kaggle.patient_metadata(patients, table, source.describe("data.csv"))
        train_ids, val_ids = lgg.split_patients(p.patient_id for p in patients)
        by_id = {p.patient_id: p for p in patients}
        meta = self.info.metadata
        meta["config"] = self.builder_config.name
        meta["missing_value"] = MISSING
        meta["validation_patients"] = val_ids
        meta["source"] = source.describe()
        meta["patients"] = {}
        # Workers left by an interrupted earlier build; the pool restarts them on first use.
        self._pool.close()
        return {
            split: self._generate_examples(
                split, source, [by_id[i] for i in ids], metadata, last=(split == "validation")
            )
            for split, ids in (("train", train_ids), ("validation", val_ids))
        }

    def _generate_examples(
        self,
        split: str,
        source: archive.Source,
        patients: list[kaggle.PatientFiles],
        metadata: dict[str, dict[str, int]],
        last: bool = False,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config.name
        jobs = [(source, p, config, metadata[p.patient_id]) for p in patients]
        # [patient_id, first example index, number of examples] per patient, in stored order.
        index: list[list[Any]] = []
        self.info.metadata["patients"][split] = index
        start = 0
        pool = self._pool
        try:
            for patient, examples in zip(patients, pool.map(jobs)):
                index.append([patient.patient_id, start, len(examples)])
                start += len(examples)
                for example in examples:
                    # Keys sort as (patient_id, slice_index): with disable_shuffling, TFDS
                    # stores examples sorted by key.
                    yield f"{patient.patient_id}/{int(example['slice_index']):05d}", example
        finally:
            if last:
                pool.close()


def data_error_in(error: BaseException) -> LGGDataError | None:
    """The :class:`LGGDataError` that ``error`` is or was caused by (through ``__cause__`` /
    ``__context__``, e.g. re-raised by TFDS or by a worker pool), or ``None``."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, LGGDataError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


#: The folder TFDS writes a build into before renaming it to ``<version>`` (its
#: ``utils.incomplete_dir``); a killed build leaves it behind.
_INCOMPLETE = re.compile(r"^incomplete\.[A-Za-z0-9]+_\d+\.\d+\.\d+$")


def remove_incomplete_builds(config_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``incomplete.*`` folders that killed builds left in ``config_dir``
    (``<data_dir>/lgg_mri_segmentation/<config>``), printing one line for each.

    Only folders of TFDS's pattern (``incomplete.<6 characters>_<version>``) directly in that
    folder are touched. Call it only while holding the build lock (:func:`build` does), since a
    build in progress elsewhere writes one of them.
    """
    removed = []
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        return removed
    for entry in sorted(config_dir.iterdir()):
        if _INCOMPLETE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            print(f"removed {entry}: left by an interrupted build", file=sys.stderr)
            removed.append(entry)
    return removed


def build(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: str = "baseline",
    *,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> Builder:
    """Build (or reuse) one config of the data set as array_record files, without TensorFlow.

    Builds of one ``data_dir`` and config wait for each other (through an ``flock`` on
    ``data_dir/lgg_mri_segmentation/<config>``); the leftovers of killed builds there are removed
    first (:func:`remove_incomplete_builds`). A build is written aside by TFDS and renamed into
    place when complete, so an interrupted one leaves no partial data set.

    Args:
      manual_dir: where the Kaggle download is: the zip archive itself (e.g. ``archive.zip``), or
        a folder holding the zip, the unpacked archive or a kaggle_3m folder.
      data_dir: TFDS data directory; the result is ``data_dir/lgg_mri_segmentation/<config>/1.0.0``.
      config: ``"baseline"`` or ``"raw"``.
      num_workers: processes for reading/preprocessing (0: none; default: CPUs, at most 8).
      overwrite: rebuild even if the data set is already there.

    Returns:
      The prepared builder; read it with ``builder.as_data_source(split)`` or
      ``tfds.data_source(f"lgg_mri_segmentation/{config}", data_dir=data_dir, split=...)``.

    Raises:
      LGGDataError: bad or missing input (the message names the file).
    """
    # First: in a worker re-running a main script that builds, the parent holds the lock below.
    exit_if_main_rerun_by_worker()
    if config not in ("baseline", "raw"):
        raise ValueError(f"config must be 'baseline' or 'raw', got {config!r}")
    data_dir = Path(data_dir).expanduser()
    config_dir = data_dir / Builder.name / config
    config_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(config_dir):
        remove_incomplete_builds(config_dir)
        builder = Builder(
            # The constructor's file_format sets info.file_format, which writing and reading use.
            config=config,
            data_dir=os.fspath(data_dir),
            file_format="array_record",
            num_workers=num_workers,
            manual_path=manual_dir,
        )
        mode = (
            tfds.download.GenerateMode.FORCE_REDOWNLOAD
            if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir), download_mode=mode
            ),
        )
    return builder
