"""Outputs of ``unet_jax.predict``: per slice the mask and overlay PNGs, per volume a GIF (and,
with ``--format nifti``, NIfTI volumes), and ``predictions.csv``/``predict.json``/``legend.png``,
in a new folder made complete or not at all.

NIfTI (``--format nifti``, needs nibabel: the ``nifti`` extra), in each volume's folder:

- ``<volume>_pre-contrast.nii.gz``, ``<volume>_flair.nii.gz``, ``<volume>_post-contrast.nii.gz``:
  the input slices' channels, uint8 as read (a single-channel input gives only ``_flair``);
- ``<volume>_pred.nii.gz``: the predicted mask, uint8 0/1, the ``_pred.png`` masks stacked;
- ``<volume>_truth.nii.gz``: the ground truth, uint8 0/1, when every slice has a mask.

Each is a 3D array ``data[x, y, z]`` = slice ``z`` (0 = the volume's first slice, in the order of
its slice numbers, as listed in ``predictions.csv``), row ``y``, column ``x`` of the input geometry.
The affine is ``diag(-1, -1, 1)``: 1 mm spacing, which the TIFFs do not give (they carry no
spacing or orientation), and axes L, P, S as in DICOM, so a viewer (ITK-SNAP, 3D Slicer) shows
each axial slice as the PNGs show it (row 0 at the top, column 0 at the left) and stacks the
slices along its superior axis, the first at the bottom. The L/P/S labels are nominal.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_jax import metrics
from unet_jax.fileio import os_error_reason
from unet_jax.overlays import FLAIR_CHANNEL, overlay_rgb, png_description, write_overlay_gif
from unet_jax.predict.inputs import PredictError, VolumeSpec
from unet_jax.predict.predictor import VolumePrediction
from unet_jax.rundir import unwritable_reason

__all__ = [
    "CSV_FIELDS",
    "FORMATS",
    "NIFTI_AFFINE",
    "NIFTI_CHANNELS",
    "require_nibabel",
    "write_nifti",
    "check_output",
    "write_volume",
    "write_table",
    "write_settings",
    "partial_output",
    "output_errors",
]

#: Columns of ``predictions.csv`` (one row per slice and one per volume; see ``--help``).
CSV_FIELDS = [
    "volume",
    "level",
    "slice",
    "input",
    "height",
    "width",
    "channels",
    "slices",
    "processed",
    "lesion_pixels",
    "lesion_fraction",
    "true_pixels",
    "dsc",
    "accuracy",
    "dsc_model",
    "dsc_model_lcc",
    "accuracy_model",
]


#: Output formats: ``png`` (masks, overlays, GIF: always written) and ``nifti`` (those plus the
#: NIfTI volumes).
FORMATS = ("png", "nifti")

#: Voxel to world (mm) of the NIfTI volumes: ``data[x, y, z]`` with x the column, y the row, z the
#: slice; 1 mm spacing; axes L, P, S (see the module docstring).
NIFTI_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

#: File name part of each image channel's NIfTI volume, in channel order.
NIFTI_CHANNELS = ("pre-contrast", "flair", "post-contrast")


def require_nibabel() -> None:
    """Refuse ``--format nifti`` in one line where nibabel is not installed."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise PredictError(
            "--format nifti needs nibabel, which is not installed: "
            "pip install 'unet-jax[nifti]' (or pip install nibabel)"
        ) from None


def _nifti_volume(volume: np.ndarray, path: Path) -> None:
    """Write ``(N, H, W)`` uint8 as ``data[x, y, z]`` (see the module docstring)."""
    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(volume, np.uint8).transpose(2, 1, 0))
    image = nib.Nifti1Image(data, NIFTI_AFFINE)
    # Both forms, code 2 ("aligned"), so that viewers that read either agree.
    image.set_qform(NIFTI_AFFINE, code=2)
    image.set_sform(NIFTI_AFFINE, code=2)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def write_nifti(result: VolumePrediction, folder: Path) -> list[Path]:
    """Write a volume's NIfTI files into ``folder`` (see the module docstring); their paths."""
    name = result.loaded.spec.name
    images = result.loaded.images
    channels = range(3) if result.loaded.channels == 3 else [FLAIR_CHANNEL]
    written = []
    for c in channels:
        written.append(folder / f"{name}_{NIFTI_CHANNELS[c]}.nii.gz")
        _nifti_volume(images[..., c], written[-1])
    written.append(folder / f"{name}_pred.nii.gz")
    _nifti_volume(result.mask, written[-1])
    if result.loaded.has_truth.all():
        written.append(folder / f"{name}_truth.nii.gz")
        _nifti_volume(result.loaded.truth, written[-1])
    return written


def _fmt(v: Any) -> Any:
    return f"{v:.6f}" if isinstance(v, float) else v


