"""`python -m unet_jax.predict`: geometry, grouping, LCC, outputs, bad input, test-time
augmentation, ensembles, NIfTI volumes, and agreement with the training evaluation (smoke run)
and with the PyTorch reference (converted baseline model).

All on generated data: small synthetic kaggle_3m patients (96x96 .tif with masks), a non-square
patient folder of PNGs, a single-channel FLAIR slice; models are tiny and random (their final
bias shifted so that about a fifth of the pixels are predicted, in several components).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy import ndimage

from _reference import largest_component, read_image, read_volume
from unet_jax import preprocess
from unet_jax.checkpoint import load_model, save_model_checkpoint
from unet_jax.config import Config
from unet_jax.input_pipeline import resize_batch
from unet_jax.model import BatchNorm, build_model
from unet_jax.predict import Predictor, discover, load_checkpoints, main, predict
from unet_jax.predict import read_volume as read_loaded_volume
from unet_jax.synthetic import synthetic_volume, write_synthetic_kaggle3m

# ----------------------------------------------------------------------------- helpers


def _read_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _masks(out: Path, volume: str) -> dict[str, np.ndarray]:
    """{slice stem: bool mask} of one output volume, from its PNGs."""
    found = {}
    for p in sorted((out / volume).glob("*_pred.png")):
        with Image.open(p) as im:
            arr = np.asarray(im)
        assert im.mode == "L" and set(np.unique(arr).tolist()) <= {0, 255}, p
        found[p.name[: -len("_pred.png")]] = arr == 255
    return found


def _stack(out: Path, volume: str, stems: list[str]) -> np.ndarray:
    masks = _masks(out, volume)
    return np.stack([masks[s] for s in stems])


def _sigmoid(logits) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _assert_thresholded(got: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> None:
    """``got`` is ``prob >= threshold`` wherever ``prob`` is farther than float rounding (1e-5)
    from the threshold; the few pixels closer than that may go either way."""
    near = np.abs(prob - threshold) <= 1e-5
    print(f"pixels within 1e-5 of the threshold: {int(near.sum())} of {near.size}")
    assert near.sum() <= max(2, near.size // 10_000)
    ref = prob >= threshold
    assert ref[~near].any() and not ref[~near].all()  # the comparison means something
    np.testing.assert_array_equal(got[~near], ref[~near])


def _write_png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Inputs: a kaggle_3m root of 2 patients (96x96 .tif), a non-square PNG patient (120x88,
    masks beside), a lone single-channel FLAIR slice (72x80, no mask)."""
    base = tmp_path_factory.mktemp("predict_data")
    root = write_synthetic_kaggle3m(base / "synth", num_patients=2, slices=(6, 7), size=96, seed=3)
    rng = np.random.default_rng(5)
    images, masks = synthetic_volume(rng, 7, size=128)
    nsq = base / "nonsquare" / "NSQ"
    nsq.mkdir(parents=True)
    for k in range(7):
        Image.fromarray(images[k, 8:128, 20:108]).save(nsq / f"NSQ_{k + 1}.png")
        Image.fromarray(masks[k, 8:128, 20:108]).save(nsq / f"NSQ_{k + 1}_mask.png")
    lone_img, _ = synthetic_volume(np.random.default_rng(6), 3, size=80)
    lone = base / "single" / "flair.png"
    lone.parent.mkdir()
    Image.fromarray(lone_img[1, 4:76, :, 1]).save(lone)  # mode L, 72x80
    return {"root": root, "nonsquare": nsq, "lone": lone}


def _gap_cut(logits: np.ndarray) -> float:
    """A logit value to threshold at so that 5-40% of the pixels are above it: the middle of
    the widest gap between neighbouring values there (a cut among densely packed values, or
    inside a plateau of equal ones such as the background, would make the masks float ties)."""
    flat = np.sort(logits.ravel())
    sub = flat[int(0.6 * flat.size) : int(0.95 * flat.size)]
    i = int(np.argmax(np.diff(sub)))
    return float(sub[i] + sub[i + 1]) / 2


