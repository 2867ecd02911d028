"""Segment new MRI slices with a trained (or converted) checkpoint.

    python -m unet_jax.predict --checkpoint DIR --input PATH [PATH ...] --output DIR
                               [--step N] [--threshold T] [--no-lcc] [--batch-size N]

**Inputs.** Each ``PATH`` is one of:

* a slice file (``.tif``, ``.tiff``, ``.png``): 8-bit, 3 channels as in the LGG data
  (pre-contrast, FLAIR, post-contrast), or 1 channel, which is taken as FLAIR and repeated to
  3 channels (a notice says so);
* a patient folder holding slices ``<patient>_<n>.<ext>``: one volume, slices ordered by ``n``;
* a ``kaggle_3m``-style root: a folder of patient folders (each one volume; other files such as
  ``data.csv`` are ignored).

Slice files given one by one are grouped into volumes by their ``<patient>`` prefix (the name
before the last ``_<n>``), so ``--input P/*.tif`` and ``--input P`` give identical results; a
file whose name has no ``_<n>`` is a volume of its own. A ground-truth mask
``<stem>_mask.<ext>`` beside a slice is picked up automatically (mask files are never inputs,
so a glob that includes them is fine).

**Preprocessing** is the checkpoint's training config's, read from the checkpoint:

* ``baseline``: the baseline's per-volume preprocessing (:mod:`unet_jax.preprocess`, exactly as
  the data set stores it: drop the first and last slice, threshold, crop, pad to a square,
  resize to 256, percentile rescale, uint8 quantisation, per-volume channel standardisation),
  then the on-device resize to the model's ``image_size`` used in training
  (:func:`unet_jax.input_pipeline.resize_batch`). Predictions are mapped back to each slice's own
  geometry (:func:`unet_jax.preprocess.restore_prediction`, nearest neighbour). Slices the
  baseline drops (the first and last of a volume, slices outside the crop after the threshold)
  get an **empty mask** (``processed`` = 0 in the CSV). Volumes of fewer than 3 slices are
  preprocessed without dropping ends (the baseline's rule would leave nothing); a volume that is
  all zeros after the threshold gets empty masks (with a notice).
* ``raw``: each volume standardised by its own channel mean/std of ``image / 255``, resized on
  device to ``image_size`` as in training, predictions mapped back by nearest neighbour.

Prediction is ``sigmoid(logit) >= threshold`` (default: the checkpoint's, 0.5). Unless
``--no-lcc``, only the largest 3D face-connected component of each volume's predicted mask is
kept, computed in the volume's own geometry (the baseline's post-processing).

**Outputs** (``--output DIR``, which must not exist or be empty; built in
``DIR.partial-XXXX`` beside it and renamed when complete, so a failed run never leaves a folder
that looks finished):

* ``<volume>/<stem>_pred.png``: the binary mask (0/255) in the input slice's own size;
* ``<volume>/<stem>_overlay.png``: the FLAIR channel with the prediction outlined red and the
  ground truth (when present) green, yellow where both;
* ``<volume>/<volume>.gif``: the overlays of the volume, animated;
* ``predictions.csv``: one row per slice (``level=slice``) and per volume (``level=volume``),
  see :data:`CSV_FIELDS`; ``predict.json``: the settings of the run.

CSV columns: ``volume``, ``level``, ``slice`` (slice number), ``input`` (file), ``height``,
``width``, ``channels`` (of the input file), ``slices`` and ``processed`` (slices run through the
model; 0/1 per slice), ``lesion_pixels`` and ``lesion_fraction`` (predicted area in input pixels,
after LCC unless ``--no-lcc``), ``true_pixels`` (ground-truth area) and, per volume when every
slice has ground truth:

* ``dsc``, ``accuracy``: the output masks against the ground truth in the input geometry, over
  all slices of the volume;
* ``dsc_model``, ``dsc_model_lcc``, ``accuracy_model``: computed as the training evaluation
  does (:func:`unet_jax.metrics.volume_metrics`): at model resolution over the processed
  slices, against the preprocessed (and resized) masks, without and with the largest 3D
  component. ``dsc_model_lcc`` is the evaluation's ``dsc_lcc`` (per_patient.csv).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_jax import metrics, preprocess

__all__ = [
    "CSV_FIELDS",
    "IMAGE_EXTENSIONS",
    "STORED_SIZE",
    "PredictError",
    "SliceFile",
    "VolumeSpec",
    "VolumePrediction",
    "PredictSummary",
    "LoadedVolume",
    "discover",
    "check_volume",
    "read_volume",
    "load_checkpoint",
    "Predictor",
    "predict",
    "main",
]

#: File types read as slices (lower case).
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")
#: Side of the slices as the data set stores them (the baseline preprocesses to this size).
STORED_SIZE = 256

CSV_FIELDS = [
    "volume", "level", "slice", "input", "height", "width", "channels", "slices", "processed",
    "lesion_pixels", "lesion_fraction", "true_pixels", "dsc", "accuracy",
    "dsc_model", "dsc_model_lcc", "accuracy_model",
]

_NUMBERED = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)$")
_MASK_SUFFIX = "_mask"
# Pillow modes of 8-bit images we accept, and of images whose pixel type we do not.
_OK_MODES = {"RGB": 3, "L": 1}
_MASK_MODES = {"L", "1"}


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_mask(path: Path) -> bool:
    return path.stem.endswith(_MASK_SUFFIX)


def _find_mask(image: Path) -> Path | None:
    """``<stem>_mask<ext>`` beside ``image``: the same extension first, then the others."""
    suffixes = [image.suffix] + [e for e in IMAGE_EXTENSIONS if e != image.suffix.lower()]
    suffixes += [e.upper() for e in IMAGE_EXTENSIONS]
    for ext in suffixes:
        candidate = image.with_name(image.stem + _MASK_SUFFIX + ext)
        if candidate.is_file():
            return candidate
    return None


def _slice_of(path: Path) -> tuple[str, int | None]:
    """(volume prefix, slice number) of a slice file name; (stem, None) when unnumbered."""
    m = _NUMBERED.match(path.stem)
    if m is None:
        return path.stem, None
    return m["prefix"], int(m["number"])


def _volume_from_files(name: str, files: Sequence[Path], source: str) -> VolumeSpec:
    numbers: dict[int, Path] = {}
    for f in files:
        _, number = _slice_of(f)
        if number in numbers:
            raise PredictError(f"{f}: slice number {number} of volume {name!r} given twice "
                               f"(also {numbers[number]})")
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
                "(the number orders the slices of the volume)")
        prefixes[prefix].append(f)
    if len(prefixes) > 1:
        shown = ", ".join(sorted(prefixes)[:5])
        raise PredictError(
            f"{folder}: holds slices of several volumes ({shown}); a patient folder is one volume. "
            "Give its files instead (--input FOLDER/*.tif) to group them by prefix.")
    (prefix, files), = prefixes.items()
    return _volume_from_files(prefix, files, str(folder))


def _folder_contents(folder: Path) -> tuple[list[Path], list[Path]]:
    """(slice images, sub-folders) directly in ``folder``, sorted, hidden entries skipped."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise PredictError(f"{folder}: cannot list the folder ({e})") from None
    images = [p for p in entries if p.is_file() and not _is_hidden(p.name) and _is_image(p)
              and not _is_mask(p)]
    dirs = [p for p in entries if p.is_dir() and not _is_hidden(p.name)]
    return images, dirs


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
                raise PredictError(f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                                   f"(supported: {', '.join(IMAGE_EXTENSIONS)})")
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
            raise PredictError(
                f"{path}: empty folder: no slices ({', '.join(IMAGE_EXTENSIONS)}, not *_mask) in it "
                "nor in patient folders inside it")
        volumes += found
    for prefix, files in loose.items():
        if len(files) == 1 and _slice_of(files[0])[1] is None:
            f = files[0]
            volumes.append(VolumeSpec(prefix, (SliceFile(f, None, _find_mask(f)),), str(f.parent)))
        elif any(_slice_of(f)[1] is None for f in files):
            raise PredictError(f"several files named {prefix}.* given: "
                               + ", ".join(map(str, files)))
        else:
            # Named by their common folder when they share one, as the folder itself would be.
            parents = {str(f.parent) for f in files}
            volumes.append(_volume_from_files(prefix, files,
                                              parents.pop() if len(parents) == 1 else "files"))
    seen: dict[Path, str] = {}
    names: dict[str, VolumeSpec] = {}
    for v in volumes:
        if v.name in names:
            raise PredictError(f"two volumes named {v.name!r} (from {names[v.name].source} and "
                               f"{v.source}); each volume must be given once")
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


