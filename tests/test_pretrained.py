"""Packaged models (`unet_jax.pretrained`): the shipped model reproduces its card through predict
on real patients; export and load round trips; tampered, unknown and mismatched files are one
line and exit 2; a non-editable install carries the weights and predicts outside the clone."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from _requires import needs_torch
from unet_jax import pretrained
from unet_jax.checkpoint import load_model, save_model_checkpoint
from unet_jax.config import Config
from unet_jax.model import build_model, model_to_pure
from unet_jax.predict import main as predict_main

REPO = Path(__file__).resolve().parent.parent
TINY = Config(name="tiny", features=4, image_size=32, batch_size=8)


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(model_to_pure(model))]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A model-only checkpoint of a tiny random U-Net (no training needed to test the format)."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    save_model_checkpoint(path, build_model(TINY, seed=3), TINY, {"metrics": {"val_dsc": 0.5}})
    return path


def test_the_packaged_model_is_pinned_small_and_carded():
    m = pretrained.MODELS[pretrained.DEFAULT_MODEL]
    assert m.path.is_file() and m.path.stat().st_size < 5 * 2**20
    assert pretrained.sha256_of(m.path) == m.sha256
    card = pretrained.card_of(m.name)
    assert card["name"] == m.name and card["dtype"] == "float16"
    assert card["config"]["data_dir"] is None and card["config"]["manual_dir"] is None
    per_patient = card["evaluation"]["no_tta"]["per_patient_dsc_lcc"]
    assert len(per_patient) == 10
    assert np.mean(list(per_patient.values())) == pytest.approx(
        card["evaluation"]["no_tta"]["val_dsc"], abs=1e-6
    )
    model, config, meta = pretrained.load(m.name)
    assert config.image_size == 128 and config.features == 16 and meta["packaged"]
    assert model(np.zeros((1, 128, 128, 3), np.float32)).shape == (1, 128, 128, 1)


def test_export_then_load_round_trips(tiny_checkpoint, tmp_path):
    model, config, _ = load_model(tiny_checkpoint)
    want = _leaves(model)
    f32 = pretrained.export(tiny_checkpoint, tmp_path / "a.safetensors", name="a", dtype="float32")
    got, got_config, meta = pretrained.load(f32)
    assert got_config == config.replace(data_dir=None, manual_dir=None)
    assert meta["name"] == "a" and meta["checkpoint_metrics"] == {"val_dsc": 0.5}
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(got), want))  # a cast and back
    for dtype, rel in (("float16", 2**-11), ("bfloat16", 2**-8)):  # one rounding each
        path = pretrained.export(
            tiny_checkpoint, tmp_path / f"{dtype}.safetensors", name="b", dtype=dtype
        )
        for a, b in zip(_leaves(pretrained.load(path)[0]), want):
            np.testing.assert_allclose(a, b, rtol=rel, atol=1e-7)
    # The loaded model computes what the checkpoint's does (float32: the same parameters).
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got(x)), np.asarray(model(x)))
    # load_model takes model files too, as predict and evaluation do.
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(load_model(f32)[0]), want))
    assert (f32.stat().st_mode & 0o044) == 0o044  # readable by all (package data)


def _run_predict(args, capsys) -> tuple[int, str, str]:
    code = predict_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str, *parts: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture(scope="module")
def one_slice(tmp_path_factory) -> Path:
    from unet_jax.synthetic import write_synthetic_kaggle3m

    return write_synthetic_kaggle3m(tmp_path_factory.mktemp("in"), 1, (6, 6), 64, 0)


def test_bad_models_are_one_line_and_exit_2(
    tiny_checkpoint, one_slice, tmp_path, capsys, monkeypatch
):
    good = pretrained.export(tiny_checkpoint, tmp_path / "good.safetensors", name="g")
    inputs = ["--input", str(one_slice), "--output"]
    # Unknown name.
    code, _, err = _run_predict(["--model", "no-such-model", *inputs, str(tmp_path / "o1")], capsys)
    assert code == 2
    _one_error_line(err, "unknown model 'no-such-model'", pretrained.DEFAULT_MODEL)
    # A packaged model whose file changed by one byte.
    data = bytearray(pretrained.MODELS[pretrained.DEFAULT_MODEL].path.read_bytes())
    data[-100] ^= 1  # one bit of one weight
    pinned = pretrained.MODELS[pretrained.DEFAULT_MODEL]
    (tmp_path / pinned.file).write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    code, _, err = _run_predict(["--model", pinned.name, *inputs, str(tmp_path / "o2")], capsys)
    assert code == 2
    _one_error_line(err, "SHA-256", pinned.sha256, "changed or damaged")
    monkeypatch.undo()
    # A file whose tensors belong to another architecture than its config.
    tensors, card = load_file(str(good)), pretrained.card_of(good)
    card["config"]["features"] = 8
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), {"format": pretrained.FORMAT, "card": json.dumps(card)})
    code, _, err = _run_predict(["--model", str(other), *inputs, str(tmp_path / "o3")], capsys)
    assert code == 2
    _one_error_line(err, str(other), "features=8", "not those of the model")
    # A safetensors file that is not a unet_jax model; a file that is not safetensors at all.
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    for i, (path, part) in enumerate(
        ((foreign, "not a unet_jax model file"), (junk, "not a readable"))
    ):
        code, _, err = _run_predict(
            ["--model", str(path), *inputs, str(tmp_path / f"o4{i}")], capsys
        )
        assert code == 2
        _one_error_line(err, str(path), part)
    for i in range(3):
        assert not (tmp_path / f"o{i + 1}").exists()
    # Export: a name that is not .safetensors, one line.
    assert (
        pretrained.main(
            [
                "export",
                "--checkpoint",
                str(tiny_checkpoint),
                "--name",
                "x",
                "--out",
                str(tmp_path / "x.bin"),
            ]
        )
        == 2
    )


def test_list_models_prints_the_cards(capsys):
    code, out, _ = _run_predict(["--list-models"], capsys)
    assert code == 0
    assert pretrained.DEFAULT_MODEL in out and "research use only" in out and "mean DSC" in out


@pytest.mark.real_data
@pytest.mark.slow
def test_the_packaged_model_reproduces_its_card_through_predict(real_manual_dir, tmp_path, capsys):
    # The whole inference path (reading the .tif slices, the baseline's preprocessing, the model
    # at 128x128, bilinear restore, LCC) on two validation patients: predict's CSV gives the
    # DSC the training evaluation computes, which the card recorded when the model was made.
    card = pretrained.card_of(pretrained.DEFAULT_MODEL)["evaluation"]["no_tta"]
    patients = ["TCGA_CS_6667_20011105", "TCGA_HT_7616_19940813"]  # a good and the worst one
    folders = [str(real_manual_dir / "kaggle_3m" / p) for p in patients]
    out = tmp_path / "out"
    code, stdout, err = _run_predict(
        ["--input", *folders, "--output", str(out), "--no-progress"], capsys
    )
    assert code == 0, err
    assert f"using the packaged model {pretrained.DEFAULT_MODEL}" in err
    with open(out / "predictions.csv", newline="") as f:
        rows = {r["volume"]: r for r in csv.DictReader(f) if r["level"] == "volume"}
    for p in patients:
        assert float(rows[p]["dsc_model_lcc"]) == pytest.approx(
            card["per_patient_dsc_lcc"][p], abs=1e-3
        )
    settings = json.loads((out / "predict.json").read_text())
    assert (
        settings["checkpoints"][0]["sha256"] == pretrained.MODELS[pretrained.DEFAULT_MODEL].sha256
    )


@pytest.mark.slow
def test_a_non_editable_install_carries_the_weights_and_predicts_elsewhere(one_slice, tmp_path):
    # The wheel `pip install .` builds, installed into its own folder, imported first from a
    # folder outside the clone: the packaged model loads from the installed package data.
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    site = tmp_path / "site"
    (wheel,) = wheels.glob("unet_jax-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    weights = site / "unet_jax" / "weights"
    assert (weights / pretrained.MODELS[pretrained.DEFAULT_MODEL].file).is_file()
    assert (weights / "README.md").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", "import unet_jax, sys; print(unet_jax.__file__); "
         "from unet_jax.predict import main; sys.exit(main(sys.argv[1:]))",
         "--input", str(one_slice), "--output", str(elsewhere / "out"), "--no-progress"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith(str(site))
    settings = json.loads((elsewhere / "out" / "predict.json").read_text())
    assert settings["checkpoints"][0]["path"].startswith(str(site))
    shutil.rmtree(site)


@needs_torch
def test_the_baselines_pytorch_weights_become_a_model_file(tmp_path):
    # The README's path for the baseline's published unet.pt: convert, then export; the model
    # file computes what the PyTorch model computes (float32 storage: to float rounding).
    import torch

    from benchmarks.torch_baseline.unet import UNet as TorchUNet
    from unet_jax.convert import main as convert_main

    torch.manual_seed(0)
    tm = TorchUNet(3, 1, 4).eval()
    torch.save(tm.state_dict(), tmp_path / "unet.pt")
    assert convert_main([str(tmp_path / "unet.pt"), str(tmp_path / "converted")]) == 0
    code = pretrained.main(
        ["export", "--checkpoint", str(tmp_path / "converted"), "--name", "baseline-published",
         "--out", str(tmp_path / "b.safetensors"), "--dtype", "float32"]
    )  # fmt: skip
    assert code == 0
    model, config, meta = pretrained.load(tmp_path / "b.safetensors")
    assert meta["name"] == "baseline-published" and config.features == 4
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch.sigmoid(tm(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy()[:, 0]
    got = np.asarray(jax.nn.sigmoid(model(x)))[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
