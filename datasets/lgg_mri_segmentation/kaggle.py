"""Reading the Kaggle LGG download (``kaggle_3m``) as users have it, with strict checks.

This module itself imports nothing of TensorFlow Datasets (it is what the builder's worker
processes compute); importing it through the package still loads TFDS, because the package's
``__init__`` registers the builder.

Accepted inputs (see :func:`find_kaggle_root`): the Kaggle zip archive itself, the unpacked
archive (which holds the data twice: ``kaggle_3m/`` and ``lgg-mri-segmentation/kaggle_3m/``; each
slice is read once), or a bare ``kaggle_3m`` folder (or a folder holding it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence

import numpy as np
from PIL import Image

from unet_jax import preprocess

__all__ = [
    "LGGDataError",
    "LGGDataWarning",
    "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "SLICE_SIZE",
    "CSV_FIELDS",
    "MISSING",
    "ZLIB_LEVEL",
    "HOLDOUT_SEED",
    "HOLDOUT_SIZE",
    "Source",
    "PatientFiles",
    "find_kaggle_root",
    "open_source",
    "list_patients",
    "read_data_csv",
    "patient_metadata",
    "csv_key",
    "read_patient",
    "holdout_patients",
    "split_patients",
    "patient_folds",
    "patient_examples",
]

log = logging.getLogger(__name__)

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

#: Slices of the Kaggle data are SLICE_SIZE x SLICE_SIZE (images x3 channels); the builder requires it.
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

#: zlib level of the stored pixels: level 1 compresses these slices 3x faster than TFDS's default
#: (6) for files about 8 % larger (measured on the real data); decoding is the same.
ZLIB_LEVEL = 1

#: The stored value of an empty data.csv field (all fields are non-negative integer codes).
MISSING = -1

#: The baseline's validation holdout: random.seed(42); random.sample(sorted(patients), k=10).
HOLDOUT_SEED = 42
HOLDOUT_SIZE = 10

_SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tif$")


class LGGDataError(ValueError):
    """The input data is not the LGG data as expected; the message names the offending file."""


class LGGDataWarning(UserWarning):
    """Something about the input that does not stop the build (e.g. a patient not in data.csv)."""


# --------------------------------------------------------------------------------------------
# Where the data is: a folder or a zip archive.


@dataclasses.dataclass(frozen=True)
class Source:
    """A ``kaggle_3m`` folder, on disk or inside a zip archive; picklable (for worker processes).

    Attributes:
      root: the folder (a path on disk), or its member prefix inside ``archive`` (``"kaggle_3m"``).
      archive: path of the zip archive, or ``None`` for a folder on disk.
    """

    root: str
    archive: str | None = None

    def describe(self, rel: str = "") -> str:
        """A human-readable location of ``rel`` (relative to the root), for error messages."""
        if self.archive is None:
            return os.path.join(self.root, rel) if rel else self.root
        inner = f"{self.root}/{rel}" if rel else f"{self.root}/"
        return f"{self.archive}!{inner}"

    def open(self, rel: str) -> BinaryIO:
        """Open the file ``rel`` (``/``-separated, relative to the root) for binary reading."""
        if self.archive is None:
            return open(os.path.join(self.root, rel), "rb")
        return _zip(self.archive).open(f"{self.root}/{rel}")

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` exists."""
        if self.archive is None:
            return os.path.isfile(os.path.join(self.root, rel))
        return f"{self.root}/{rel}" in _zip_index(self.archive)[1]

    def entries(self) -> dict[str, list[str]]:
        """``{folder: [file names]}`` for the root (key ``""``) and each folder directly in it."""
        if self.archive is None:
            out: dict[str, list[str]] = {"": []}
            with os.scandir(self.root) as it:
                for entry in it:
                    if entry.is_dir():
                        out[entry.name] = sorted(os.listdir(entry.path))
                    else:
                        out[""].append(entry.name)
            out[""].sort()
            return out
        dirs, files = _zip_index(self.archive)
        prefix = f"{self.root}/"
        out = {"": []}
        for d in dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                out.setdefault(d[len(prefix) :], [])
        for f in files:
            if not f.startswith(prefix):
                continue
            rest = f[len(prefix) :]
            parts = rest.split("/")
            if len(parts) == 1:
                out[""].append(rest)
            else:
                out.setdefault(parts[0], [])
                if len(parts) == 2:
                    out[parts[0]].append(parts[1])
                else:  # deeper than a patient folder: reported as an unexpected entry
                    out[parts[0]].append(parts[1] + "/")
        return {k: sorted(set(v)) for k, v in out.items()}


