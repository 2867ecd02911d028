"""Checking and reading the Kaggle LGG download (``kaggle_3m``), wherever :mod:`.archive` found it.

The patient folders and their slice files are checked strictly (errors name the file), data.csv is
read in either spelling the archive holds, and one patient's examples are computed here (what the
builder's worker processes run). This module itself imports nothing of TensorFlow Datasets;
importing it through the package still loads TFDS, because the package's ``__init__`` registers
the builder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import preprocess, slice_io
from unet_jax.lgg import (
    CSV_FIELDS,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    MISSING,
    SLICE_SIZE,
    LGGDataError,
    csv_key,
    is_hidden,
    parse_slice_stem,
)

from .archive import Source, as_source

__all__ = [
    "LGGDataWarning",
    "ZLIB_LEVEL",
    "PatientFiles",
    "list_patients",
    "read_data_csv",
    "patient_metadata",
    "read_patient",
    "patient_examples",
]

#: zlib level of the stored pixels: level 1 compresses these slices 3x faster than TFDS's default
#: (6) for files about 8 % larger (measured on the real data); decoding is the same.
ZLIB_LEVEL = 1


class LGGDataWarning(UserWarning):
    """Something about the input that does not stop the build (e.g. a patient not in data.csv)."""


# --------------------------------------------------------------------------------------------
# Patient folders and data.csv.


@dataclasses.dataclass(frozen=True)
class PatientFiles:
    """A checked patient folder: slices ``1..num_slices`` each with image and mask.

    Attributes:
      patient_id: the folder name, e.g. ``TCGA_CS_4941_19960909``.
      num_slices: number of slices; files ``<id>/<id>_<n>.tif`` and ``<id>/<id>_<n>_mask.tif``.
    """

    patient_id: str
    num_slices: int

    def image_file(self, number: int) -> str:
        """Path of slice ``number``'s image, relative to the kaggle_3m root."""
        return f"{self.patient_id}/{self.patient_id}_{number}.tif"

    def mask_file(self, number: int) -> str:
        """Path of slice ``number``'s mask, relative to the kaggle_3m root."""
        return f"{self.patient_id}/{self.patient_id}_{number}_mask.tif"


