"""What the predict tests share: generated inputs, tiny calibrated checkpoints, the CLI run on
every input (session fixtures, registered by conftest.py, so the four test files build them
once) and helpers reading the outputs back.

All on generated data: small synthetic kaggle_3m patients (96x96 .tif with masks), a non-square
patient folder of PNGs, a single-channel FLAIR slice; models are tiny and random (their final
bias shifted so that about a fifth of the pixels are predicted, in several components).
"""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from _reference import read_volume
from unet_jax import preprocess
from unet_jax.checkpoint import load_model, save_model_checkpoint
from unet_jax.config import Config
from unet_jax.input_pipeline import resize_batch
from unet_jax.model import BatchNorm, build_model
from unet_jax.predict import main
from unet_jax.synthetic import synthetic_volume, write_synthetic_kaggle3m

# ----------------------------------------------------------------------------- helpers


def read_predictions_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def output_masks(out: Path, volume: str) -> dict[str, np.ndarray]:
    """{slice stem: bool mask} of one output volume, from its PNGs."""
    found = {}
    for p in sorted((out / volume).glob("*_pred.png")):
        with Image.open(p) as im:
            arr = np.asarray(im)
        assert im.mode == "L" and set(np.unique(arr).tolist()) <= {0, 255}, p
        found[p.name[: -len("_pred.png")]] = arr == 255
    return found


def stacked_masks(out: Path, volume: str, stems: list[str]) -> np.ndarray:
    masks = output_masks(out, volume)
    return np.stack([masks[s] for s in stems])


def sigmoid_f64(logits) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def assert_thresholded(got: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> None:
    """``got`` is ``prob >= threshold`` wherever ``prob`` is farther than float rounding (1e-5)
    from the threshold; the few pixels closer than that may go either way."""
    near = np.abs(prob - threshold) <= 1e-5
    print(f"pixels within 1e-5 of the threshold: {int(near.sum())} of {near.size}")
    assert near.sum() <= max(2, near.size // 10_000)
    ref = prob >= threshold
    assert ref[~near].any() and not ref[~near].all()  # the comparison means something
    np.testing.assert_array_equal(got[~near], ref[~near])


def write_png16_rgb(path: Path, rgb: np.ndarray) -> None:
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


@pytest.fixture(scope="session")
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


def gap_cut(logits: np.ndarray) -> float:
    """A logit value to threshold at so that 5-40% of the pixels are above it: the middle of
    the widest gap between neighbouring values there (a cut among densely packed values, or
    inside a plateau of equal ones such as the background, would make the masks float ties)."""
    flat = np.sort(logits.ravel())
    sub = flat[int(0.6 * flat.size) : int(0.95 * flat.size)]
    i = int(np.argmax(np.diff(sub)))
    return float(sub[i] + sub[i + 1]) / 2


def model_input(images: np.ndarray, config: Config) -> jnp.ndarray:
    """The model input of a volume for a baseline-config model, built here step by step."""
    pv = preprocess.preprocess_volume(images, size=256)
    x = preprocess.standardise(pv.image, pv.channel_mean, pv.channel_std)
    return resize_batch(jnp.asarray(x), jnp.zeros(x.shape[:3] + (1,)), config.image_size)[0]


def calibrated_model(config: Config, x: jnp.ndarray, seed: int = 0):
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
    cut = gap_cut(np.asarray(model(x)))
    model.conv.bias[...] = model.conv.bias[...] - cut
    return model


@pytest.fixture(scope="session")
def checkpoint(data, tmp_path_factory) -> Path:
    """A tiny baseline-config checkpoint (4 features, model input 64)."""
    config = Config(name="tiny", features=4, image_size=64, dataset_config="baseline")
    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[0]
    images, _ = read_volume(patient)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_model_checkpoint(out, calibrated_model(config, model_input(images, config)), config)


def predict_all_inputs(checkpoint: Path, data: dict[str, Path], out: Path, *extra: str) -> Path:
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


@pytest.fixture(scope="session")
def run_lcc(checkpoint, data, tmp_path_factory) -> Path:
    return predict_all_inputs(checkpoint, data, tmp_path_factory.mktemp("runs") / "lcc")


@pytest.fixture(scope="session")
def run_no_lcc(checkpoint, data, tmp_path_factory) -> Path:
    return predict_all_inputs(
        checkpoint, data, tmp_path_factory.mktemp("runs") / "nolcc", "--no-lcc"
    )


@pytest.fixture(scope="session")
def two_steps(checkpoint, data, tmp_path_factory) -> Path:
    """One checkpoint folder holding two different models of the tiny config: step 0 the
    ``checkpoint`` fixture's model, step 1 another one (another seed)."""
    model, config, _ = load_model(checkpoint)
    patient = sorted(p for p in data["root"].iterdir() if p.is_dir())[0]
    images, _ = read_volume(patient)
    other = calibrated_model(config, model_input(images, config), seed=1)
    folder = tmp_path_factory.mktemp("two_steps") / "ckpt"
    save_model_checkpoint(folder, model, config, step=0)
    save_model_checkpoint(folder, other, config, step=1)
    return folder


def assert_cli_fails(capsys, argv, out: Path, *expected: str) -> str:
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
