"""`python -m unet_jax.predict`: geometry, grouping, LCC and outputs, and agreement with the
training evaluation (smoke run) and with the PyTorch reference (converted baseline model).

Inputs, checkpoints and the shared CLI runs are the fixtures of tests/_predict_setup.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from _predict_setup import (
    assert_thresholded,
    calibrated_model,
    gap_cut,
    output_masks,
    read_predictions_csv,
    stacked_masks,
)
from _reference import largest_component, read_image, read_volume
from unet_jax import preprocess
from unet_jax.checkpoint import load_model, save_model_checkpoint
from unet_jax.config import Config
from unet_jax.input_pipeline import resize_batch
from unet_jax.predict import main, predict

# ----------------------------------------------------------------------------- outputs


def test_masks_overlays_gifs_in_each_inputs_own_geometry(run_lcc, data):
    rows = read_predictions_csv(run_lcc)
    patients = sorted(p.name for p in data["root"].iterdir() if p.is_dir())
    volumes = {r["volume"]: r for r in rows if r["level"] == "volume"}
    assert sorted(volumes) == sorted(patients + ["NSQ", "flair"])
    expected_size = {**{p: (96, 96) for p in patients}, "NSQ": (120, 88), "flair": (72, 80)}
    for name, (h, w) in expected_size.items():
        slice_rows = [r for r in rows if r["volume"] == name and r["level"] == "slice"]
        n = len(slice_rows)
        assert int(volumes[name]["slices"]) == n
        masks = output_masks(run_lcc, name)
        assert len(masks) == n
        for r in slice_rows:
            stem = Path(r["input"]).stem
            assert masks[stem].shape == (h, w)
            assert int(r["lesion_pixels"]) == int(masks[stem].sum())
            with Image.open(run_lcc / name / f"{stem}_overlay.png") as im:
                assert im.mode == "RGB" and im.size == (w, h)
                im.load()
        with Image.open(run_lcc / name / f"{name}.gif") as gif:
            assert gif.format == "GIF" and gif.n_frames == n
            for k in range(n):
                gif.seek(k)
                gif.convert("RGB")
        total = sum(int(r["lesion_pixels"]) for r in slice_rows)
        assert int(volumes[name]["lesion_pixels"]) == total
    # Ground truth was found beside the slices, and metrics reported per volume (not for the
    # lone slice without a mask).
    for name in patients + ["NSQ"]:
        v = volumes[name]
        assert v["dsc"] != "" and v["dsc_model_lcc"] != "" and 0 <= float(v["dsc"]) <= 1
    assert volumes["flair"]["dsc"] == "" and volumes["flair"]["channels"] == "1"
    settings = json.loads((run_lcc / "predict.json").read_text())
    assert any("single-channel" in s for s in settings["notices"])


def test_per_slice_dsc_is_the_written_mask_against_its_truth(run_lcc, data):
    """Each slice with a mask beside it: its DSC and accuracy in its own geometry, of the mask
    PNG written against the truth (empty against empty: 1.0); blank without a mask."""
    rows = [r for r in read_predictions_csv(run_lcc) if r["level"] == "slice"]
    masks: dict[str, dict[str, np.ndarray]] = {}
    both_empty = partial = 0
    for r in rows:
        path = Path(r["input"])
        found = sorted(path.parent.glob(f"{path.stem}_mask.*"))
        if not found:
            assert r["volume"] == "flair" and r["dsc"] == r["accuracy"] == r["true_pixels"] == ""
            continue
        truth = read_image(found[0]) > 0
        pred = masks.setdefault(r["volume"], output_masks(run_lcc, r["volume"]))[path.stem]
        assert pred.shape == truth.shape == (int(r["height"]), int(r["width"]))
        total = int(pred.sum()) + int(truth.sum())
        dsc = 1.0 if total == 0 else 2 * int((pred & truth).sum()) / total
        assert float(r["dsc"]) == pytest.approx(dsc, abs=1e-6), r
        assert float(r["accuracy"]) == pytest.approx(float((pred == truth).mean()), abs=1e-6)
        assert int(r["true_pixels"]) == int(truth.sum())
        both_empty += total == 0
        partial += 0 < dsc < 1
    assert both_empty and partial  # the convention and the overlap are both exercised


def test_overlay_colours_are_in_legend_png_and_below_each_gif_frame(run_lcc):
    from unet_jax import overlays

    # The overlays keep the slice's size (test above): the legend is a file of its own, and each
    # overlay names the colours in its PNG text.
    with Image.open(run_lcc / "legend.png") as im:
        assert im.format == "PNG" and im.info["Description"] == overlays.LEGEND_TEXT
        legend = np.asarray(im.convert("RGB"))
    for _, colour in overlays.LEGEND:
        assert (legend == colour).all(axis=-1).sum() == 4 * 100  # a 10x10 square, upscaled 2x
    for png in run_lcc.glob("*/*_overlay.png"):
        with Image.open(png) as im:
            assert im.info["Description"] == overlays.LEGEND_TEXT
    # The GIF of the 120x88 patient: upscaled 3x to 360x264, the legend strip below.
    with Image.open(run_lcc / "NSQ" / "NSQ.gif") as gif:
        assert gif.size == (264, 360 + overlays.LEGEND_HEIGHT)
        for k in range(gif.n_frames):
            gif.seek(k)
            strip = np.asarray(gif.convert("RGB"))[360:].astype(int)
            r, g, b = strip[..., 0], strip[..., 1], strip[..., 2]
            assert ((r > 200) & (g < 60) & (b < 60)).sum() >= 90  # the red square
            assert ((g > 200) & (r < 60) & (b < 60)).sum() >= 90  # green
            assert ((r > 200) & (g > 200) & (b < 60)).sum() >= 90  # yellow


def test_dropped_slices_are_empty_and_masks_stay_in_the_crop(run_lcc, data):
    """Baseline config: the first and last slice are never processed and come back empty, and
    predictions lie inside the crop box, computed here from the thresholded kept slices."""
    rows = read_predictions_csv(run_lcc)
    for folder in [p for p in data["root"].iterdir() if p.is_dir()] + [data["nonsquare"]]:
        name = folder.name
        images, _ = read_volume(folder)
        slice_rows = sorted(
            (r for r in rows if r["volume"] == name and r["level"] == "slice"),
            key=lambda r: int(r["slice"]),
        )
        stems = [Path(r["input"]).stem for r in slice_rows]
        pred = stacked_masks(run_lcc, name, stems)
        assert [r["processed"] for r in slice_rows] == ["0"] + ["1"] * (len(stems) - 2) + ["0"]
        assert not pred[0].any() and not pred[-1].any()
        kept = images[1:-1]
        inside = (kept >= 0.1 * kept.max()) & (kept > 0)
        ys = np.flatnonzero(inside.any(axis=(0, 2, 3)))
        xs = np.flatnonzero(inside.any(axis=(0, 1, 3)))
        box = np.zeros(pred.shape[1:], bool)
        box[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = True
        assert pred.any() and not (pred & ~box).any()


def test_lcc_on_off_changes_exactly_the_smaller_components(run_lcc, run_no_lcc):
    rows_on, rows_off = read_predictions_csv(run_lcc), read_predictions_csv(run_no_lcc)
    # Everything but the masks' content is the same.
    assert [(r["volume"], r["input"], r["processed"]) for r in rows_on] == [
        (r["volume"], r["input"], r["processed"]) for r in rows_off
    ]
    several = 0
    for v in (r["volume"] for r in rows_on if r["level"] == "volume"):
        stems = [
            Path(r["input"]).stem for r in rows_on if r["volume"] == v and r["level"] == "slice"
        ]
        on, off = stacked_masks(run_lcc, v, stems), stacked_masks(run_no_lcc, v, stems)
        np.testing.assert_array_equal(on, largest_component(off))
        several += ndimage.label(off)[1] > 1
        # The model-resolution metrics do not depend on the flag.
        von = next(r for r in rows_on if r["volume"] == v and r["level"] == "volume")
        voff = next(r for r in rows_off if r["volume"] == v and r["level"] == "volume")
        assert von["dsc_model_lcc"] == voff["dsc_model_lcc"]
    assert several >= 2  # the test means something: LCC removed components


def test_a_folder_gives_the_same_result_as_its_slices_given_one_by_one(checkpoint, data, tmp_path):
    folder = data["nonsquare"]
    files = sorted(str(p) for p in folder.iterdir())  # a glob: masks included, any order
    files = files[::2] + files[1::2]
    out_a, out_b = tmp_path / "folder", tmp_path / "files"
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(folder),
                "--output",
                str(out_a),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                *files,
                "--output",
                str(out_b),
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_predictions_csv(out_a) == read_predictions_csv(out_b)
    names_a = sorted(p.relative_to(out_a).as_posix() for p in out_a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(out_b).as_posix() for p in out_b.rglob("*") if p.is_file())
    assert names_a == names_b and len(names_a) == 2 * 7 + 4  # + GIF, CSV, JSON, legend
    for name in names_a:
        if name.endswith(".png"):
            np.testing.assert_array_equal(read_image(out_a / name), read_image(out_b / name))


def test_raw_config_checkpoint(data, tmp_path):
    """A raw-config model: every slice processed, volume statistics of image/255, masks back in
    the input's (non-square) size."""
    config = Config(name="tiny_raw", features=4, image_size=64, dataset_config="raw")
    # Reference input: the volume standardised by its own statistics of image/255, resized to
    # 64 as in training.
    images, _ = read_volume(data["nonsquare"])
    x = images / 255.0
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    xn = (images.astype(np.float32) / 255.0 - mean.astype(np.float32)) / std.astype(np.float32)
    xr, _ = resize_batch(jnp.asarray(xn), jnp.zeros(xn.shape[:3] + (1,)), 64)
    ckpt = save_model_checkpoint(
        tmp_path / "raw_ckpt", calibrated_model(config, xr, seed=1), config
    )
    out = tmp_path / "out"
    summary = predict(ckpt, [data["nonsquare"]], out, progress=False, log=lambda s: None)
    assert summary.volumes == 1 and summary.slices == 7
    rows = read_predictions_csv(out)
    assert [r["processed"] for r in rows if r["level"] == "slice"] == ["1"] * 7
    # The loaded model's probabilities resized bilinearly to the slices' size (half-pixel
    # centres, antialiased where it shrinks: jax.image.resize), thresholded, without LCC.
    model, _, _ = load_model(ckpt)
    prob = jax.nn.sigmoid(model(xr))
    ref = np.asarray(jax.image.resize(prob, (7, 120, 88, 1), "linear", antialias=True))[..., 0]
    out_no_lcc = tmp_path / "out_no_lcc"
    predict(ckpt, [data["nonsquare"]], out_no_lcc, lcc=False, progress=False, log=lambda s: None)
    stems = [f"NSQ_{k}" for k in range(1, 8)]
    assert_thresholded(stacked_masks(out_no_lcc, "NSQ", stems), ref)
    # With LCC: its largest component.
    got = stacked_masks(out, "NSQ", stems)
    np.testing.assert_array_equal(got, largest_component(stacked_masks(out_no_lcc, "NSQ", stems)))
    assert got.any() and not got.all()


