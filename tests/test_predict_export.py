"""`unet_jax.predict.export`: NIfTI volumes load back as the slices and the PNG masks."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from _predict_setup import (
    assert_cli_fails,
    stacked_masks,
)
from _reference import read_image
from unet_jax.predict import main
from unet_jax.synthetic import synthetic_volume

# ----------------------------------------------------------------------------- NIfTI


def test_nifti_volumes_load_back_as_the_slices_and_masks(checkpoint, data, tmp_path):
    nib = pytest.importorskip("nibabel", reason="the `nifti` extra (nibabel) is needed")
    from unet_jax.predict.export import NIFTI_AFFINE

    # A patient of 12 slices: sorted as text, slice 10 would come before slice 2.
    images, masks = synthetic_volume(np.random.default_rng(8), 12, size=64)
    order = tmp_path / "in" / "ORD"
    order.mkdir(parents=True)
    for k in range(12):
        Image.fromarray(images[k, 4:60, 10:50]).save(order / f"ORD_{k + 1}.png")  # 56x40
        Image.fromarray(masks[k, 4:60, 10:50]).save(order / f"ORD_{k + 1}_mask.png")
    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[0]
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--input", str(patient), str(order), str(data["lone"])]
    assert main(argv + ["--output", str(out), "--format", "nifti", "--no-progress"]) == 0
    num = len([p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")])
    cases = {  # volume: (slice files in slice-number order, single channel)
        patient.name: ([patient / f"{patient.name}_{k}.tif" for k in range(1, num + 1)], False),
        "ORD": ([order / f"ORD_{k}.png" for k in range(1, 13)], False),
        "flair": ([data["lone"]], True),
    }
    channels = ("pre-contrast", "flair", "post-contrast")
    for name, (files, single) in cases.items():
        slices = np.stack([read_image(f) for f in files])
        if single:
            slices = slices[..., None]
        n, h, w = slices.shape[:3]
        expected = {f"{name}_{c}.nii.gz" for c in (["flair"] if single else channels)}
        expected |= {f"{name}_pred.nii.gz"} | (set() if single else {f"{name}_truth.nii.gz"})
        assert {p.name for p in (out / name).glob("*.nii.gz")} == expected

        def load(suffix: str) -> np.ndarray:
            img = nib.load(out / name / f"{name}_{suffix}.nii.gz")
            assert img.shape == (w, h, n) and img.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(img.affine, NIFTI_AFFINE)
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)
            assert img.header.get_xyzt_units()[0] == "mm"
            data_ = np.asarray(img.dataobj)
            assert data_.dtype == np.uint8
            return data_.transpose(2, 1, 0)  # back to (slice, row, column)

        for c, channel in enumerate(["flair"] if single else channels):
            np.testing.assert_array_equal(load(channel), slices[..., c])
        pred = load("pred")
        np.testing.assert_array_equal(pred, stacked_masks(out, name, [f.stem for f in files]))
        assert set(np.unique(pred).tolist()) <= {0, 1}
        if not single:
            truth = np.stack([read_image(f.with_name(f.stem + "_mask" + f.suffix)) for f in files])
            np.testing.assert_array_equal(load("truth"), truth > 0)
    assert len(np.unique(np.asarray(images).reshape(12, -1), axis=0)) == 12  # order matters
    assert json.loads((out / "predict.json").read_text())["format"] == "nifti"


def test_nifti_without_nibabel_names_the_extra(checkpoint, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel raises ImportError
    assert_cli_fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--input", str(data["lone"]), "--format", "nifti"],
        tmp_path / "out",
        "nibabel",
        "unet-jax[nifti]",
    )
