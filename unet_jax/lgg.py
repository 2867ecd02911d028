"""Facts of the LGG data (Kaggle ``kaggle_3m``) that the data-set builder and the core share.

Dependency-free on purpose: the builder in ``datasets/`` imports this module, and nothing here
imports the builder, so dependencies point one way (``datasets/`` -> ``unet_jax``).

- the stored slice size and the ``data.csv`` fields kept as features;
- slice file names (``<volume>_<number>[_mask]``) and hidden entries to skip;
- the patient-level splits: the baseline's 10-patient holdout and deterministic k folds.
- where to get the data: :data:`MANUAL_DOWNLOAD_INSTRUCTIONS`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

#: Slices are stored as SLICE_SIZE x SLICE_SIZE (images x3 channels); the baseline's
#: preprocessing resizes every volume back to it.
SLICE_SIZE = 256

#: The data.csv columns stored as features (after ``Patient``), in the file's order.
CSV_FIELDS: tuple[str, ...] = (
    "RNASeqCluster",
    "MethylationCluster",
    "miRNACluster",
    "CNCluster",
    "RPPACluster",
    "OncosignCluster",
    "COCCluster",
    "histological_type",
    "neoplasm_histologic_grade",
    "tumor_tissue_site",
    "laterality",
    "tumor_location",
    "gender",
    "age_at_initial_pathologic",
    "race",
    "ethnicity",
    "death01",
)

#: The stored value of an empty data.csv field (all fields are non-negative integer codes).
MISSING = -1

#: The baseline's validation holdout: random.seed(42); random.sample(sorted(patients), k=10).
HOLDOUT_SEED = 42
HOLDOUT_SIZE = 10

#: What to download and where to put it; repeated by every "data not found" error.
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the "Brain MRI segmentation" data set (LGG, 110 patients, folder kaggle_3m) from Kaggle:
  https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation
(the "Download" button gives a zip archive, usually named archive.zip; or run
`kaggle datasets download mateuszbuda/lgg-mri-segmentation`). Then put ONE of these in the manual
directory (the --manual_dir you pass, by default <data_dir>/downloads/manual/):
  - the zip archive itself, as downloaded (it is read in place, nothing is unpacked);
  - the unpacked archive (kaggle_3m/ and lgg-mri-segmentation/kaggle_3m/; each slice is read once);
  - a bare kaggle_3m/ folder: kaggle_3m/data.csv and kaggle_3m/TCGA_<inst>_<id>_<date>/ patient
    folders holding TCGA_..._<N>.tif images and TCGA_..._<N>_mask.tif masks.
The manual directory may also be the kaggle_3m folder itself.
"""

#: Suffix of a mask's file stem: ``TCGA_CS_4941_19960909_12_mask.tif`` masks slice 12.
MASK_SUFFIX = "_mask"

_SLICE_STEM = re.compile(r"^(?P<volume>.+)_(?P<number>\d+)(?P<mask>_mask)?$")


class LGGDataError(ValueError):
    """The input data is not the LGG data as expected; the message names the offending file."""


def is_hidden(name: str) -> bool:
    """Entries skipped when a folder or archive is listed (dot files, macOS zip metadata)."""
    return name.startswith(".") or name == "__MACOSX"


def parse_slice_stem(stem: str) -> tuple[str, int | None, bool]:
    """``(volume, slice number, is_mask)`` of a file stem ``<volume>_<number>[_mask]``.

    An unnumbered stem gives ``(stem, None, False)`` (``stem`` without a trailing ``_mask``
    and ``True`` when it has one). Slice numbers start at 1 and are not zero-padded, so they
    are compared as integers, never as text.
    """
    m = _SLICE_STEM.match(stem)
    if m is None:
        if stem.endswith(MASK_SUFFIX):
            return stem[: -len(MASK_SUFFIX)], None, True
        return stem, None, False
    return m["volume"], int(m["number"]), m["mask"] is not None


def csv_key(patient_id: str) -> str:
    """The data.csv ``Patient`` value of a patient folder: the folder name without its date."""
    stem, _, date = patient_id.rpartition("_")
    return stem if stem and date.isdigit() else patient_id


def holdout_patients(
    patient_ids: Iterable[str], k: int = HOLDOUT_SIZE, seed: int = HOLDOUT_SEED
) -> list[str]:
    """The baseline's validation patients: ``random.seed(seed); random.sample(sorted(ids), k)``.

    Uses a private ``random.Random`` (same sequence as seeding the global one). Returned in
    the order drawn.
    """
    ids = sorted(set(patient_ids))
    if k > len(ids):
        raise ValueError(f"cannot hold out {k} of {len(ids)} patients")
    return random.Random(seed).sample(ids, k=k)


def split_patients(patient_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(train, validation)`` patient ids (sorted) of the baseline's holdout split.

    With fewer than 2 * :data:`HOLDOUT_SIZE` patients (small test data), the holdout takes
    ``max(1, n // 5)`` patients instead of 10, drawn the same way.
    """
    ids = sorted(set(patient_ids))
    k = HOLDOUT_SIZE if len(ids) >= 2 * HOLDOUT_SIZE else max(1, len(ids) // 5)
    if len(ids) < 2:
        raise LGGDataError(f"need at least 2 patients to split, got {len(ids)}")
    val = set(holdout_patients(ids, k=k))
    return [p for p in ids if p not in val], sorted(val)


def patient_folds(
    patient_ids: Iterable[str], k: int = 5, seed: int = 0
) -> list[tuple[list[str], list[str]]]:
    """Deterministic patient-level k-fold split for cross-validation.

    The sorted unique ids are shuffled with ``random.Random(seed)`` and dealt into ``k`` folds
    whose sizes differ by at most one; fold ``i`` validates on its patients and trains on all
    others. Every patient is validated exactly once. The result depends only on the set of ids,
    ``k`` and ``seed`` (not on their order).

    Returns:
      ``[(train_ids, val_ids)] * k``, each list sorted.
    """
    ids = sorted(set(patient_ids))
    if not 2 <= k <= len(ids):
        raise ValueError(f"need 2 <= k <= number of patients ({len(ids)}), got k={k}")
    order = list(ids)
    random.Random(seed).shuffle(order)
    folds = [sorted(order[i::k]) for i in range(k)]
    out = []
    for i in range(k):
        val = set(folds[i])
        out.append(([p for p in ids if p not in val], folds[i]))
    return out