def _open_error(path: Path, e: Exception) -> PredictError:
    return PredictError(f"{path}: cannot read the image ({type(e).__name__}: {e})")


def _stored_format(im: Image.Image) -> tuple[int | None, int | None]:
    """(bits per sample, samples per pixel) as stored in the file, where the format says.

    Pillow converts some files on reading without telling: 16-bit RGB (TIFF and PNG) becomes
    8-bit RGB, a 2-sample TIFF becomes grayscale. These must be refused, not silently changed.
    """
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 1)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(int(b) for b in bits), int(im.tag_v2.get(277, 1))
    if im.format == "PNG" and im.tile:
        args = im.tile[0][3]
        rawmode = args[0] if isinstance(args, tuple) else args
        return (16 if "16" in str(rawmode) else 8), None
    return None, None


def _check_mode(path: Path, im: Image.Image, allowed: dict[str, int] | set[str], what: str) -> None:
    """Refuse multi-page files, pixel types other than 8-bit and channel counts other than 3 or
    1 (masks: 1, or Pillow's 1-bit mode), with a message naming the file."""
    frames = getattr(im, "n_frames", 1)
    if frames != 1:
        raise PredictError(f"{path}: a multi-page image ({frames} pages); give one slice per file")
    bits, samples = _stored_format(im)
    expected = ("3-channel RGB (pre-contrast, FLAIR, post-contrast) or single-channel FLAIR"
                if what == "image" else "single-channel")
    if what == "mask" and im.mode == "1":
        return
    if (bits is not None and bits != 8) or im.mode in ("1", "I", "F") or im.mode.startswith("I;"):
        kind = f"{bits}-bit samples" if bits not in (None, 8) else f"Pillow mode {im.mode!r}"
        raise PredictError(f"{path}: unsupported pixel type ({kind}); {what}s must be 8-bit (uint8)")
    bands = samples if samples is not None else len(im.getbands())
    if im.mode == "P":
        raise PredictError(f"{path}: a palette image; {what}s must be 8-bit {expected}")
    if im.mode not in allowed or bands != len(im.getbands()):
        raise PredictError(f"{path}: unsupported channel layout ({bands} channel"
                           f"{'s' if bands != 1 else ''}, Pillow mode {im.mode!r}); {what}s must "
                           f"be 8-bit {expected}")


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """((H, W), mode) of an image file, checking what can be checked without decoding."""
    try:
        with Image.open(path) as im:
            _check_mode(path, im, _OK_MODES if what == "image" else _MASK_MODES, what)
            return (im.height, im.width), im.mode
    except PredictError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from None


