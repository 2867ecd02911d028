"""The LGG MRI data (Kaggle ``kaggle_3m``) as the TFDS dataset ``lgg_mri_segmentation``.

Importing this package registers the builder with TFDS. Build without TensorFlow::

    python -m datasets.lgg_mri_segmentation --manual_dir M --data_dir D [--config baseline|raw|all]

or ``build(manual_dir, data_dir, config)``; read with
``tfds.data_source("lgg_mri_segmentation/baseline", data_dir=D, split="train")``.
See README.md in this folder.

Modules: :mod:`.archive` (where the download is: folder or zip), :mod:`.kaggle` (checking and
reading it), the builder. The facts the core shares (splits, folds, slice size, data.csv fields,
the download instructions) live in :mod:`unet_jax.lgg` and are re-exported here.
"""

from unet_jax.lgg import (
    CSV_FIELDS,
    HOLDOUT_SEED,
    HOLDOUT_SIZE,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    MISSING,
    SLICE_SIZE,
    LGGDataError,
    csv_key,
    holdout_patients,
    patient_folds,
    split_patients,
)

from .archive import Source, find_kaggle_root, open_source
from .kaggle import LGGDataWarning, PatientFiles, list_patients, read_data_csv, read_patient
from .lgg_mri_segmentation_dataset_builder import (
    Builder,
    LggConfig,
    build,
    data_error_in,
    remove_incomplete_builds,
)

__all__ = [
    "Builder",
    "LggConfig",
    "build",
    "data_error_in",
    "remove_incomplete_builds",
    "CSV_FIELDS",
    "HOLDOUT_SEED",
    "HOLDOUT_SIZE",
    "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "MISSING",
    "SLICE_SIZE",
    "LGGDataError",
    "LGGDataWarning",
    "PatientFiles",
    "Source",
    "csv_key",
    "find_kaggle_root",
    "holdout_patients",
    "list_patients",
    "open_source",
    "patient_folds",
    "read_data_csv",
    "read_patient",
    "split_patients",
]
