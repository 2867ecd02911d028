"""`unet_jax.predict.predictor`: test-time augmentation and ensembles, against NumPy
references computed from the models' logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _predict_setup import (
    assert_cli_fails,
    assert_thresholded,
    model_input,
    predict_all_inputs,
    read_predictions_csv,
    sigmoid_f64,
    stacked_masks,
)
from _reference import read_image, read_volume
from unet_jax import preprocess
from unet_jax.checkpoint import load_model, save_model_checkpoint
from unet_jax.config import Config
from unet_jax.model import build_model
from unet_jax.predict import Predictor, discover, load_checkpoints, main
from unet_jax.predict import read_volume as read_loaded_volume

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
    return model_input(images, config), pv.geometry


def test_tta_averages_the_image_and_its_mirror(checkpoint, data, tmp_path):
    """--tta: the mean of the probabilities of the image and of its left-right mirror (mirrored
    back), computed here with NumPy from the model's logits; the masks are those probabilities
    back in the slices' geometry (bilinear), thresholded."""
    model, config, _ = load_model(checkpoint)
    x, geometry = _reference_input(data["nonsquare"], config)
    plain = sigmoid_f64(model(x))[..., 0]
    mirrored = sigmoid_f64(model(x[:, :, ::-1]))[:, :, ::-1, 0]  # axis 2: the columns
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
    assert_thresholded(stacked_masks(out, "NSQ", stems), restored)
    assert json.loads((out / "predict.json").read_text())["tta"] is True


def test_ensemble_of_one_checkpoint_twice_is_that_checkpoint(checkpoint, data, run_lcc, tmp_path):
    out = predict_all_inputs(checkpoint, data, tmp_path / "twice", "--checkpoint", str(checkpoint))
    assert read_predictions_csv(out) == read_predictions_csv(run_lcc)
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
    p0, p1 = (sigmoid_f64(m(x))[..., 0] for m in models)
    assert np.abs(p0 - p1).max() > 0.1  # two different models
    ref = (p0 + p1) / 2
    np.testing.assert_allclose(_prediction(models, config, folder).probabilities, ref, atol=2e-6)
    # With TTA: the mean over models and flips.
    mirror = [sigmoid_f64(m(x[:, :, ::-1]))[:, :, ::-1, 0] for m in models]
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
    assert_thresholded(stacked_masks(out, "NSQ", [f"NSQ_{k}" for k in range(1, 8)]), restored)
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
    err = assert_cli_fails(
        capsys,
        ["--checkpoint", str(checkpoint), str(smaller)] + lone,
        tmp_path / "o1",
        f"checkpoints {checkpoint} and {smaller}",
        "image_size 64 vs 32",
    )
    assert "dataset_config" not in err.split("(")[1].split(")")[0]  # only the fields that differ
    raw_config = Config(name="raw", features=4, image_size=32, dataset_config="raw")
    raw = save_model_checkpoint(tmp_path / "raw", build_model(raw_config), raw_config)
    assert_cli_fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--checkpoint", str(raw)] + lone,
        tmp_path / "o2",
        "dataset_config 'baseline' vs 'raw', image_size 64 vs 32",
    )
    # A different threshold: refused unless --threshold chooses the ensemble's.
    t_config = Config(name="t", features=4, image_size=64, threshold=0.4)
    other_t = save_model_checkpoint(tmp_path / "t04", build_model(t_config), t_config)
    pair = ["--checkpoint", str(checkpoint), str(other_t)] + lone
    assert_cli_fails(capsys, pair, tmp_path / "o3", "threshold (0.5 vs 0.4)", "--threshold")
    assert (
        main(pair + ["--threshold", "0.5", "--output", str(tmp_path / "o4"), "--no-progress"]) == 0
    )
    assert json.loads((tmp_path / "o4" / "predict.json").read_text())["threshold"] == 0.5
    # Steps: one for all or one per checkpoint.
    assert_cli_fails(
        capsys,
        ["--checkpoint", str(checkpoint), str(checkpoint), str(checkpoint), "--step", "0", "1"]
        + lone,
        tmp_path / "o5",
        "2 steps given for 3 checkpoints",
    )