def check_volume(spec: VolumeSpec) -> tuple[int, int]:
    """Check a volume's file headers (readable, 8-bit, 1 or 3 channels, one size); its (H, W)."""
    size = None
    modes = set()
    for s in spec.slices:
        shape, mode = _header(s.path, "image")
        modes.add(mode)
        if size is None:
            size = shape
        elif shape != size:
            raise PredictError(f"{s.path}: slice of size {shape[0]}x{shape[1]}, but the other "
                               f"slices of volume {spec.name!r} are {size[0]}x{size[1]}")
        if s.mask is not None:
            mshape, _ = _header(s.mask, "mask")
            if mshape != shape:
                raise PredictError(f"{s.mask}: mask of size {mshape[0]}x{mshape[1]} for a slice of "
                                   f"size {shape[0]}x{shape[1]}")
    if len(modes) > 1:
        raise PredictError(f"volume {spec.name!r} mixes single-channel and 3-channel slices")
    assert size is not None
    return size


def _read_pixels(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            _check_mode(path, im, _OK_MODES if what == "image" else _MASK_MODES, what)
            return np.array(im)
    except PredictError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from None


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
            raise PredictError(f"{s.mask}: not a binary mask (values {values[:6].tolist()}"
                               f"{'...' if values.size > 6 else ''}; expected 0 and one other value)")
        truth.append(mask > 0)
        has_truth.append(True)
    notices = []
    if channels == 1:
        notices.append(f"{spec.name}: {len(images)} single-channel slice(s) taken as FLAIR and "
                       "repeated to 3 channels (the model was trained on pre-contrast, FLAIR and "
                       "post-contrast)")
    has = np.array(has_truth)
    if has.any() and not has.all():
        notices.append(f"{spec.name}: only {int(has.sum())} of {has.size} slices have a ground-truth "
                       "mask; no DSC/accuracy for this volume")
    return LoadedVolume(spec, np.stack(images), np.stack(truth), has, channels), notices


# ----------------------------------------------------------------------------- model


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class _Prepared:
    """A volume in model-input form, waiting for (and then holding) its predictions."""

    loaded: LoadedVolume
    images: np.ndarray  # (Z, S, S', 3) uint8 at the stored resolution
    masks: np.ndarray  # (Z, S, S', 1) uint8 in {0, 1}
    mean: np.ndarray  # (3,) float32
    std: np.ndarray  # (3,) float32
    geometry: preprocess.VolumeGeometry | None  # baseline only
    pred: np.ndarray | None = None  # (Z, s, s) bool at model resolution
    truth: np.ndarray | None = None  # (Z, s, s) bool, the masks as the model sees them
    done: int = 0

    @property
    def num_model_slices(self) -> int:
        return int(self.images.shape[0])

    @property
    def complete(self) -> bool:
        return self.done == self.num_model_slices


@dataclasses.dataclass
class VolumePrediction:
    """The result for one volume.

    Attributes:
      loaded: the input volume.
      mask: (N, H, W) bool, the output masks in the input geometry (after LCC unless disabled).
      processed: (N,) bool, slices that went through the model.
      metrics: the volume's numbers (see :data:`CSV_FIELDS`); metric keys only with ground truth.
    """

    loaded: LoadedVolume
    mask: np.ndarray
    processed: np.ndarray
    metrics: dict[str, Any]


class Predictor:
    """A loaded model with its preprocessing, predicting volumes in jitted, padded batches.

    Batches are filled across volumes in order; a last, partial batch is padded to the next
    power of two (at most ``batch_size``), so at most ``log2(batch_size) + 1`` programs compile.
    """

    def __init__(self, model, config, *, threshold: float | None = None, lcc: bool = True,
                 batch_size: int = 16):
        import jax
        from flax import nnx

        from unet_jax.input_pipeline import AugmentSpec, prepare_batch

        self.config = config
        self.threshold = float(config.threshold if threshold is None else threshold)
        try:
            logit_threshold = metrics.logit_threshold(self.threshold)  # the evaluation's rule
        except ValueError as e:
            raise PredictError(str(e)) from None
        if batch_size < 1:
            raise PredictError(f"batch size must be at least 1, got {batch_size}")
        if config.dataset_config not in ("baseline", "raw"):
            raise PredictError(f"the checkpoint's dataset_config {config.dataset_config!r} is not "
                               "one predict knows (baseline, raw)")
        if config.in_channels != 3 or config.out_channels != 1:
            raise PredictError(f"the checkpoint's model has {config.in_channels} input and "
                               f"{config.out_channels} output channels; predict needs 3 and 1")
        self.lcc = lcc
        self.batch_size = int(batch_size)
        self.size = int(config.image_size)
        aug = AugmentSpec(0.0, 0.0, 0.0, self.size)
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state)

        def step(state, images, masks, mean, std):
            # Exactly the evaluation's batch preparation: normalise, resize on device.
            x, y = prepare_batch(images, masks, mean, std, jax.random.key(0), aug, train=False)
            logits = nnx.merge(graphdef, state)(x)
            return logits[..., 0] >= logit_threshold, y[..., 0] >= 0.5

        self._step = jax.jit(step)
        self.device = str(jax.devices()[0])

    # -- preprocessing ---------------------------------------------------------------------
    def prepare(self, loaded: LoadedVolume) -> tuple[_Prepared, list[str]]:
        """The volume as the model's training data looked (see the module docstring)."""
        images = loaded.images
        n = images.shape[0]
        notices = []
        if self.config.dataset_config == "baseline":
            drop_ends = n >= 3
            if not drop_ends:
                notices.append(f"{loaded.spec.name}: {n} slice(s): preprocessed without dropping "
                               "the first and last slice (the baseline drops them)")
            try:
                pv = preprocess.preprocess_volume(images, loaded.truth.astype(np.uint8),
                                                  size=STORED_SIZE, drop_ends=drop_ends)
            except ValueError as e:
                notices.append(f"{loaded.spec.name}: {e}; its masks are empty")
                empty = np.zeros((0, STORED_SIZE, STORED_SIZE, 3), np.uint8)
                return _Prepared(loaded, empty, empty[..., :1], np.zeros(3, np.float32),
                                 np.ones(3, np.float32), None), notices
            return _Prepared(loaded, pv.image, pv.mask[..., None], pv.channel_mean,
                             self._safe_std(pv.channel_std, loaded, notices), pv.geometry), notices
        mean, std = preprocess.channel_stats_uint8(images)
        return _Prepared(loaded, images, loaded.truth[..., None].astype(np.uint8),
                         mean.astype(np.float32),
                         self._safe_std(std.astype(np.float32), loaded, notices), None), notices

    @staticmethod
    def _safe_std(std: np.ndarray, loaded: LoadedVolume, notices: list[str]) -> np.ndarray:
        # A constant channel has std 0: standardising would divide by zero. Its standardised
        # value is then 0 everywhere (x - mean = 0), as with std 1.
        bad = ~(np.isfinite(std) & (std > 0))
        if bad.any():
            notices.append(f"{loaded.spec.name}: channel(s) {np.flatnonzero(bad).tolist()} are "
                           "constant over the volume; standardised with std 1")
            std = np.where(bad, np.float32(1), std).astype(np.float32)
        return std

    # -- the model ---------------------------------------------------------------------------
    def _run(self, chunks: list[tuple[_Prepared, int, int]], pad_to: int) -> None:
        """Predict the rows ``[start, stop)`` of each chunk as one batch padded to ``pad_to``."""
        import jax

        images = np.concatenate([p.images[a:b] for p, a, b in chunks])
        masks = np.concatenate([p.masks[a:b] for p, a, b in chunks])
        mean = np.concatenate([np.broadcast_to(p.mean, (b - a, 3)) for p, a, b in chunks])
        std = np.concatenate([np.broadcast_to(p.std, (b - a, 3)) for p, a, b in chunks])
        rows = images.shape[0]
        if pad_to > rows:
            extra = pad_to - rows
            images = np.concatenate([images, np.zeros((extra,) + images.shape[1:], np.uint8)])
            masks = np.concatenate([masks, np.zeros((extra,) + masks.shape[1:], np.uint8)])
            mean = np.concatenate([mean, np.zeros((extra, 3), np.float32)])
            std = np.concatenate([std, np.ones((extra, 3), np.float32)])
        pred, truth = jax.device_get(self._step(self._state, images, masks, mean, std))
        row = 0
        for p, a, b in chunks:
            if p.pred is None:
                shape = (p.num_model_slices,) + pred.shape[1:]
                p.pred, p.truth = np.zeros(shape, bool), np.zeros(shape, bool)
            p.pred[a:b] = pred[row:row + b - a]
            p.truth[a:b] = truth[row:row + b - a]
            p.done += b - a
            row += b - a

    def _padded(self, rows: int) -> int:
        """Rows a partial batch is padded to: the next power of two, at most ``batch_size``."""
        return min(self.batch_size, _next_pow2(rows))

    def predict_volumes(self, volumes: Iterable[LoadedVolume],
                        on_progress: Callable[[int], None] | None = None,
                        on_notice: Callable[[str], None] | None = None,
                        ) -> Iterator[VolumePrediction]:
        """Predict each volume; yields the results in the input order as they complete.

        ``on_progress(n)`` is called with the number of slices finished (processed or not).
        """
        pending: collections.deque[_Prepared] = collections.deque()
        buffer: list[tuple[_Prepared, int, int]] = []
        buffered = 0
        progress = on_progress or (lambda n: None)
        notice = on_notice or (lambda s: None)

        def run(rows: int, pad_to: int) -> None:
            nonlocal buffered
            chunks, taken = [], 0
            while taken < rows:
                p, a, b = buffer[0]
                take = min(b - a, rows - taken)
                chunks.append((p, a, a + take))
                taken += take
                if a + take == b:
                    buffer.pop(0)
                else:
                    buffer[0] = (p, a + take, b)
            buffered -= rows
            self._run(chunks, pad_to)
            progress(rows)

        def finished() -> Iterator[VolumePrediction]:
            while pending and pending[0].complete:
                yield self._finish(pending.popleft(), progress)

        for prepared, notes in self._prepared(volumes):
            for s in notes:
                notice(s)
            # One batch holds one input shape (the baseline's are all STORED_SIZE square).
            if buffer and buffer[0][0].images.shape[1:] != prepared.images.shape[1:]:
                run(buffered, self._padded(buffered))
            pending.append(prepared)
            if prepared.num_model_slices:
                buffer.append((prepared, 0, prepared.num_model_slices))
                buffered += prepared.num_model_slices
            while buffered >= self.batch_size:
                run(self.batch_size, self.batch_size)
            yield from finished()
        if buffered:
            run(buffered, self._padded(buffered))
        yield from finished()
        assert not pending

    def _prepared(self, volumes: Iterable[LoadedVolume]) -> Iterator[tuple[_Prepared, list[str]]]:
        """``prepare`` each volume, the next one in a worker thread while the current one is
        on the device (reading and preprocessing are NumPy/Pillow work that releases the GIL,
        and JAX dispatches the batches asynchronously)."""
        from concurrent.futures import ThreadPoolExecutor

        it = iter(volumes)

        def work() -> tuple[_Prepared, list[str]] | None:
            loaded = next(it, None)  # one worker: the iterator is never entered concurrently
            return None if loaded is None else self.prepare(loaded)

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(work)
            while (item := future.result()) is not None:
                future = pool.submit(work)
                yield item

    # -- back to the input geometry ------------------------------------------------------------
    def _finish(self, p: _Prepared, progress: Callable[[int], None]) -> VolumePrediction:
        loaded = p.loaded
        n, h, w = loaded.images.shape[:3]
        s = self.size
        processed = np.zeros(n, bool)
        if self.config.dataset_config == "baseline":
            if p.geometry is None:
                mask = np.zeros((n, h, w), bool)
            else:
                # The model saw the stored slices resized to `s`: map back from `s`.
                geometry = dataclasses.replace(p.geometry, out_size=s)
                mask = preprocess.restore_prediction(p.pred, geometry)
                processed[p.geometry.z_range[0]:p.geometry.z_range[1]] = True
        else:
            mask = preprocess.resize_masks(p.pred, (h, w))
            processed[:] = True
        mask = np.asarray(mask, bool)
        if self.lcc:
            mask = metrics.largest_connected_component(mask)
        lesion = int(mask.sum())
        m: dict[str, Any] = {"slices": n, "processed": int(processed.sum()),
                             "lesion_pixels": lesion, "lesion_fraction": lesion / (n * h * w)}
        if loaded.has_truth.all():
            c = metrics.counted_metrics(mask, loaded.truth)
            m["true_pixels"] = int(c["true_pixels"])
            m["dsc"], m["accuracy"] = c["dsc"], c["accuracy"]
            if p.num_model_slices:
                vm = metrics.volume_metrics(p.pred, p.truth)
                m["dsc_model"], m["dsc_model_lcc"] = vm["dsc"], vm["dsc_lcc"]
                m["accuracy_model"] = vm["accuracy"]
        progress(n - p.num_model_slices)
        return VolumePrediction(loaded, mask, processed, m)