_ZIPS: dict[str, zipfile.ZipFile] = {}
_ZIP_INDEX: dict[str, tuple[frozenset[str], frozenset[str]]] = {}


def _zip(archive: str) -> zipfile.ZipFile:
    # One open handle per archive and process (worker processes open their own).
    zf = _ZIPS.get(archive)
    if zf is None:
        try:
            zf = zipfile.ZipFile(archive)
        except (OSError, zipfile.BadZipFile) as e:
            raise LGGDataError(f"{archive}: cannot read the zip archive ({e})") from e
        _ZIPS[archive] = zf
    return zf


def _zip_index(archive: str) -> tuple[frozenset[str], frozenset[str]]:
    """(folders, files) of an archive; folders include those only implied by file paths."""
    idx = _ZIP_INDEX.get(archive)
    if idx is None:
        dirs, files = set(), set()
        for name in _zip(archive).namelist():
            if name.endswith("/"):
                dirs.add(name.rstrip("/"))
            else:
                files.add(name)
            parts = name.rstrip("/").split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        idx = (frozenset(dirs), frozenset(files))
        _ZIP_INDEX[archive] = idx
    return idx


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _folder_candidates(manual_dir: Path, max_depth: int = 3) -> list[Path]:
    """Folders (at most ``max_depth`` below ``manual_dir``) that directly hold TCGA_* folders
    with .tif files; the search does not descend into such a folder."""
    found = []

    def holds_patients(d: Path) -> bool:
        try:
            children = [c for c in os.scandir(d) if c.is_dir() and c.name.startswith("TCGA_")]
        except OSError:
            return False
        for c in children:
            try:
                if any(n.endswith(".tif") for n in os.listdir(c.path)):
                    return True
            except OSError:
                continue
        return False

    def walk(d: Path, depth: int) -> None:
        if holds_patients(d):
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            subdirs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not _is_hidden(e.name))
        except OSError:
            return
        for s in subdirs:
            if not os.path.basename(s).startswith("TCGA_"):
                walk(Path(s), depth + 1)

    walk(manual_dir, 0)
    return found


def _zip_candidates(manual_dir: Path, max_depth: int = 2) -> list[tuple[Path, str]]:
    """(archive, member prefix) of the kaggle_3m-like folders inside zip archives."""
    out = []
    for dirpath, dirnames, filenames in os.walk(manual_dir):
        depth = len(Path(dirpath).relative_to(manual_dir).parts)
        dirnames[:] = [] if depth >= max_depth else [d for d in dirnames if not _is_hidden(d)]
        for f in sorted(filenames):
            if not f.lower().endswith(".zip"):
                continue
            archive = str(Path(dirpath) / f)
            prefixes = set()
            for name in _zip_index(archive)[1]:
                parts = name.split("/")
                if len(parts) >= 3 and parts[-2].startswith("TCGA_") and name.endswith(".tif"):
                    prefixes.add("/".join(parts[:-2]))
            out += [(Path(archive), p) for p in sorted(prefixes) if p]
    return out


def _listing(source: Source) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in source.entries().items() if k}