def list_patients(
    root: Path | zipfile.Path | Source | str | os.PathLike,
) -> list[PatientFiles]:
    """Check and list the patient folders of a kaggle_3m folder, sorted by name.

    Raises:
      LGGDataError: naming the file or folder, for: a file in a patient folder that is not
        ``<folder>_<N>.tif`` / ``<folder>_<N>_mask.tif``, an image without its mask or the reverse,
        a patient folder with no slices, gaps or duplicates in the slice numbers, a .tif file
        outside the patient folders, no patient folders at all.
    """
    source = as_source(root)
    entries = source.entries()
    for name in entries.pop(""):
        if name.lower().endswith((".tif", ".tiff")):
            raise LGGDataError(
                f"{source.describe(name)}: a slice outside any patient folder (slices belong in "
                "kaggle_3m/<patient folder>/)"
            )
    patients = []
    for folder in sorted(entries):
        if is_hidden(folder):
            warnings.warn(f"{source.describe(folder)}: hidden folder ignored", LGGDataWarning)
            continue
        patients.append(_check_patient(source, folder, entries[folder]))
    if not patients:
        raise LGGDataError(
            f"{source.describe()}: no patient folders\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    return patients


def _check_patient(source: Source, folder: str, names: Iterable[str]) -> PatientFiles:
    images: dict[int, str] = {}
    masks: dict[int, str] = {}
    for name in names:
        if is_hidden(name):
            warnings.warn(
                f"{source.describe(folder + '/' + name)}: hidden file ignored", LGGDataWarning
            )
            continue
        volume, number, is_mask = (
            parse_slice_stem(name[: -len(".tif")]) if name.endswith(".tif") else (name, None, False)
        )
        if number is None or volume != folder:
            raise LGGDataError(
                f"{source.describe(folder + '/' + name)}: unexpected entry in a patient folder "
                f"(expected only {folder}_<N>.tif images and {folder}_<N>_mask.tif masks)"
            )
        table = masks if is_mask else images
        if number in table:
            raise LGGDataError(
                f"{source.describe(folder + '/' + name)}: slice number {number} appears twice "
                f"(also {table[number]})"
            )
        table[number] = name
    if not images and not masks:
        raise LGGDataError(f"{source.describe(folder)}: patient folder with no slices")
    for number in sorted(set(images) - set(masks)):
        raise LGGDataError(
            f"{source.describe(folder + '/' + images[number])}: image without its mask "
            f"{folder}_{number}_mask.tif"
        )
    for number in sorted(set(masks) - set(images)):
        raise LGGDataError(
            f"{source.describe(folder + '/' + masks[number])}: mask without its image "
            f"{folder}_{number}.tif"
        )
    numbers = sorted(images)
    missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise LGGDataError(
            f"{source.describe(folder)}: gaps in the slice numbers: no slice {shown} "
            f"(expected {folder}_1.tif .. {folder}_{numbers[-1]}.tif)"
        )
    return PatientFiles(folder, len(numbers))


def read_data_csv(
    root: Path | zipfile.Path | Source | str | os.PathLike,
) -> dict[str, dict[str, int]]:
    """Read ``data.csv`` (``,`` or ``;`` separated, LF or CRLF) into ``{Patient: {field: int}}``.

    Empty fields become :data:`MISSING`. A missing data.csv gives a warning and ``{}``.

    Raises:
      LGGDataError: naming data.csv (and the line) for missing columns, malformed rows,
        non-integer values or a patient listed twice.
    """
    source = as_source(root)
    where = source.describe("data.csv")
    if not source.exists("data.csv"):
        warnings.warn(
            f"{where}: not found; every patient's data.csv fields are stored as missing "
            f"({MISSING})",
            LGGDataWarning,
        )
        return {}
    with source.open("data.csv") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LGGDataError(f"{where}: not UTF-8 text ({e})") from e
    lines = text.splitlines()
    if not lines:
        raise LGGDataError(f"{where}: empty file")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    if "Patient" not in header:
        raise LGGDataError(f"{where}: no 'Patient' column in the header {header}")
    absent = [f for f in CSV_FIELDS if f not in header]
    if absent:
        raise LGGDataError(f"{where}: missing columns {absent}")
    extra = [h for h in header if h != "Patient" and h not in CSV_FIELDS]
    if extra:
        warnings.warn(f"{where}: columns {extra} are not stored", LGGDataWarning)
    col = {h: i for i, h in enumerate(header)}
    table: dict[str, dict[str, int]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not v.strip() for v in row):
            continue  # blank line (e.g. a trailing newline)
        if len(row) != len(header):
            raise LGGDataError(
                f"{where}, line {line_no}: {len(row)} fields, the header has {len(header)}"
            )
        patient = row[col["Patient"]].strip()
        if not patient:
            raise LGGDataError(f"{where}, line {line_no}: empty Patient")
        if patient in table:
            raise LGGDataError(f"{where}, line {line_no}: patient {patient} listed twice")
        values = {}
        for field in CSV_FIELDS:
            value = row[col[field]].strip()
            if value == "":
                values[field] = MISSING
                continue
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not number.is_integer() or number < 0:
                raise LGGDataError(
                    f"{where}, line {line_no}: {field}={value!r} is not a non-negative integer code"
                )
            values[field] = int(number)
        table[patient] = values
    return table


def patient_metadata(
    patients: Sequence[PatientFiles], table: dict[str, dict[str, int]], where: str
) -> dict[str, dict[str, int]]:
    """data.csv fields per patient folder; a patient missing from data.csv gets a warning and
    :data:`MISSING` for every field."""
    out = {}
    for p in patients:
        key = csv_key(p.patient_id)
        if key not in table:
            warnings.warn(
                f"{p.patient_id}: no row {key!r} in {where}; its data.csv fields are stored as "
                f"missing ({MISSING})",
                LGGDataWarning,
            )
            out[p.patient_id] = {f: MISSING for f in CSV_FIELDS}
        else:
            out[p.patient_id] = dict(table[key])
    return out


# --------------------------------------------------------------------------------------------
# Pixels.


def _read_tif(source: Source, rel: str, what: slice_io.SliceKind) -> np.ndarray:
    """One slice file through the checked reader that predict uses too; errors as
    :class:`LGGDataError` naming the file."""
    name = source.describe(rel)
    try:
        with source.open(rel) as f:
            return slice_io.read_slice(f, what, name=name)
    except LGGDataError:
        raise
    except slice_io.SliceFileError as e:
        if e.cause is None:  # read, but not an 8-bit image/mask
            raise LGGDataError(str(e)) from e
        error = e.cause
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # opening it (file or archive member)
        error = e
    raise LGGDataError(
        f"{name}: cannot read the TIFF file ({type(error).__name__}: {error})"
    ) from error


def _read_checked(source: Source, rel: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Read one .tif and insist on ``shape`` and uint8 (the builder's rule beyond the
    reader's); the error names the file."""
    array = _read_tif(source, rel, what)
    if array.shape != tuple(shape) or array.dtype != np.uint8:
        raise LGGDataError(
            f"{source.describe(rel)}: {what} of shape {array.shape} and dtype {array.dtype}, "
            f"expected {tuple(shape)} uint8"
        )
    return array


def read_patient(
    root: Path | zipfile.Path | Source | str | os.PathLike, patient: PatientFiles
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a patient's slices in slice-number order.

    Returns:
      ``(images, masks)``: ``(N, 256, 256, 3)`` uint8 and ``(N, 256, 256)`` uint8 in {0, 255}.

    Raises:
      LGGDataError: naming the file, for an unreadable or truncated .tif, a wrong shape or dtype,
        or a mask with values other than 0 and 255.
    """
    source = as_source(root)
    n = patient.num_slices
    images = np.empty((n, SLICE_SIZE, SLICE_SIZE, 3), np.uint8)
    masks = np.empty((n, SLICE_SIZE, SLICE_SIZE), np.uint8)
    for k in range(n):
        image = _read_checked(source, patient.image_file(k + 1), images.shape[1:], "image")
        rel = patient.mask_file(k + 1)
        mask = _read_checked(source, rel, masks.shape[1:], "mask")
        bad = (mask != 0) & (mask != 255)
        if bad.any():
            values = np.unique(mask[bad])[:10].tolist()
            raise LGGDataError(
                f"{source.describe(rel)}: mask values other than 0 and 255: {values}"
            )
        images[k] = image
        masks[k] = mask
    return images, masks


# --------------------------------------------------------------------------------------------
# One patient's examples (what a worker process computes).


def patient_examples(
    root: Source,
    patient: PatientFiles,
    config: str,
    metadata: dict[str, int],
) -> list[dict[str, Any]]:
    """The examples (one per slice) of one patient in the ``raw`` or ``baseline`` form.

    Args:
      root: where the data is.
      patient: the (checked) patient folder.
      config: ``"raw"`` or ``"baseline"``.
      metadata: the patient's data.csv fields.

    Returns:
      One dict per slice, in slice order, matching the builder's features; ``image`` and ``mask``
      as ``zlib.compress(array.tobytes(), ZLIB_LEVEL)`` (what ``tfds.features.Tensor(encoding=
      "zlib")`` stores), so that worker processes do the compression, not the writing process.
    """
    if config not in preprocess.MODES:
        raise ValueError(f"unknown config {config!r}")
    images, masks = read_patient(root, patient)
    try:
        volume = preprocess.prepare_volume(images, masks, config, size=SLICE_SIZE)
    except ValueError as e:
        raise LGGDataError(f"{root.describe(patient.patient_id)}: {e}") from e
    z0, z1 = volume.geometry.z_range
    slice_numbers = range(z0 + 1, z1 + 1)
    common = {
        "channel_mean": np.asarray(volume.channel_mean, np.float32),
        "channel_std": np.asarray(volume.channel_std, np.float32),
        "patient_id": patient.patient_id,
        "num_slices": np.int32(len(slice_numbers)),
        "crop_box": np.asarray(volume.geometry.crop_box, np.int32),
        "padding": np.asarray(volume.geometry.padding, np.int32),
        **{f: np.int32(metadata[f]) for f in CSV_FIELDS},
    }
    out = []
    for k, number in enumerate(slice_numbers):
        image, mask = volume.image[k], volume.mask[k][..., None]
        # tobytes() writes C order whatever the layout.
        image = zlib.compress(image.tobytes(), ZLIB_LEVEL)
        mask = zlib.compress(mask.tobytes(), ZLIB_LEVEL)
        out.append({"image": image, "mask": mask, "slice_index": np.int32(number), **common})
    return out