# ----------------------------------------------------------------------------- references


def test_converted_torch_model_gives_the_pytorch_reference_masks(data, tmp_path):
    torch = pytest.importorskip("torch", reason="the `baseline` extra (torch) is needed")
    from benchmarks.torch_baseline.unet import UNet as TorchUNet
    from benchmarks.torch_baseline.unet import randomize_batchnorm_stats
    from unet_jax.convert import main as convert_main

    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[1]
    images, _ = read_volume(patient)
    pv = preprocess.preprocess_volume(images, size=256)
    x = preprocess.standardise(pv.image, pv.channel_mean, pv.channel_std)
    torch.manual_seed(0)
    tm = randomize_batchnorm_stats(TorchUNet(3, 1, 8), seed=1)
    # Running statistics of this volume (one training-mode pass with momentum 1), keeping the
    # random affine parameters: default statistics leave the logits within ~1e-3 of each other,
    # packed at float rounding distance, where the two frameworks' last-bit differences would
    # decide the mask.
    norms = [m for m in tm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    tm.train()
    with torch.no_grad():
        tm(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for m in norms:
        m.momentum = 0.1
    tm.eval()

    def torch_logits():
        with torch.no_grad():
            return tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()[:, 0]

    cut = gap_cut(torch_logits())
    with torch.no_grad():  # part of the pixels predicted, in several components
        tm.conv.bias -= cut
    logits = torch_logits()
    # No float ties: every logit is farther from the threshold than the frameworks differ
    # (measured: at most ~2.4e-6 near the threshold for this model and volume).
    print(f"closest logit to the threshold: {np.abs(logits).min():.2e}")
    assert np.abs(logits).min() > 1e-5
    pt = tmp_path / "unet.pt"
    torch.save(tm.state_dict(), pt)
    assert convert_main([str(pt), str(tmp_path / "converted")]) == 0
    out = tmp_path / "out"
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "converted"),
                "--input",
                str(patient),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    n = images.shape[0]
    stems = [f"{patient.name}_{k}" for k in range(1, n + 1)]
    got = stacked_masks(out, patient.name, stems)
    # Reference: the PyTorch probabilities back to the slices (bilinear), thresholded at 0.5;
    # no pixel so close to the threshold that the frameworks' last bits could decide it.
    ref_prob = preprocess.restore_prediction(
        torch.sigmoid(torch.from_numpy(logits)).numpy(), pv.geometry, method="linear"
    )
    inside = np.abs(ref_prob - 0.5)[ref_prob > 0]
    print(f"closest restored probability to the threshold: {inside.min():.2e}")
    assert inside.min() > 1e-5
    ref_mask = ref_prob >= 0.5
    assert ref_mask.any() and ndimage.label(ref_mask)[1] > 1
    np.testing.assert_array_equal(got, largest_component(ref_mask))


@pytest.mark.slow
def test_dsc_equals_the_training_evaluation_on_the_same_patients(smoke_workdir, tmp_path):
    # smoke_workdir (conftest.py): the smoke experiment's run, shared with test_experiments.py.
    wd = smoke_workdir
    with open(wd / "per_patient.csv", newline="") as f:
        evaluation = {r["patient"]: r for r in csv.DictReader(f)}
    root = wd / "synthetic" / "manual" / "kaggle_3m"
    out = tmp_path / "out"
    assert (
        main(
            [
                "--checkpoint",
                str(wd),
                "--input",
                *[str(root / p) for p in evaluation],
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    got = {r["volume"]: r for r in read_predictions_csv(out) if r["level"] == "volume"}
    assert sorted(got) == sorted(evaluation)
    for p, ev in evaluation.items():
        assert int(got[p]["processed"]) == int(ev["slices"])
        assert float(got[p]["dsc_model_lcc"]) == pytest.approx(float(ev["dsc_lcc"]), abs=1e-6)
        assert float(got[p]["dsc_model"]) == pytest.approx(float(ev["dsc"]), abs=1e-6)
        assert float(got[p]["accuracy_model"]) == pytest.approx(float(ev["accuracy"]), abs=1e-6)
    # The run learnt something non-trivial, so the comparison is not between empty masks.
    assert any(0 < float(ev["dsc"]) < 1 for ev in evaluation.values())
