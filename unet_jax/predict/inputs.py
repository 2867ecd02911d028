"""Inputs of ``unet_jax.predict``: the ``--input`` paths as volumes, and their pixels.

Slices are read by :mod:`unet_jax.slice_io`, the checked reader the data-set builder uses, so a
file is accepted or refused alike by both; slice names follow :mod:`unet_jax.lgg`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unet_jax import slice_io
from unet_jax.lgg import MASK_SUFFIX, is_hidden, parse_slice_stem

__all__ = [
    "IMAGE_EXTENSIONS",
    "PredictError",
    "SliceFile",
    "VolumeSpec",
    "LoadedVolume",
    "discover",
    "check_volume",
    "read_volume",
]

#: File types read as slices (lower case).
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")


class PredictError(Exception):
    """Bad input, checkpoint or output location; the message says which and why."""


# ----------------------------------------------------------------------------- discovery


@dataclasses.dataclass(frozen=True)
class SliceFile:
    """One input slice: its file, slice number (None for an unnumbered lone slice) and mask."""

    path: Path
    number: int | None
    mask: Path | None


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A volume to predict: its name (the slices' ``<patient>`` prefix) and slices in order."""

    name: str
    slices: tuple[SliceFile, ...]
    source: str  # the folder of its slices ("files" when they come from several), for the CSV


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_mask(path: Path) -> bool:
    return parse_slice_stem(path.stem)[2]


def _find_mask(image: Path) -> Path | None:
    """``<stem>_mask<ext>`` beside ``image``: the same extension first, then the others."""
    suffixes = [image.suffix] + [e for e in IMAGE_EXTENSIONS if e != image.suffix.lower()]
    suffixes += [e.upper() for e in IMAGE_EXTENSIONS]
    for ext in suffixes:
        candidate = image.with_name(image.stem + MASK_SUFFIX + ext)
        if candidate.is_file():
            return candidate
    return None


def _slice_of(path: Path) -> tuple[str, int | None]:
    """(volume prefix, slice number) of a slice file name; (stem, None) when unnumbered."""
    volume, number, _ = parse_slice_stem(path.stem)
    return volume, number


def _volume_from_files(name: str, files: Sequence[Path], source: str) -> VolumeSpec:
    numbers: dict[int, Path] = {}
    for f in files:
        _, number = _slice_of(f)
        if number in numbers:
            raise PredictError(
                f"{f}: slice number {number} of volume {name!r} given twice "
                f"(also {numbers[number]})"
            )
        numbers[number] = f  # type: ignore[index]
    slices = tuple(SliceFile(numbers[n], n, _find_mask(numbers[n])) for n in sorted(numbers))
    return VolumeSpec(name, slices, source)


def _patient_folder(folder: Path, images: list[Path]) -> VolumeSpec:
    """A folder of slices as one volume; its slices must be ``<patient>_<n>`` of one patient."""
    prefixes: dict[str, list[Path]] = collections.defaultdict(list)
    for f in images:
        prefix, number = _slice_of(f)
        if number is None:
            raise PredictError(
                f"{f}: a slice in a patient folder must be named <patient>_<number>{f.suffix} "
                "(the number orders the slices of the volume)"
            )
        prefixes[prefix].append(f)
    if len(prefixes) > 1:
        shown = ", ".join(sorted(prefixes)[:5])
        raise PredictError(
            f"{folder}: holds slices of several volumes ({shown}); a patient folder is one volume. "
            "Give its files instead (--input FOLDER/*.tif) to group them by prefix."
        )
    ((prefix, files),) = prefixes.items()
    return _volume_from_files(prefix, files, str(folder))