def _pick_copy(sources: list[Source], what: str) -> Source:
    """One of several kaggle_3m copies; they must hold the same folders and files."""
    if len(sources) == 1:
        return sources[0]
    # Prefer the shallowest (the archive's own kaggle_3m/ with the comma-separated data.csv).
    sources = sorted(sources, key=lambda s: (s.root.count("/") + s.root.count(os.sep), s.root))
    first = _listing(sources[0])
    for other in sources[1:]:
        listing = _listing(other)
        if listing != first:
            diff = sorted(set(first.items()) ^ set(listing.items()))[0][0]
            raise LGGDataError(
                f"found {len(sources)} copies of the data in {what} that differ (e.g. in patient "
                f"folder {diff!r}): {sources[0].describe()} and {other.describe()}. Keep only one.\n\n"
                + MANUAL_DOWNLOAD_INSTRUCTIONS
            )
    log.info(
        "Found %d identical copies of kaggle_3m in %s (as the Kaggle archive unpacks); "
        "reading %s only, so each slice counts once.",
        len(sources), what, sources[0].describe(),
    )
    return sources[0]


def open_source(manual_dir: str | os.PathLike) -> Source:
    """Locate the data in ``manual_dir`` (see :func:`find_kaggle_root`) as a :class:`Source`."""
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise LGGDataError(
            f"manual directory {manual_dir} does not exist.\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    folders = _folder_candidates(manual_dir)
    if folders:
        return _pick_copy([Source(str(f)) for f in folders], str(manual_dir))
    zips = _zip_candidates(manual_dir)
    if zips:
        archives = sorted({a for a, _ in zips})
        if len(archives) > 1:
            raise LGGDataError(
                f"found several zip archives with the data in {manual_dir}: "
                f"{', '.join(map(str, archives))}. Keep only one.\n\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return _pick_copy([Source(p, str(a)) for a, p in zips], str(archives[0]))
    try:
        contents = sorted(os.listdir(manual_dir))
    except OSError:
        contents = []
    shown = ", ".join(contents[:10]) + (", ..." if len(contents) > 10 else "")
    what = f"it holds: {shown}" if contents else "it is empty"
    if any(c.endswith(".tif") for c in contents):
        what += "; this looks like one patient's folder: pass the folder above the patient folders"
    raise LGGDataError(
        f"no LGG data found in the manual directory {manual_dir} ({what}): expected a folder of "
        "TCGA_* patient folders with .tif slices (kaggle_3m) or the Kaggle zip archive.\n\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS
    )


def find_kaggle_root(manual_dir: str | os.PathLike) -> Path | zipfile.Path:
    """The ``kaggle_3m`` folder inside ``manual_dir``, as users have the download.

    Looks (up to three folders deep) for a folder holding ``TCGA_*`` patient folders with .tif
    files: ``manual_dir`` itself, ``manual_dir/kaggle_3m``, or the unpacked archive's two copies
    (``kaggle_3m`` and ``lgg-mri-segmentation/kaggle_3m``, checked to hold the same files; the
    shallower one is used). Failing that, it looks inside ``*.zip`` archives (two levels deep) and
    returns a :class:`zipfile.Path` to the folder inside the archive (read in place).

    Raises:
      LGGDataError: nothing found, the directory is missing, or copies differ (the message repeats
        the download instructions).
    """
    source = open_source(manual_dir)
    if source.archive is None:
        return Path(source.root)
    return zipfile.Path(_zip(source.archive), at=f"{source.root}/")


def _source_from_root(root: Path | zipfile.Path | Source | str | os.PathLike) -> Source:
    if isinstance(root, Source):
        return root
    if isinstance(root, zipfile.Path):
        return Source(root.at.rstrip("/"), str(root.root.filename))
    return Source(str(root))


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
    source = _source_from_root(root)
    entries = source.entries()
    for name in entries.pop(""):
        if name.lower().endswith((".tif", ".tiff")):
            raise LGGDataError(
                f"{source.describe(name)}: a slice outside any patient folder (slices belong in "
                "kaggle_3m/<patient folder>/)"
            )
    patients = []
    for folder in sorted(entries):
        if _is_hidden(folder):
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
        if _is_hidden(name):
            warnings.warn(f"{source.describe(folder + '/' + name)}: hidden file ignored", LGGDataWarning)
            continue
        m = _SLICE_RE.match(name)
        if m is None or m["stem"] != folder:
            raise LGGDataError(
                f"{source.describe(folder + '/' + name)}: unexpected entry in a patient folder "
                f"(expected only {folder}_<N>.tif images and {folder}_<N>_mask.tif masks)"
            )
        number = int(m["number"])
        table = masks if m["mask"] else images
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


def csv_key(patient_id: str) -> str:
    """The data.csv ``Patient`` value of a patient folder: the folder name without its date."""
    stem, _, date = patient_id.rpartition("_")
    return stem if stem and date.isdigit() else patient_id


def read_data_csv(
    root: Path | zipfile.Path | Source | str | os.PathLike,
) -> dict[str, dict[str, int]]:
    """Read ``data.csv`` (``,`` or ``;`` separated, LF or CRLF) into ``{Patient: {field: int}}``.

    Empty fields become :data:`MISSING`. A missing data.csv gives a warning and ``{}``.

    Raises:
      LGGDataError: naming data.csv (and the line) for missing columns, malformed rows,
        non-integer values or a patient listed twice.
    """
    source = _source_from_root(root)
    where = source.describe("data.csv")
    if not source.exists("data.csv"):
        warnings.warn(
            f"{where}: not found; every patient's data.csv fields are stored as missing ({MISSING})",
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


def _read_tif(source: Source, rel: str) -> np.ndarray:
    try:
        with source.open(rel) as f:
            with Image.open(f) as img:
                return np.asarray(img)
    except LGGDataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile,
            Image.DecompressionBombError) as e:
        raise LGGDataError(
            f"{source.describe(rel)}: cannot read the TIFF file ({type(e).__name__}: {e})"
        ) from e


def _read_checked(source: Source, rel: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Read one .tif and insist on ``shape`` and uint8; the error names the file."""
    array = _read_tif(source, rel)
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
    source = _source_from_root(root)
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
# Splits by patient.


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
    images, masks = read_patient(root, patient)
    if config == "raw":
        mean, std = preprocess.channel_stats_uint8(images)
        image_out, mask_out = images, masks // 255  # uint8 stays uint8
        slice_numbers = range(1, patient.num_slices + 1)
        crop = (0, SLICE_SIZE, 0, SLICE_SIZE)
        pad = (0, 0, 0, 0)
    elif config == "baseline":
        try:
            pv = preprocess.preprocess_volume(images, masks, size=SLICE_SIZE)
        except ValueError as e:
            raise LGGDataError(f"{root.describe(patient.patient_id)}: {e}") from e
        image_out, mask_out = pv.image, pv.mask
        mean, std = pv.channel_mean, pv.channel_std
        z0, z1 = pv.geometry.z_range
        slice_numbers = range(z0 + 1, z1 + 1)
        crop, pad = pv.geometry.crop_box, pv.geometry.padding
    else:
        raise ValueError(f"unknown config {config!r}")
    common = {
        "channel_mean": np.asarray(mean, np.float32),
        "channel_std": np.asarray(std, np.float32),
        "patient_id": patient.patient_id,
        "num_slices": np.int32(len(slice_numbers)),
        "crop_box": np.asarray(crop, np.int32),
        "padding": np.asarray(pad, np.int32),
        **{f: np.int32(metadata[f]) for f in CSV_FIELDS},
    }
    out = []
    for k, number in enumerate(slice_numbers):
        image, mask = image_out[k], mask_out[k][..., None]
        # tobytes() writes C order whatever the layout.
        image = zlib.compress(image.tobytes(), ZLIB_LEVEL)
        mask = zlib.compress(mask.tobytes(), ZLIB_LEVEL)
        out.append({"image": image, "mask": mask, "slice_index": np.int32(number), **common})
    return out