# ----------------------------------------------------------------------------- outputs


def _fmt(v: Any) -> Any:
    return f"{v:.6f}" if isinstance(v, float) else v


def _write_volume(result: VolumePrediction, out_dir: Path) -> list[dict[str, Any]]:
    """Write a volume's PNGs and GIF into ``out_dir/<volume>``; returns its CSV rows."""
    from unet_jax.report import FLAIR_CHANNEL, overlay_rgb, write_overlay_gif

    spec = result.loaded.spec
    folder = out_dir / spec.name
    folder.mkdir()
    images = result.loaded.images
    h, w = images.shape[1:3]
    rows, overlays = [], []
    for k, s in enumerate(spec.slices):
        stem = s.path.stem
        Image.fromarray(result.mask[k].astype(np.uint8) * np.uint8(255)).save(
            folder / f"{stem}_pred.png")
        overlays.append(overlay_rgb(images[k, ..., FLAIR_CHANNEL], result.loaded.truth[k],
                                    result.mask[k]))
        Image.fromarray(overlays[-1]).save(folder / f"{stem}_overlay.png")
        lesion = int(result.mask[k].sum())
        row = {"volume": spec.name, "level": "slice",
               "slice": "" if s.number is None else s.number, "input": str(s.path),
               "height": h, "width": w, "channels": result.loaded.channels, "slices": 1,
               "processed": int(result.processed[k]),
               "lesion_pixels": lesion, "lesion_fraction": lesion / (h * w)}
        if result.loaded.has_truth[k]:
            row["true_pixels"] = int(result.loaded.truth[k].sum())
        rows.append(row)
    numbers = [k + 1 if s.number is None else s.number for k, s in enumerate(spec.slices)]
    write_overlay_gif(overlays, numbers, folder / f"{spec.name}.gif")
    rows.append({"volume": spec.name, "level": "volume", "slice": "", "input": spec.source,
                 "height": h, "width": w, "channels": result.loaded.channels, **result.metrics})
    return rows