def _model_input(images: np.ndarray, config: Config) -> jnp.ndarray:
    """The model input of a volume for a baseline-config model, built here step by step."""
    pv = preprocess.preprocess_volume(images, size=256)
    x = preprocess.standardise(pv.image, pv.channel_mean, pv.channel_std)
    return resize_batch(jnp.asarray(x), jnp.zeros(x.shape[:3] + (1,)), config.image_size)[0]


def _calibrated(config: Config, x: jnp.ndarray, seed: int = 0):
    """A random model of ``config`` with BatchNorm statistics of ``x`` (so its logits vary at
    the scale of 1, not of float rounding) and a final bias that puts part of the pixels of
    ``x`` above 0, in several components, with no pixel near the threshold."""
    model = build_model(config, seed=seed)
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
    for m in norms:
        m.momentum = 1.0  # the running statistics become those of this one batch
    model.train()
    model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()
    cut = _gap_cut(np.asarray(model(x)))
    model.conv.bias[...] = model.conv.bias[...] - cut
    return model


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    """A tiny baseline-config checkpoint (4 features, model input 64)."""
    config = Config(name="tiny", features=4, image_size=64, dataset_config="baseline")
    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[0]
    images, _ = read_volume(patient)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_model_checkpoint(out, _calibrated(config, _model_input(images, config)), config)


def _predict_all_inputs(checkpoint: Path, data: dict[str, Path], out: Path, *extra: str) -> Path:
    """The CLI on every input of ``data`` (batch 8) into ``out``, with ``extra`` options."""
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(data["root"]),
                str(data["nonsquare"]),
                str(data["lone"]),
                "--output",
                str(out),
                "--batch-size",
                "8",
                *extra,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def run_lcc(checkpoint, data, tmp_path_factory) -> Path:
    return _predict_all_inputs(checkpoint, data, tmp_path_factory.mktemp("runs") / "lcc")


@pytest.fixture(scope="module")
def run_no_lcc(checkpoint, data, tmp_path_factory) -> Path:
    return _predict_all_inputs(
        checkpoint, data, tmp_path_factory.mktemp("runs") / "nolcc", "--no-lcc"
    )


# ----------------------------------------------------------------------------- outputs