def write_volume(
    result: VolumePrediction, out_dir: Path, nifti: bool = False
) -> list[dict[str, Any]]:
    """Write a volume's PNGs and GIF (with ``nifti``, its NIfTI files too) into
    ``out_dir/<volume>``; returns its CSV rows."""
    spec = result.loaded.spec
    folder = out_dir / spec.name
    folder.mkdir()
    images = result.loaded.images
    h, w = images.shape[1:3]
    rows, overlays = [], []
    description = png_description()
    for k, s in enumerate(spec.slices):
        stem = s.path.stem
        Image.fromarray(result.mask[k].astype(np.uint8) * np.uint8(255)).save(
            folder / f"{stem}_pred.png"
        )
        overlays.append(
            overlay_rgb(images[k, ..., FLAIR_CHANNEL], result.loaded.truth[k], result.mask[k])
        )
        # The slice's size, pixel for pixel: the colours are in legend.png and in words here.
        Image.fromarray(overlays[-1]).save(folder / f"{stem}_overlay.png", pnginfo=description)
        lesion = int(result.mask[k].sum())
        row = {
            "volume": spec.name,
            "level": "slice",
            "slice": "" if s.number is None else s.number,
            "input": str(s.path),
            "height": h,
            "width": w,
            "channels": result.loaded.channels,
            "slices": 1,
            "processed": int(result.processed[k]),
            "lesion_pixels": lesion,
            "lesion_fraction": lesion / (h * w),
        }
        if result.loaded.has_truth[k]:
            # In the slice's own geometry, the written mask against its truth (empty against
            # empty: DSC 1.0, the project's convention).
            counted = metrics.counted_metrics(result.mask[k], result.loaded.truth[k])
            row["true_pixels"] = int(counted["true_pixels"])
            row["dsc"], row["accuracy"] = counted["dsc"], counted["accuracy"]
        rows.append(row)
    numbers = [k + 1 if s.number is None else s.number for k, s in enumerate(spec.slices)]
    write_overlay_gif(overlays, numbers, folder / f"{spec.name}.gif")
    if nifti:
        write_nifti(result, folder)
    rows.append(
        {
            "volume": spec.name,
            "level": "volume",
            "slice": "",
            "input": spec.source,
            "height": h,
            "width": w,
            "channels": result.loaded.channels,
            **result.metrics,
        }
    )
    return rows


def check_output(output: Path, inputs: Sequence[Path], volumes: Sequence[VolumeSpec]) -> Path:
    """The output folder, refusing one that exists with content or would mix with the inputs."""
    out = output.absolute().resolve()
    if out.exists() and not out.is_dir():
        raise PredictError(f"output {output} exists and is not a folder")
    for given in inputs:
        p = Path(given).absolute().resolve()
        if out == p or p.is_relative_to(out):
            raise PredictError(
                f"output {output} would overwrite the input {given}; choose a new "
                "folder outside the inputs"
            )
        if p.is_dir() and out.is_relative_to(p):
            raise PredictError(
                f"output {output} is inside the input folder {given}; choose a "
                "folder outside the inputs"
            )
    for v in volumes:
        for s in v.slices:
            for f in (s.path, s.mask):
                if f is not None and f.absolute().resolve().is_relative_to(out):
                    raise PredictError(f"output {output} would overwrite the input {f}")
    if out.is_dir() and any(out.iterdir()):
        raise PredictError(
            f"output {output} exists and is not empty; predict never overwrites: "
            "choose a new folder"
        )
    # The results are written beside ``out`` and renamed into place: its parent must be (or
    # become) a folder we may write in. Checked now, before the checkpoint is loaded.
    reason = unwritable_reason(out)
    if reason:
        raise PredictError(f"output {output}: {reason}")
    return out


@contextlib.contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Turn an ``OSError`` of writing the results (no space, permissions) into a one-line
    :class:`PredictError` naming the output."""
    try:
        yield
    except OSError as e:
        raise PredictError(f"cannot write the output {out}: {os_error_reason(e)}") from None


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``predictions.csv``: the rows in :data:`CSV_FIELDS` order, floats with 6 decimals."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, "")) for k in CSV_FIELDS})


def write_settings(settings: dict[str, Any], path: Path) -> None:
    """``predict.json``: the settings of the run."""
    path.write_text(json.dumps(settings, indent=2) + "\n")


@contextlib.contextmanager
def partial_output(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to write into, renamed to ``out`` when the block succeeds and
    removed when it fails (with the parent folders made for it), so a failed run never leaves a
    folder that looks finished. Errors of making, writing or renaming it are
    :class:`PredictError`."""
    made = []  # parent folders created here, innermost first
    for parent in out.parents:
        if parent.exists():
            break
        made.append(parent)

    def remove_made() -> None:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()

    partial = None
    try:
        with output_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed output
    except BaseException:  # PredictError, or an interrupt
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        remove_made()
        raise
    try:
        yield partial  # the caller's writes: see output_errors
        with output_errors(out):
            if out.is_dir():
                out.rmdir()  # checked empty before; fails loudly if something appeared meanwhile
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        remove_made()
        raise