def _check_output(output: Path, inputs: Sequence[Path], volumes: Sequence[VolumeSpec]) -> Path:
    """The output folder, refusing one that exists with content or would mix with the inputs."""
    out = output.absolute().resolve()
    if out.exists() and not out.is_dir():
        raise PredictError(f"output {output} exists and is not a folder")
    for given in inputs:
        p = Path(given).absolute().resolve()
        if out == p or p.is_relative_to(out):
            raise PredictError(f"output {output} would overwrite the input {given}; choose a new "
                               "folder outside the inputs")
        if p.is_dir() and out.is_relative_to(p):
            raise PredictError(f"output {output} is inside the input folder {given}; choose a "
                               "folder outside the inputs")
    for v in volumes:
        for s in v.slices:
            for f in (s.path, s.mask):
                if f is not None and f.absolute().resolve().is_relative_to(out):
                    raise PredictError(f"output {output} would overwrite the input {f}")
    if out.is_dir() and any(out.iterdir()):
        raise PredictError(f"output {output} exists and is not empty; predict never overwrites: "
                           "choose a new folder")
    return out


@dataclasses.dataclass
class PredictSummary:
    """What :func:`predict` did: the output folder, the CSV rows, notices and timings."""

    output: Path
    rows: list[dict[str, Any]]
    notices: list[str]
    volumes: int
    slices: int
    seconds: float
    device: str


