"""The project's synthetic data: seeded look-alikes of the Kaggle LGG download, on disk or in
memory.

The real data (110 patients of brain MR slices, ``kaggle_3m``) may not be redistributed with the
project, so tests and the ``smoke`` experiment use look-alike data written by
:func:`write_synthetic_kaggle3m`:

- patient folders ``TCGA_<XX>_<NNNN>_<YYYYMMDD>`` holding ``<folder>_<N>.tif`` (``size x size x 3``
  uint8, channels pre-contrast, FLAIR, post-contrast) and ``<folder>_<N>_mask.tif``
  (``size x size`` uint8 with values 0 and 255), slice numbers 1..N, not zero-padded;
- ``data.csv`` with the real header (``Patient`` = folder name without its date) and some empty
  fields, as in the real file.

Each volume is a brain-like phantom: a dark background, an ellipsoidal "brain" with smooth
texture, a bright skull shell, dark ventricles, and one or two lesion blobs that are bright in
FLAIR (channel 1) over a run of contiguous slices. The mask is exactly the lesion, so a small
U-Net learns it within a few hundred steps. The first and last slices cut the ellipsoid near its
poles, like the real volumes whose end slices hold little or no brain.

Writes are atomic: each output is written under a hidden name beside its place and renamed into
place when complete (:mod:`unet_jax.fileio`), so a killed write never leaves a
partial data set where a complete one is expected; the next write removes its leftovers.

The builder of the TFDS data set (``datasets/lgg_mri_segmentation``) requires 256x256 slices, as
in the real download; smaller ``size`` values are for fast tests of code that does not go through
it (e.g. ``unet_jax.preprocess``).

In memory, as a :class:`unet_jax.data.SplitData` (no files, no TFDS), two simpler kinds
whose content is cheap to draw:

- :func:`disc_split`: uniform noise inside a disc ("brain") with disc lesions bright in FLAIR in
  the middle half of every volume, at full size by default. For timing (the benchmarks): the work
  per example of the pipelines does not depend on the content.
- :func:`blob_split`: small noisy slices with a bright FLAIR disc on every slice but the first and
  last. For tests that train: a 4-feature U-Net learns it within a few hundred steps, and their
  thresholds were set on exactly this data.

Both assemble their volumes with :func:`split_from_volumes`, which computes the per-volume channel
statistics as the data set builder does.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from unet_jax.data import SplitData
from unet_jax.fileio import exclusive_lock, partial_path, remove_leftovers, replace_with
from unet_jax.lgg import CSV_FIELDS

__all__ = [
    "CSV_HEADER",
    "GENERATOR_VERSION",
    "blob_split",
    "blob_volume",
    "disc_split",
    "disc_volume",
    "split_from_volumes",
    "synthetic_volume",
    "write_synthetic_kaggle3m",
]

#: Version of what :func:`write_synthetic_kaggle3m` writes for given arguments: raise it whenever a
#: change of this module changes the files, so that data written before is not taken for current
#: (``experiments.data`` stamps the data it generates with it).
GENERATOR_VERSION = 1

#: The header of the real ``data.csv``, in its order (the builder's fields after ``Patient``).
CSV_HEADER: tuple[str, ...] = ("Patient",) + CSV_FIELDS

# Inclusive value ranges of the integer codes in the real data.csv (same order as CSV_HEADER[1:]).
_CSV_RANGES: tuple[tuple[int, int], ...] = (
    (1, 4),
    (1, 5),
    (1, 4),
    (1, 3),
    (1, 4),
    (1, 3),
    (1, 3),
    (1, 3),
    (1, 2),
    (1, 1),
    (1, 3),
    (1, 6),
    (1, 2),
    (20, 75),
    (1, 3),
    (1, 2),
    (0, 1),
)
_INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")


def synthetic_volume(
    rng: np.random.Generator, num_slices: int, size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom volume.

    Args:
      rng: source of randomness (the volume is a pure function of its state).
      num_slices: number of slices Z.
      size: in-plane size (square).

    Returns:
      ``(images, masks)``: uint8 arrays of shapes ``(Z, size, size, 3)`` and ``(Z, size, size)``,
      masks with values in {0, 255}.
    """
    f32 = np.float32

    def u(lo: float, hi: float) -> float:
        # Python floats keep the arithmetic below in float32 (NumPy scalars would promote it).
        return float(rng.uniform(lo, hi))

    z = np.linspace(-1.0, 1.0, num_slices, dtype=f32)[:, None, None]
    yx = np.linspace(-1.0, 1.0, size, dtype=f32)
    y = yx[None, :, None]
    x = yx[None, None, :]

    # Brain ellipsoid; its z radius sits close to 1 so the end slices cut it near the poles.
    cy, cx = u(-0.06, 0.06), u(-0.06, 0.06)
    ry, rx, rz = u(0.6, 0.78), u(0.48, 0.64), u(0.95, 1.1)
    r2 = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 + (z / rz) ** 2
    brain = r2 <= 1.0
    head = r2 <= 1.25
    skull = head & ~brain
    ventricles = ((y - cy + 0.05) / (0.25 * ry)) ** 2 + ((x - cx) / (0.18 * rx)) ** 2 + (
        z / (0.35 * rz)
    ) ** 2 <= 1.0

    # Smooth texture: coarse noise upsampled linearly, as matrix products (cheap at any size).
    coarse = rng.standard_normal((max(2, num_slices // 4 + 2), 9, 9, 3), dtype=f32)
    img = _upsample3(coarse, num_slices, size)
    img *= 12.0
    img += np.array([u(80, 150), u(80, 150), u(80, 150)], f32)  # brain level per channel
    img *= brain[..., None]
    img *= np.where((ventricles & brain)[..., None], np.array([0.6, 0.35, 0.6], f32), f32(1))
    img += skull[..., None] * np.array([u(150, 220), u(40, 80), u(150, 220)], f32)

    # Lesions: bright in FLAIR, a little in the other channels, in contiguous slices.
    mask = np.zeros((num_slices, size, size), bool)
    for _ in range(int(rng.integers(1, 3))):
        lz, lrz = u(-0.45, 0.45), u(0.2, 0.45)
        angle, dist = u(0.0, np.pi), u(0.25, 0.55)
        side = 1.0 if rng.random() < 0.5 else -1.0
        ly = cy + side * dist * ry * float(np.sin(angle))
        lx = cx + dist * rx * float(np.cos(angle))
        lry, lrx = u(0.09, 0.2), u(0.09, 0.2)
        blob = ((y - ly) / lry) ** 2 + ((x - lx) / lrx) ** 2 + ((z - lz) / lrz) ** 2 <= 1.0
        blob &= brain
        mask |= blob
        img += blob[..., None] * np.array([u(5, 20), u(70, 100), u(5, 30)], f32)

    # Noise: random crops of one noise field twice the slice size (drawing fresh noise for
    # every pixel would dominate the run time).
    field = rng.standard_normal((2 * size, 2 * size, 3), dtype=f32)
    field *= 3.0
    offsets = rng.integers(0, size, (num_slices, 2))
    for k, (oy, ox) in enumerate(offsets):
        img[k] += field[oy : oy + size, ox : ox + size]
    # Dark background with a little positive noise, removed by the baseline's 10 % threshold.
    np.abs(img, out=img)
    img *= np.where(head, f32(1), f32(0.5))[..., None]
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    images = img.astype(np.uint8)
    masks = mask.astype(np.uint8) * np.uint8(255)
    return images, masks


def _linear_upsampling(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of linear interpolation from n_in >= 2 to n_out samples (pixel
    centres)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    # At most n_in - 2, so that lo + 1 is a sample (the last position gets frac == 1).
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m


def _upsample3(coarse: np.ndarray, num_slices: int, size: int) -> np.ndarray:
    """Trilinear upsampling of (z, y, x, c) noise to (num_slices, size, size, c)."""
    az = _linear_upsampling(num_slices, coarse.shape[0])
    ay = _linear_upsampling(size, coarse.shape[1])
    ax = _linear_upsampling(size, coarse.shape[2])
    small = np.einsum("Zz,zyxc->Zyxc", az, coarse)
    small = np.einsum("Yy,Zyxc->ZYxc", ay, small)
    return np.einsum("Xx,ZYxc->ZYXc", ax, small, optimize=True)


def _csv_rows(
    rng: np.random.Generator, patients: list[str], missing_rate: float
) -> list[list[str]]:
    rows = []
    for folder in sorted(patients):
        row = [folder.rsplit("_", 1)[0]]
        for lo, hi in _CSV_RANGES:
            row.append("" if rng.random() < missing_rate else str(int(rng.integers(lo, hi + 1))))
        rows.append(row)
    return rows


def _csv_bytes(rows: list[list[str]], style: str) -> bytes:
    if style == "comma":
        delimiter, newline = ",", "\n"
    elif style == "semicolon_crlf":
        delimiter, newline = ";", "\r\n"
    else:
        raise ValueError(f"unknown data.csv style {style!r}")
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=newline)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    return buf.getvalue().encode("ascii")


def _patient_names(rng: np.random.Generator, num_patients: int) -> list[str]:
    numbers = rng.choice(9000, size=num_patients, replace=False) + 1000
    names = []
    for i, number in enumerate(numbers):
        inst = _INSTITUTIONS[i % len(_INSTITUTIONS)]
        year = int(rng.integers(1995, 2006))
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        names.append(f"TCGA_{inst}_{number}_{year:04d}{month:02d}{day:02d}")
    return names


def write_synthetic_kaggle3m(
    root: Path | str,
    num_patients: int = 4,
    slices: tuple[int, int] = (12, 20),
    size: int = 256,
    seed: int = 0,
    *,
    layout: Literal["kaggle_3m", "kaggle-zip", "zip"] = "kaggle_3m",
    missing_rate: float = 0.15,
) -> Path:
    """Write a synthetic data set in the layout of the Kaggle LGG download.

    Each output (a ``kaggle_3m`` folder, the zip archive) is written aside under a hidden name
    (``.<name>.partial-*``) and renamed into place when complete, replacing what was there: a
    killed write leaves the previous output (or none), never a partial one. The hidden leftovers
    of a killed write are removed by the next write into ``root`` (concurrent writes into one
    ``root`` wait for each other where the platform has ``fcntl``).

    Args:
      root: output folder (created).
      num_patients: number of patient folders.
      slices: inclusive (min, max) number of slices per patient, drawn uniformly.
      size: in-plane size of each slice (the real data and the TFDS builder use 256).
      seed: the data set is a pure function of the arguments.
      layout: ``"kaggle_3m"``: ``root/kaggle_3m`` only. ``"kaggle-zip"``: the archive as it unpacks,
        ``root/kaggle_3m`` (comma ``data.csv``) and an identical copy
        ``root/lgg-mri-segmentation/kaggle_3m`` (``;``-separated ``data.csv`` with CRLF), like
        ``restore.py --layout kaggle-zip``. ``"zip"``: those two copies inside one archive
        ``root/lgg-mri-segmentation.zip`` and nothing unpacked.
      missing_rate: probability that a data.csv field is empty.

    Returns:
      The ``kaggle_3m`` folder (``root/kaggle_3m``), or the zip file for ``layout="zip"``.
    """
    if layout not in ("kaggle_3m", "kaggle-zip", "zip"):
        raise ValueError(f"unknown layout {layout!r}")
    lo, hi = slices
    if not 1 <= lo <= hi:
        raise ValueError(f"slices must be (min, max) with 1 <= min <= max, got {slices}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    copies = [("kaggle_3m", "comma")]
    if layout != "kaggle_3m":
        copies.append(("lgg-mri-segmentation/kaggle_3m", "semicolon_crlf"))
    with exclusive_lock(root):
        outputs = (
            [root / "lgg-mri-segmentation.zip"]
            if layout == "zip"
            else [root / prefix for prefix, _ in copies]
        )
        for out in outputs:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(out)
        rng = np.random.default_rng(seed)
        patients = _patient_names(rng, num_patients)
        rows = _csv_rows(rng, patients, missing_rate)
        csv_bytes = {style: _csv_bytes(rows, style) for style in ("comma", "semicolon_crlf")}

        def slice_files() -> Iterator[tuple[str, bytes]]:
            """``(path relative to kaggle_3m, TIFF bytes)`` of every slice, patient by patient
            (each encoded once, written to every copy)."""
            for folder in patients:
                images, masks = synthetic_volume(rng, int(rng.integers(lo, hi + 1)), size)
                for n, (image, mask) in enumerate(zip(images, masks), start=1):
                    for name, pixels in (
                        (f"{folder}_{n}.tif", image),
                        (f"{folder}_{n}_mask.tif", mask),
                    ):
                        buf = io.BytesIO()
                        Image.fromarray(pixels).save(buf, format="TIFF")
                        yield f"{folder}/{name}", buf.getvalue()

        if layout == "zip":
            (archive,) = outputs
            tmp = partial_path(archive)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for prefix, style in copies:
                    zf.writestr(f"{prefix}/data.csv", csv_bytes[style])
                for rel, data in slice_files():
                    for prefix, _ in copies:
                        zf.writestr(f"{prefix}/{rel}", data)
            os.replace(tmp, archive)
            return archive
        tmps = [partial_path(out) for out in outputs]
        for tmp in tmps:
            tmp.mkdir()
        for rel, data in slice_files():
            for tmp in tmps:
                (tmp / rel).parent.mkdir(exist_ok=True)
                (tmp / rel).write_bytes(data)
        for tmp, (_, style) in zip(tmps, copies):
            (tmp / "data.csv").write_bytes(csv_bytes[style])
        for tmp, out in zip(tmps, outputs):
            replace_with(out, tmp)
    return root / "kaggle_3m"


# ----------------------------------------------------------------------------- in-memory splits


def disc_volume(
    rng: np.random.Generator, num_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One volume of :func:`disc_split`: ``(images (Z, size, size, 3) uint8, masks (Z, size, size)
    uint8 in {0, 1})``; lesions on slices ``Z // 4`` to ``3 Z // 4`` (at least one slice)."""
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    images = rng.integers(0, 160, (num_slices, size, size, 3), dtype=np.uint8)
    images *= brain[None, :, :, None]
    masks = np.zeros((num_slices, size, size), np.uint8)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    for z in range(num_slices // 4, max(num_slices // 4 + 1, 3 * num_slices // 4)):
        r = size * rng.uniform(0.04, 0.12)
        lesion = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        masks[z] = lesion
        images[z, ..., 1] = np.where(lesion, 230, images[z, ..., 1])
    return images, masks


def blob_volume(
    rng: np.random.RandomState, num_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One volume of :func:`blob_split`: ``(images (Z, size, size, 3) uint8, masks (Z, size, size)
    uint8 in {0, 1})``; a disc of radius ``size / 8 + z % 3`` on every slice but the end ones."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.randint(size // 4, 3 * size // 4, 2)
    images = np.empty((num_slices, size, size, 3), np.uint8)
    masks = np.zeros((num_slices, size, size), np.uint8)
    for z in range(num_slices):
        images[z] = rng.randint(20, 90, (size, size, 3))
        if 0 < z < num_slices - 1:
            r = size / 8 + z % 3
            masks[z] = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            images[z, ..., 1] = np.where(masks[z] > 0, 220, images[z, ..., 1])
    return images, masks


def split_from_volumes(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]], patients: Sequence[str]
) -> SplitData:
    """A SplitData of whole volumes, one per patient, slices numbered from 1.

    Args:
      volumes: ``(images (Z, H, W, C) uint8, masks (Z, H, W) nonzero = lesion)`` per patient.
      patients: the patient ids, in the order of ``volumes``.
    """
    from unet_jax.preprocess import channel_stats_uint8

    if len(volumes) != len(patients):
        raise ValueError(f"{len(volumes)} volumes for {len(patients)} patients")
    stats = [channel_stats_uint8(images) for images, _ in volumes]
    return SplitData(
        images=np.concatenate([images for images, _ in volumes]),
        masks=np.concatenate([(masks > 0).astype(np.uint8) for _, masks in volumes])[..., None],
        volume=np.concatenate(
            [np.full(len(images), p, np.int32) for p, (images, _) in enumerate(volumes)]
        ),
        slice_index=np.concatenate(
            [np.arange(1, len(images) + 1, dtype=np.int32) for images, _ in volumes]
        ),
        mean=np.array([mean for mean, _ in stats], np.float32),
        std=np.array([std for _, std in stats], np.float32),
        patients=tuple(patients),
    )


def disc_split(
    num_patients: int = 100, slices: int = 33, size: int = 256, seed: int = 0
) -> SplitData:
    """``num_patients`` volumes of :func:`disc_volume` (patients ``SYNTH_000``, ...)."""
    rng = np.random.default_rng(seed)
    volumes = [disc_volume(rng, slices, size) for _ in range(num_patients)]
    return split_from_volumes(volumes, [f"SYNTH_{p:03d}" for p in range(num_patients)])


def blob_split(
    num_patients: int = 3, slices: int = 6, size: int = 32, seed: int = 0, prefix: str = "P"
) -> SplitData:
    """``num_patients`` volumes of :func:`blob_volume` (patients ``<prefix>00``, ...)."""
    rng = np.random.RandomState(seed)
    volumes = [blob_volume(rng, slices, size) for _ in range(num_patients)]
    return split_from_volumes(volumes, [f"{prefix}{p:02d}" for p in range(num_patients)])
