"""Outputs of ``unet_jax.predict``: per slice the mask and overlay PNGs, per volume a GIF, and
``predictions.csv``/``predict.json``, in a new folder made complete or not at all."""

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

from unet_jax.overlays import FLAIR_CHANNEL, overlay_rgb, write_overlay_gif
from unet_jax.predict.inputs import PredictError, VolumeSpec
from unet_jax.predict.predictor import VolumePrediction

__all__ = [
    "CSV_FIELDS",
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


def _fmt(v: Any) -> Any:
    return f"{v:.6f}" if isinstance(v, float) else v


def write_volume(result: VolumePrediction, out_dir: Path) -> list[dict[str, Any]]:
    """Write a volume's PNGs and GIF into ``out_dir/<volume>``; returns its CSV rows."""
    spec = result.loaded.spec
    folder = out_dir / spec.name
    folder.mkdir()
    images = result.loaded.images
    h, w = images.shape[1:3]
    rows, overlays = [], []
    for k, s in enumerate(spec.slices):
        stem = s.path.stem
        Image.fromarray(result.mask[k].astype(np.uint8) * np.uint8(255)).save(
            folder / f"{stem}_pred.png"
        )
        overlays.append(
            overlay_rgb(images[k, ..., FLAIR_CHANNEL], result.loaded.truth[k], result.mask[k])
        )
        Image.fromarray(overlays[-1]).save(folder / f"{stem}_overlay.png")
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
            row["true_pixels"] = int(result.loaded.truth[k].sum())
        rows.append(row)
    numbers = [k + 1 if s.number is None else s.number for k, s in enumerate(spec.slices)]
    write_overlay_gif(overlays, numbers, folder / f"{spec.name}.gif")
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
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PredictError(f"output {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PredictError(f"output {output}: cannot write in {ancestor} (permission denied)")
    return out


def _os_reason(e: OSError) -> str:
    if e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


@contextlib.contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Turn an ``OSError`` of writing the results (no space, permissions) into a one-line
    :class:`PredictError` naming the output."""
    try:
        yield
    except OSError as e:
        raise PredictError(f"cannot write the output {out}: {_os_reason(e)}") from None


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