def load_checkpoint(path: str | os.PathLike, step: int | None = None):
    """``(model, config, meta)`` from a training workdir or a converted checkpoint, with errors
    as :class:`PredictError`."""
    from unet_jax.checkpoint import CheckpointError, load_model

    try:
        return load_model(path, step)
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    except Exception as e:  # Orbax / config errors: a directory that is not a compatible checkpoint
        raise PredictError(f"{path}: cannot load a unet_jax checkpoint from it "
                           f"({type(e).__name__}: {e})") from None


def predict(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike],
            output: str | os.PathLike, *, step: int | None = None, threshold: float | None = None,
            lcc: bool = True, batch_size: int = 16, progress: bool | None = None,
            log: Callable[[str], None] | None = None) -> PredictSummary:
    """Segment ``inputs`` with ``checkpoint`` into the new folder ``output`` (see the module
    docstring). Raises :class:`PredictError` for bad input; nothing is left at ``output``
    (nor half-written beside it) when it fails.

    ``progress``: show a progress bar (default: when stderr is a terminal).
    ``log``: where notices and messages go (default: stderr).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    output = Path(output)
    volumes, notices = discover(inputs)
    out = _check_output(output, [Path(p) for p in inputs], volumes)
    for v in volumes:
        check_volume(v)
    model, config, meta = load_checkpoint(checkpoint, step)
    predictor = Predictor(model, config, threshold=threshold, lcc=lcc, batch_size=batch_size)
    for s in notices:
        log(f"notice: {s}")

    def note(s: str) -> None:
        notices.append(s)
        log(f"notice: {s}")

    total = sum(len(v.slices) for v in volumes)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed output
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm

        rows: list[dict[str, Any]] = []
        with tqdm(total=total, unit="slice", desc="predict", dynamic_ncols=True,
                  disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:

            def loaded_volumes() -> Iterator[LoadedVolume]:
                for v in volumes:
                    loaded, notes = read_volume(v)
                    for s in notes:
                        note(s)
                    yield loaded

            for result in predictor.predict_volumes(loaded_volumes(), bar.update, note):
                rows += _write_volume(result, partial)
        seconds = time.perf_counter() - t0
        with open(partial / "predictions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _fmt(r.get(k, "")) for k in CSV_FIELDS})
        settings = {
            "checkpoint": str(Path(checkpoint).absolute()), "step": meta.get("step"),
            "config": config.to_dict(), "threshold": predictor.threshold, "lcc": lcc,
            "batch_size": batch_size, "device": predictor.device, "volumes": len(volumes),
            "slices": total, "seconds": seconds, "notices": notices,
            "inputs": [str(Path(p).absolute()) for p in inputs],
        }
        (partial / "predict.json").write_text(json.dumps(settings, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # checked empty above; fails loudly if something appeared meanwhile
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PredictSummary(out, rows, notices, len(volumes), total, seconds, predictor.device)


# ----------------------------------------------------------------------------- CLI


def _plain(text: str) -> str:
    """The module docstring's reST markup as plain text for ``--help``."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "'").replace("**", "")


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m unet_jax.predict", description=doc[0],
        epilog=_plain("\n\n".join(doc[2:])),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a training workdir (its best checkpoint unless --step) or a "
                             "checkpoint written by `python -m unet_jax.convert`")
    parser.add_argument("--step", type=int, default=None,
                        help="use the checkpoint of this training step instead of the best")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="slice files (.tif/.tiff/.png), patient folders or a kaggle_3m root; "
                             "files are grouped into volumes by their <patient>_<n> prefix, a file "
                             "without _<n> is a volume of its own")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="new (or empty) folder for the results")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability threshold (default: the checkpoint's, 0.5)")
    parser.add_argument("--no-lcc", action="store_true",
                        help="keep every predicted component (default: only the largest 3D "
                             "connected component of each volume)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch (default 16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input/checkpoint/output, 130
    interrupted)."""
    args = _parser().parse_args(argv)
    import logging

    # Orbax reports opening a checkpoint read-only as absl warnings: noise for this command.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        summary = predict(args.checkpoint, args.input, args.output, step=args.step,
                          threshold=args.threshold, lcc=not args.no_lcc,
                          batch_size=args.batch_size, progress=False if args.no_progress else None)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for r in summary.rows:
        if r["level"] != "volume":
            continue
        line = f"{r['volume']}: {r['slices']} slices, lesion {r['lesion_pixels']} px"
        if "dsc" in r:
            line += f", DSC {r['dsc']:.4f} (model resolution, after LCC: {r['dsc_model_lcc']:.4f})" \
                if "dsc_model_lcc" in r else f", DSC {r['dsc']:.4f}"
        print(line)
    rate = summary.slices / summary.seconds if summary.seconds > 0 else math.inf
    print(f"wrote {summary.output}: {summary.volumes} volume(s), {summary.slices} slices in "
          f"{summary.seconds:.1f} s ({rate:.1f} slices/s) on {summary.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