def _folder_contents(folder: Path) -> tuple[list[Path], list[Path]]:
    """(slice images, sub-folders) directly in ``folder``, sorted, hidden entries skipped."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise PredictError(f"{folder}: cannot list the folder ({e})") from None
    images = [
        p
        for p in entries
        if p.is_file() and not is_hidden(p.name) and _is_image(p) and not _is_mask(p)
    ]
    dirs = [p for p in entries if p.is_dir() and not is_hidden(p.name)]
    return images, dirs


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _no_slices_message(folder: Path, dirs: Sequence[Path]) -> str:
    """Why a folder gave no volume: what it (and its sub-folders, where patient folders would
    be) holds instead, and what is read."""
    supported = "/".join(IMAGE_EXTENSIONS)
    counts: collections.Counter[str] = collections.Counter()
    masks = 0
    for d in [folder, *dirs]:
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for p in entries:
            if is_hidden(p.name) or not p.is_file():
                continue
            if _is_image(p):  # not a slice, so a mask
                masks += 1
            else:
                counts[p.suffix.lower() or "(no extension)"] += 1
    found = [
        _plural(n, f"{ext} file")
        for ext, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    if len(found) > 4:
        found = found[:3] + [f"files of {len(found) - 3} other types"]
    if masks:
        found.append(_plural(masks, "*_mask file") + " (ground truth, not slices)")
    reads = f"predict reads {supported} slices (not *_mask) in a folder or in patient folders in it"
    if not found:
        if not dirs:
            return f"{folder}: empty folder; {reads}"
        return f"{folder}: no files in it nor in the {_plural(len(dirs), 'folder')} in it; {reads}"
    where = f"{folder} nor in the {_plural(len(dirs), 'folder')} in it" if dirs else str(folder)
    return f"no slice files in {where}: found {', '.join(found)}; {reads}"


def discover(inputs: Sequence[str | os.PathLike]) -> tuple[list[VolumeSpec], list[str]]:
    """Turn the ``--input`` paths into volumes (sorted by name), checking names only.

    Returns ``(volumes, notices)``. Raises :class:`PredictError` for a missing path, an
    unsupported file type, an empty folder, badly named or duplicate slices, or two volumes of
    the same name.
    """
    if not inputs:
        raise PredictError("no input given")
    volumes: list[VolumeSpec] = []
    loose: dict[str, list[Path]] = collections.defaultdict(list)
    loose_masks: list[Path] = []
    notices: list[str] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise PredictError(f"{path}: no such file or directory")
        if path.is_file():
            if not _is_image(path):
                raise PredictError(
                    f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                    f"(supported: {', '.join(IMAGE_EXTENSIONS)})"
                )
            if _is_mask(path):
                loose_masks.append(path)
                continue
            loose[_slice_of(path)[0]].append(path)
            continue
        images, dirs = _folder_contents(path)
        if images:
            volumes.append(_patient_folder(path, images))
            continue
        found = []
        for d in dirs:
            sub_images, _ = _folder_contents(d)
            if sub_images:
                found.append(_patient_folder(d, sub_images))
        if not found:
            raise PredictError(_no_slices_message(path, dirs))
        volumes += found
    for prefix, files in loose.items():
        if len(files) == 1 and _slice_of(files[0])[1] is None:
            f = files[0]
            volumes.append(VolumeSpec(prefix, (SliceFile(f, None, _find_mask(f)),), str(f.parent)))
        elif any(_slice_of(f)[1] is None for f in files):
            raise PredictError(
                f"several files named {prefix}.* given: " + ", ".join(map(str, files))
            )
        else:
            # Named by their common folder when they share one, as the folder itself would be.
            parents = {str(f.parent) for f in files}
            volumes.append(
                _volume_from_files(prefix, files, parents.pop() if len(parents) == 1 else "files")
            )
    seen: dict[Path, str] = {}
    names: dict[str, VolumeSpec] = {}
    for v in volumes:
        if v.name in names:
            raise PredictError(
                f"two volumes named {v.name!r} (from {names[v.name].source} and "
                f"{v.source}); each volume must be given once"
            )
        names[v.name] = v
        for s in v.slices:
            key = s.path.resolve()
            if key in seen:
                raise PredictError(f"{s.path}: given twice")
            seen[key] = v.name
    used_masks = {s.mask.resolve() for v in volumes for s in v.slices if s.mask is not None}
    for m in loose_masks:
        if m.resolve() not in used_masks:
            notices.append(f"{m}: a ground-truth mask whose slice is not among the inputs; ignored")
    return sorted(volumes, key=lambda v: v.name), notices


# ----------------------------------------------------------------------------- reading


def _header(path: Path, what: slice_io.SliceKind) -> slice_io.SliceHeader:
    try:
        return slice_io.read_header(path, what, name=str(path))
    except slice_io.SliceFileError as e:
        raise PredictError(str(e)) from None


def _read_pixels(path: Path, what: slice_io.SliceKind) -> np.ndarray:
    try:
        return slice_io.read_slice(path, what, name=str(path))
    except slice_io.SliceFileError as e:
        raise PredictError(str(e)) from None


def check_volume(spec: VolumeSpec) -> tuple[int, int]:
    """Check a volume's file headers (readable, 8-bit, 1 or 3 channels, one size); its (H, W)."""
    size = None
    modes = set()
    for s in spec.slices:
        header = _header(s.path, "image")
        shape = (header.height, header.width)
        modes.add(header.mode)
        if size is None:
            size = shape
        elif shape != size:
            raise PredictError(
                f"{s.path}: slice of size {shape[0]}x{shape[1]}, but the other "
                f"slices of volume {spec.name!r} are {size[0]}x{size[1]}"
            )
        if s.mask is not None:
            mask_header = _header(s.mask, "mask")
            mshape = (mask_header.height, mask_header.width)
            if mshape != shape:
                raise PredictError(
                    f"{s.mask}: mask of size {mshape[0]}x{mshape[1]} for a slice of "
                    f"size {shape[0]}x{shape[1]}"
                )
    if len(modes) > 1:
        raise PredictError(f"volume {spec.name!r} mixes single-channel and 3-channel slices")
    assert size is not None
    return size