def test_masks_overlays_gifs_in_each_inputs_own_geometry(run_lcc, data):
    rows = _read_csv(run_lcc)
    patients = sorted(p.name for p in data["root"].iterdir() if p.is_dir())
    volumes = {r["volume"]: r for r in rows if r["level"] == "volume"}
    assert sorted(volumes) == sorted(patients + ["NSQ", "flair"])
    expected_size = {**{p: (96, 96) for p in patients}, "NSQ": (120, 88), "flair": (72, 80)}
    for name, (h, w) in expected_size.items():
        slice_rows = [r for r in rows if r["volume"] == name and r["level"] == "slice"]
        n = len(slice_rows)
        assert int(volumes[name]["slices"]) == n
        masks = _masks(run_lcc, name)
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
    rows = [r for r in _read_csv(run_lcc) if r["level"] == "slice"]
    masks: dict[str, dict[str, np.ndarray]] = {}
    both_empty = partial = 0
    for r in rows:
        path = Path(r["input"])
        found = sorted(path.parent.glob(f"{path.stem}_mask.*"))
        if not found:
            assert r["volume"] == "flair" and r["dsc"] == r["accuracy"] == r["true_pixels"] == ""
            continue
        truth = read_image(found[0]) > 0
        pred = masks.setdefault(r["volume"], _masks(run_lcc, r["volume"]))[path.stem]
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
    rows = _read_csv(run_lcc)
    for folder in [p for p in data["root"].iterdir() if p.is_dir()] + [data["nonsquare"]]:
        name = folder.name
        images, _ = read_volume(folder)
        slice_rows = sorted(
            (r for r in rows if r["volume"] == name and r["level"] == "slice"),
            key=lambda r: int(r["slice"]),
        )
        stems = [Path(r["input"]).stem for r in slice_rows]
        pred = _stack(run_lcc, name, stems)
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
    rows_on, rows_off = _read_csv(run_lcc), _read_csv(run_no_lcc)
    # Everything but the masks' content is the same.
    assert [(r["volume"], r["input"], r["processed"]) for r in rows_on] == [
        (r["volume"], r["input"], r["processed"]) for r in rows_off
    ]
    several = 0
    for v in (r["volume"] for r in rows_on if r["level"] == "volume"):
        stems = [
            Path(r["input"]).stem for r in rows_on if r["volume"] == v and r["level"] == "slice"
        ]
        on, off = _stack(run_lcc, v, stems), _stack(run_no_lcc, v, stems)
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
    assert _read_csv(out_a) == _read_csv(out_b)
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
    ckpt = save_model_checkpoint(tmp_path / "raw_ckpt", _calibrated(config, xr, seed=1), config)
    out = tmp_path / "out"
    summary = predict(ckpt, [data["nonsquare"]], out, progress=False, log=lambda s: None)
    assert summary.volumes == 1 and summary.slices == 7
    rows = _read_csv(out)
    assert [r["processed"] for r in rows if r["level"] == "slice"] == ["1"] * 7
    # The loaded model's probabilities resized bilinearly to the slices' size (half-pixel
    # centres, antialiased where it shrinks: jax.image.resize), thresholded, without LCC.
    model, _, _ = load_model(ckpt)
    prob = jax.nn.sigmoid(model(xr))
    ref = np.asarray(jax.image.resize(prob, (7, 120, 88, 1), "linear", antialias=True))[..., 0]
    out_no_lcc = tmp_path / "out_no_lcc"
    predict(ckpt, [data["nonsquare"]], out_no_lcc, lcc=False, progress=False, log=lambda s: None)
    stems = [f"NSQ_{k}" for k in range(1, 8)]
    _assert_thresholded(_stack(out_no_lcc, "NSQ", stems), ref)
    # With LCC: its largest component.
    got = _stack(out, "NSQ", stems)
    np.testing.assert_array_equal(got, largest_component(_stack(out_no_lcc, "NSQ", stems)))
    assert got.any() and not got.all()


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, argv, out: Path, *expected: str) -> str:
    """Run the CLI expecting exit status 2 with one ``error:`` line (and perhaps notices) holding
    ``expected``; nothing new may appear at ``out``."""
    existed = out.exists()
    code = main(argv + ["--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    for e in expected:
        assert e in err, (e, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [ln.startswith("error: ") for ln in lines].count(True) == 1, err
    assert all(ln.startswith(("error: ", "notice: ")) for ln in lines), err
    assert out.exists() == existed and not list(out.parent.glob(out.name + ".partial-*"))
    return err


def test_bad_inputs_give_clear_errors_and_write_nothing(checkpoint, data, tmp_path, capsys):
    ck = ["--checkpoint", str(checkpoint), "--input"]
    bad = tmp_path / "bad"
    bad.mkdir()
    junk = bad / "junk_1.tif"
    junk.write_bytes(b"this is not a TIFF file")
    _fails(capsys, ck + [str(junk)], tmp_path / "o1", "junk_1.tif", "cannot read")
    rgba = bad / "rgba_1.png"
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(rgba)
    _fails(capsys, ck + [str(rgba)], tmp_path / "o2", "rgba_1.png", "channel")
    deep = bad / "deep_1.png"
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(deep)
    _fails(capsys, ck + [str(deep)], tmp_path / "o3", "deep_1.png", "8-bit")
    # 16-bit RGB: Pillow would silently read it as 8-bit RGB.
    deep_rgb = bad / "deeprgb_1.png"
    _write_png16_rgb(deep_rgb, np.full((16, 16, 3), 40000, np.uint16))
    _fails(capsys, ck + [str(deep_rgb)], tmp_path / "o3b", "deeprgb_1.png", "16-bit")
    two = bad / "two_1.png"
    Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA").save(two)
    _fails(capsys, ck + [str(two)], tmp_path / "o3c", "two_1.png", "2 channels")
    jpg = bad / "photo_1.jpg"
    jpg.write_bytes(b"x")
    _fails(capsys, ck + [str(jpg)], tmp_path / "o4", "unsupported file type")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ck + [str(empty)], tmp_path / "o5", "empty folder")
    _fails(capsys, ck + [str(tmp_path / "nope")], tmp_path / "o6", "no such file")
    # A checkpoint that is not ours.
    notours = tmp_path / "notours"
    (notours / "0").mkdir(parents=True)
    (notours / "0" / "weights.bin").write_bytes(b"\0" * 8)
    _fails(
        capsys,
        ["--checkpoint", str(notours), "--input", str(data["lone"])],
        tmp_path / "o7",
        "not a unet_jax checkpoint",
    )
    _fails(
        capsys,
        ["--checkpoint", str(tmp_path / "missing"), "--input", str(data["lone"])],
        tmp_path / "o8",
        "does not exist",
    )


def test_a_folder_without_slices_says_what_it_holds(checkpoint, data, tmp_path, capsys):
    ck = ["--checkpoint", str(checkpoint), "--input"]
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    (jpgs / "photo_1.jpg").write_bytes(b"x")
    (jpgs / ".DS_Store").write_bytes(b"x")  # hidden: not counted
    _fails(
        capsys,
        ck + [str(jpgs)],
        tmp_path / "o1",
        f"error: no slice files in {jpgs}: found 1 .jpg file; predict reads .tif/.tiff/.png "
        "slices (not *_mask) in a folder or in patient folders in it",
    )
    # A kaggle_3m-like root whose patient folders hold other files, and a mask.
    root = tmp_path / "root"
    for p in ("P1", "P2"):
        (root / p).mkdir(parents=True)
        (root / p / f"{p}_1.jpg").write_bytes(b"x")
    (root / "P1" / "notes.txt").write_text("x")
    (root / "P2" / "P2_1_mask.tif").write_bytes(b"x")
    _fails(
        capsys,
        ck + [str(root)],
        tmp_path / "o2",
        f"no slice files in {root} nor in the 2 folders in it: found 2 .jpg files, "
        "1 .txt file, 1 *_mask file (ground truth, not slices); predict reads .tif/.tiff/.png",
    )


def test_a_step_that_does_not_exist_names_those_that_do(two_steps, data, tmp_path, capsys):
    _fails(
        capsys,
        ["--checkpoint", str(two_steps), "--step", "999", "--input", str(data["lone"])],
        tmp_path / "o",
        f"error: no checkpoint for step 999 under {two_steps.absolute()} (steps: 1, 0)\n",
    )


def test_output_that_would_overwrite_or_mix_with_inputs_is_refused(
    checkpoint, data, tmp_path, capsys
):
    ck = ["--checkpoint", str(checkpoint), "--input", str(data["nonsquare"])]
    before = sorted(p.name for p in data["nonsquare"].iterdir())
    _fails(capsys, ck, data["nonsquare"], "would overwrite")
    _fails(capsys, ck, data["nonsquare"] / "pred", "inside the input folder")
    _fails(capsys, ck, data["nonsquare"].parent, "would overwrite")
    _fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--input", str(data["lone"])],
        data["lone"],
        "exists and is not a folder",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _fails(capsys, ck, full, "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in data["nonsquare"].iterdir()) == before


def test_a_failure_mid_run_leaves_nothing_that_looks_complete(checkpoint, data, tmp_path, capsys):
    """The second volume's file is truncated (its header reads fine): the first volume was
    already written, and is removed with the unfinished output."""
    src = data["nonsquare"]
    good = tmp_path / "in" / "AAA"
    badv = tmp_path / "in" / "ZZZ"
    good.mkdir(parents=True)
    badv.mkdir()
    for k in range(1, 4):
        (good / f"AAA_{k}.png").write_bytes((src / f"NSQ_{k}.png").read_bytes())
        data_bytes = (src / f"NSQ_{k}.png").read_bytes()
        (badv / f"ZZZ_{k}.png").write_bytes(
            data_bytes if k != 2 else data_bytes[: len(data_bytes) // 2]
        )
    out = tmp_path / "out"
    _fails(
        capsys, ["--checkpoint", str(checkpoint), "--input", str(good), str(badv)], out, "ZZZ_2.png"
    )  # out did not exist: it still does not, nor any partial output
    # An empty existing output folder is fine, and is where the results go.
    out.mkdir()
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(good),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "predictions.csv").is_file() and (out / "AAA" / "AAA.gif").is_file()


def test_outputs_it_cannot_write_are_one_line_naming_them(
    checkpoint, data, tmp_path, monkeypatch, capsys
):
    """An output under a regular file (refused for root too, and before the checkpoint is
    loaded), and a write failing mid-run: one line naming the output, exit 2, nothing left."""
    import unet_jax.predict.run as run_module

    ck = ["--checkpoint", str(checkpoint), "--input", str(data["nonsquare"])]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile / "sub" / "out"
    _fails(capsys, ck, out, str(out), f"{afile} is a file")
    # Checked before the checkpoint is read: a missing one is not what is reported.
    _fails(
        capsys,
        ["--checkpoint", str(tmp_path / "missing"), "--input", str(data["lone"])],
        out,
        f"{afile} is a file",
    )

    def full_disk(rows, path):
        path.write_text("volume,level\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run_module, "write_table", full_disk)
    out = tmp_path / "new" / "deeper" / "out"
    _fails(capsys, ck, out, f"cannot write the output {out}", "No space left")
    # Neither the partial output nor the parent folders made for it are left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores folder permissions (the file-in-the-way case covers root)",
)
def test_read_only_output_folder_is_refused(checkpoint, data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        ck = ["--checkpoint", str(checkpoint), "--input", str(data["lone"])]
        _fails(capsys, ck, ro / "out", str(ro / "out"), "permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_checkpoint_with_non_finite_parameters_is_refused(data, tmp_path, capsys):
    """Such a model predicts NaN logits, i.e. empty masks with exit 0: refused, naming the
    checkpoint and the arrays."""
    config = Config(name="tiny_nan", features=4, image_size=64, dataset_config="baseline")
    model = build_model(config)
    model.decoder2.conv1.kernel[...] = model.decoder2.conv1.kernel[...].at[0, 0, 0, 0].set(jnp.nan)
    model.encoder3.norm2.running_var[...] = jnp.full_like(
        model.encoder3.norm2.running_var[...], jnp.inf
    )
    ckpt = save_model_checkpoint(tmp_path / "nan_ckpt", model, config)
    err = _fails(
        capsys,
        ["--checkpoint", str(ckpt), "--input", str(data["lone"])],
        tmp_path / "out",
        str(ckpt),
        "NaN or inf",
        "decoder2.conv1.kernel",
        "encoder3.norm2.running_var",
    )
    assert "step 0" in err


def test_config_mismatching_the_stored_arrays_is_one_clean_line(data, tmp_path):
    """A checkpoint whose config does not build its stored arrays (here: features 16 in the
    config, 8 stored): Orbax's restore would fail part-way, and its reads still in flight printed
    tens of "Event loop is closed" tracebacks after the error. Refused before restoring, in its
    own process so that anything printed at exit is seen."""
    config = Config(name="tiny8", features=8, image_size=64, dataset_config="baseline")
    ckpt = save_model_checkpoint(tmp_path / "ckpt", build_model(config), config)
    meta_file = ckpt / "0" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["features"] = 16
    meta_file.write_text(json.dumps(meta))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unet_jax.predict",
            "--checkpoint",
            str(ckpt),
            "--input",
            str(data["lone"]),
            "--output",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {ckpt}: the checkpoint's config"), proc.stderr
    assert "features=16" in lines[0] and "stored as" in lines[0]
    assert proc.stdout == "" and not out.exists()


# ----------------------------------------------------------------------------- TTA, ensembles


def _prediction(models, config, folder: Path, **options):
    """The :class:`Predictor`'s result for the patient folder ``folder``."""
    (spec,), _ = discover([folder])
    loaded, _ = read_loaded_volume(spec)
    predictor = Predictor(models, config, **options)
    (result,) = predictor.predict_volumes([loaded])
    return result


def _reference_input(folder: Path, config: Config):
    """The model input of a patient folder for a baseline-config model, and its geometry."""
    images, _ = read_volume(folder)
    pv = preprocess.preprocess_volume(images, size=256)
    return _model_input(images, config), pv.geometry


def test_tta_averages_the_image_and_its_mirror(checkpoint, data, tmp_path):
    """--tta: the mean of the probabilities of the image and of its left-right mirror (mirrored
    back), computed here with NumPy from the model's logits; the masks are those probabilities
    back in the slices' geometry (bilinear), thresholded."""
    model, config, _ = load_model(checkpoint)
    x, geometry = _reference_input(data["nonsquare"], config)
    plain = _sigmoid(model(x))[..., 0]
    mirrored = _sigmoid(model(x[:, :, ::-1]))[:, :, ::-1, 0]  # axis 2: the columns
    ref = (plain + mirrored) / 2
    assert np.abs(ref - plain).max() > 0.01  # the model is not symmetric: TTA changes things
    got = _prediction(model, config, data["nonsquare"], tta=True)
    np.testing.assert_allclose(got.probabilities, ref, atol=2e-6)
    np.testing.assert_allclose(
        _prediction(model, config, data["nonsquare"]).probabilities, plain, atol=2e-6
    )
    out = tmp_path / "tta"
    args = ["--checkpoint", str(checkpoint), "--input", str(data["nonsquare"])]
    assert main(args + ["--output", str(out), "--tta", "--no-lcc", "--no-progress"]) == 0
    stems = [f"NSQ_{k}" for k in range(1, 8)]
    restored = preprocess.restore_prediction(ref.astype(np.float32), geometry, method="linear")
    _assert_thresholded(_stack(out, "NSQ", stems), restored)
    assert json.loads((out / "predict.json").read_text())["tta"] is True


@pytest.fixture(scope="module")
def two_steps(checkpoint, data, tmp_path_factory) -> Path:
    """One checkpoint folder holding two different models of the tiny config: step 0 the
    ``checkpoint`` fixture's model, step 1 another one (another seed)."""
    model, config, _ = load_model(checkpoint)
    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[0]
    images, _ = read_volume(patient)
    other = _calibrated(config, _model_input(images, config), seed=1)
    folder = tmp_path_factory.mktemp("two_steps") / "ckpt"
    save_model_checkpoint(folder, model, config, step=0)
    save_model_checkpoint(folder, other, config, step=1)
    return folder


def test_ensemble_of_one_checkpoint_twice_is_that_checkpoint(checkpoint, data, run_lcc, tmp_path):
    out = _predict_all_inputs(checkpoint, data, tmp_path / "twice", "--checkpoint", str(checkpoint))
    assert _read_csv(out) == _read_csv(run_lcc)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == sorted(p.relative_to(run_lcc).as_posix() for p in run_lcc.rglob("*.png"))
    for name in names:
        np.testing.assert_array_equal(read_image(out / name), read_image(run_lcc / name))
    settings = json.loads((out / "predict.json").read_text())
    assert [c["path"] for c in settings["checkpoints"]] == [str(checkpoint)] * 2
    assert any("given 2 times" in s for s in settings["notices"])


def test_ensemble_averages_the_probabilities_of_its_checkpoints(two_steps, data, tmp_path):
    """Two different models (steps 0 and 1 of one folder, --step per checkpoint): the mean of
    their probabilities, each computed here on its own."""
    folder = data["nonsquare"]
    models, config, metas = load_checkpoints([two_steps, two_steps], [0, 1])
    assert [m["step"] for m in metas] == [0, 1]
    x, geometry = _reference_input(folder, config)
    p0, p1 = (_sigmoid(m(x))[..., 0] for m in models)
    assert np.abs(p0 - p1).max() > 0.1  # two different models
    ref = (p0 + p1) / 2
    np.testing.assert_allclose(_prediction(models, config, folder).probabilities, ref, atol=2e-6)
    # With TTA: the mean over models and flips.
    mirror = [_sigmoid(m(x[:, :, ::-1]))[:, :, ::-1, 0] for m in models]
    np.testing.assert_allclose(
        _prediction(models, config, folder, tta=True).probabilities,
        (p0 + p1 + mirror[0] + mirror[1]) / 4,
        atol=2e-6,
    )
    out = tmp_path / "ensemble"
    argv = ["--checkpoint", str(two_steps), "--checkpoint", str(two_steps), "--step", "0", "1"]
    argv += ["--input", str(folder), "--output", str(out), "--no-lcc", "--no-progress"]
    assert main(argv) == 0
    restored = preprocess.restore_prediction(ref.astype(np.float32), geometry, method="linear")
    _assert_thresholded(_stack(out, "NSQ", [f"NSQ_{k}" for k in range(1, 8)]), restored)
    settings = json.loads((out / "predict.json").read_text())
    assert [c["step"] for c in settings["checkpoints"]] == [0, 1]


def test_ensemble_members_that_preprocess_differently_are_refused(
    checkpoint, data, tmp_path, capsys
):
    lone = ["--input", str(data["lone"])]
    smaller = save_model_checkpoint(
        tmp_path / "size32",
        build_model(Config(name="s32", features=4, image_size=32, dataset_config="baseline")),
        Config(name="s32", features=4, image_size=32, dataset_config="baseline"),
    )
    err = _fails(
        capsys,
        ["--checkpoint", str(checkpoint), str(smaller)] + lone,
        tmp_path / "o1",
        f"checkpoints {checkpoint} and {smaller}",
        "image_size 64 vs 32",
    )
    assert "dataset_config" not in err.split("(")[1].split(")")[0]  # only the fields that differ
    raw_config = Config(name="raw", features=4, image_size=32, dataset_config="raw")
    raw = save_model_checkpoint(tmp_path / "raw", build_model(raw_config), raw_config)
    _fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--checkpoint", str(raw)] + lone,
        tmp_path / "o2",
        "dataset_config 'baseline' vs 'raw', image_size 64 vs 32",
    )
    # A different threshold: refused unless --threshold chooses the ensemble's.
    t_config = Config(name="t", features=4, image_size=64, threshold=0.4)
    other_t = save_model_checkpoint(tmp_path / "t04", build_model(t_config), t_config)
    pair = ["--checkpoint", str(checkpoint), str(other_t)] + lone
    _fails(capsys, pair, tmp_path / "o3", "threshold (0.5 vs 0.4)", "--threshold")
    assert (
        main(pair + ["--threshold", "0.5", "--output", str(tmp_path / "o4"), "--no-progress"]) == 0
    )
    assert json.loads((tmp_path / "o4" / "predict.json").read_text())["threshold"] == 0.5
    # Steps: one for all or one per checkpoint.
    _fails(
        capsys,
        ["--checkpoint", str(checkpoint), str(checkpoint), str(checkpoint), "--step", "0", "1"]
        + lone,
        tmp_path / "o5",
        "2 steps given for 3 checkpoints",
    )


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
        np.testing.assert_array_equal(pred, _stack(out, name, [f.stem for f in files]))
        assert set(np.unique(pred).tolist()) <= {0, 1}
        if not single:
            truth = np.stack([read_image(f.with_name(f.stem + "_mask" + f.suffix)) for f in files])
            np.testing.assert_array_equal(load("truth"), truth > 0)
    assert len(np.unique(np.asarray(images).reshape(12, -1), axis=0)) == 12  # order matters
    assert json.loads((out / "predict.json").read_text())["format"] == "nifti"


def test_nifti_without_nibabel_names_the_extra(checkpoint, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel raises ImportError
    _fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--input", str(data["lone"]), "--format", "nifti"],
        tmp_path / "out",
        "nibabel",
        "unet-jax[nifti]",
    )


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

    cut = _gap_cut(torch_logits())
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
    got = _stack(out, patient.name, stems)
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
    got = {r["volume"]: r for r in _read_csv(out) if r["level"] == "volume"}
    assert sorted(got) == sorted(evaluation)
    for p, ev in evaluation.items():
        assert int(got[p]["processed"]) == int(ev["slices"])
        assert float(got[p]["dsc_model_lcc"]) == pytest.approx(float(ev["dsc_lcc"]), abs=1e-6)
        assert float(got[p]["dsc_model"]) == pytest.approx(float(ev["dsc"]), abs=1e-6)
        assert float(got[p]["accuracy_model"]) == pytest.approx(float(ev["accuracy"]), abs=1e-6)
    # The run learnt something non-trivial, so the comparison is not between empty masks.
    assert any(0 < float(ev["dsc"]) < 1 for ev in evaluation.values())
