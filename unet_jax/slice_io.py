"""Reading one slice file (an image or its mask), with the checks every reader of slices needs.

The data-set builder (``datasets/``, from folders and zip archives) and ``unet_jax.predict``
read slices through here, so a file is accepted or refused alike by both. Pillow converts some
files while reading them without saying so (16-bit RGB becomes 8-bit RGB, a 2-sample TIFF
becomes grayscale, only the first page of a multi-page file is read): the stored format is
checked before decoding, and such files are refused rather than silently changed.

Accepted: one page of 8-bit samples; images RGB (pre-contrast, FLAIR, post-contrast) or
single-channel (FLAIR), masks single-channel or 1-bit. Any further rule (the builder's exact
256 x 256 size and 0/255 masks) is the caller's.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image

__all__ = ["SliceKind", "SliceFileError", "SliceHeader", "read_header", "read_slice"]

SliceKind = Literal["image", "mask"]

# Pillow modes accepted per kind, with their channel counts.
_MODES: dict[str, dict[str, int]] = {"image": {"RGB": 3, "L": 1}, "mask": {"L": 1, "1": 1}}
_EXPECTED = {
    "image": "3-channel RGB (pre-contrast, FLAIR, post-contrast) or single-channel FLAIR",
    "mask": "single-channel",
}
# What Pillow raises for a file it cannot decode (zipfile's for a damaged archive member).
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)
# NumPy dtype of Pillow's non-8-bit modes, for messages when the file format does not say.
_MODE_DTYPES = {"1": "bool", "I": "int32", "F": "float32", "I;16": "uint16", "I;16B": "uint16"}
_TIFF_SAMPLE_FORMATS = {1: "uint", 2: "int", 3: "float"}


class SliceFileError(ValueError):
    """A slice file that cannot be read, or is not an accepted 8-bit layout.

    Attributes:
      name: the file as named in the message (a path, or an archive member's description).
      problem: what is wrong, without the name.
      cause: the decoding error when the file could not be read at all; ``None`` when it was
        read and refused (so that callers may word the unreadable case in their own terms).
    """

    def __init__(self, name: str, problem: str, cause: BaseException | None = None):
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class SliceHeader:
    """What a slice file's header says: its size, channel count and Pillow mode."""

    height: int
    width: int
    channels: int
    mode: str


def _stored_format(im: Image.Image) -> tuple[int | None, int | None, str | None]:
    """(bits per sample, samples per pixel, NumPy dtype of the samples) as stored in the file,
    where its format says (TIFF and PNG); ``None`` for what it does not."""
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 1)
        bits = max(int(b) for b in (bits if isinstance(bits, tuple) else (bits,)))
        sample_format = im.tag_v2.get(339, 1)
        if isinstance(sample_format, tuple):
            sample_format = sample_format[0]
        kind = _TIFF_SAMPLE_FORMATS.get(int(sample_format), "uint")
        dtype = "bool" if bits == 1 else f"{kind}{bits}"
        return bits, int(im.tag_v2.get(277, 1)), dtype
    if im.format == "PNG" and im.tile:
        args = im.tile[0][3]
        rawmode = args[0] if isinstance(args, tuple) else args
        bits = 16 if "16" in str(rawmode) else 8
        return bits, None, f"uint{bits}"
    return None, None, _MODE_DTYPES.get(im.mode)


def _check(im: Image.Image, kind: SliceKind, name: str) -> SliceHeader:
    """The header of an open file, refusing multi-page files, samples other than 8-bit and
    channel layouts other than ``kind``'s."""
    frames = getattr(im, "n_frames", 1)
    if frames != 1:
        raise SliceFileError(name, f"a multi-page image ({frames} pages); give one slice per file")
    header = SliceHeader(im.height, im.width, len(im.getbands()), im.mode)
    if kind == "mask" and im.mode == "1":
        return header
    bits, samples, dtype = _stored_format(im)
    if (bits is not None and bits != 8) or im.mode in ("1", "I", "F") or im.mode.startswith("I;"):
        what = f"{bits}-bit samples" if bits not in (None, 8) else f"Pillow mode {im.mode!r}"
        if dtype is not None:
            what += f", dtype {dtype}"
        raise SliceFileError(
            name, f"unsupported pixel type ({what}); {kind}s must be 8-bit (uint8)"
        )
    expected = _EXPECTED[kind]
    if im.mode == "P":
        raise SliceFileError(name, f"a palette image; {kind}s must be 8-bit {expected}")
    bands = samples if samples is not None else header.channels
    if im.mode not in _MODES[kind] or bands != header.channels:
        raise SliceFileError(
            name,
            f"unsupported channel layout ({bands} channel{'s' if bands != 1 else ''}, Pillow "
            f"mode {im.mode!r}); {kind}s must be 8-bit {expected}",
        )
    return header


def _read(
    file: str | os.PathLike | BinaryIO, kind: SliceKind, name: str | None, decode: bool
) -> tuple[SliceHeader, np.ndarray | None]:
    if kind not in _MODES:
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
    if name is None:
        name = (
            os.fspath(file) if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "?")
        )
    try:
        with Image.open(file) as im:
            header = _check(im, kind, str(name))
            # np.array, not asarray: a writable copy, decoded here so that errors are caught.
            return header, (np.array(im) if decode else None)
    except SliceFileError:
        raise
    except _DECODE_ERRORS as e:
        raise SliceFileError(
            str(name), f"cannot read the image ({type(e).__name__}: {e})", cause=e
        ) from None


def read_header(
    file: str | os.PathLike | BinaryIO, kind: SliceKind = "image", *, name: str | None = None
) -> SliceHeader:
    """Check a slice file as far as its header allows, without decoding the pixels.

    Args:
      file: a path, or a binary file object (seekable, as Pillow needs).
      kind: ``"image"`` or ``"mask"`` (the channel layouts accepted differ).
      name: the file in messages (default: the path, or the file object's ``name``).

    Raises:
      SliceFileError: naming the file.
    """
    return _read(file, kind, name, decode=False)[0]


def read_slice(
    file: str | os.PathLike | BinaryIO, kind: SliceKind = "image", *, name: str | None = None
) -> np.ndarray:
    """The pixels of a checked slice file (see :func:`read_header` for the arguments).

    Returns:
      uint8 ``(H, W, 3)`` or ``(H, W)``; a 1-bit mask as bool ``(H, W)``.

    Raises:
      SliceFileError: naming the file; ``cause`` is set when it could not be decoded.
    """
    pixels = _read(file, kind, name, decode=True)[1]
    assert pixels is not None
    return pixels