@dataclasses.dataclass
class LoadedVolume:
    """A volume's pixels: ``images`` (N, H, W, 3) uint8; ``truth`` (N, H, W) bool with
    ``has_truth`` (N,) saying which slices have a mask; ``channels`` of the input files."""

    spec: VolumeSpec
    images: np.ndarray
    truth: np.ndarray
    has_truth: np.ndarray
    channels: int


def read_volume(spec: VolumeSpec) -> tuple[LoadedVolume, list[str]]:
    """Read a volume's slices and masks; returns it and notices (e.g. single-channel input)."""
    images, truth, has_truth = [], [], []
    channels = 3
    for s in spec.slices:
        image = _read_pixels(s.path, "image")
        if image.ndim == 2:
            channels = 1
            # A single FLAIR image: the model expects (pre-contrast, FLAIR, post-contrast).
            image = np.repeat(image[..., None], 3, axis=-1)
        images.append(image)
        if s.mask is None:
            truth.append(np.zeros(image.shape[:2], bool))
            has_truth.append(False)
            continue
        mask = _read_pixels(s.mask, "mask")
        values = np.unique(mask)
        if values.size > 2 or (values.size == 2 and values[0] != 0):
            raise PredictError(
                f"{s.mask}: not a binary mask (values {values[:6].tolist()}"
                f"{'...' if values.size > 6 else ''}; expected 0 and one other value)"
            )
        truth.append(mask > 0)
        has_truth.append(True)
    notices = []
    if channels == 1:
        notices.append(
            f"{spec.name}: {len(images)} single-channel slice(s) taken as FLAIR and "
            "repeated to 3 channels (the model was trained on pre-contrast, FLAIR and "
            "post-contrast)"
        )
    has = np.array(has_truth)
    if has.any() and not has.all():
        notices.append(
            f"{spec.name}: only {int(has.sum())} of {has.size} slices have a ground-truth "
            "mask; no DSC/accuracy for this volume"
        )
    return LoadedVolume(spec, np.stack(images), np.stack(truth), has, channels), notices
