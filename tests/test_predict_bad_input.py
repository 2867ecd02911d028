"""`python -m unet_jax.predict` on bad input: one `error:` line, exit status 2, nothing
written (bad slices and folders, outputs it must not or cannot write, bad checkpoints).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from _predict_setup import (
    assert_cli_fails,
    write_png16_rgb,
)
from unet_jax.checkpoint import save_model_checkpoint
from unet_jax.config import Config
from unet_jax.model import build_model
from unet_jax.predict import main

# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors_and_write_nothing(checkpoint, data, tmp_path, capsys):
    ck = ["--checkpoint", str(checkpoint), "--input"]
    bad = tmp_path / "bad"
    bad.mkdir()
    junk = bad / "junk_1.tif"
    junk.write_bytes(b"this is not a TIFF file")
    assert_cli_fails(capsys, ck + [str(junk)], tmp_path / "o1", "junk_1.tif", "cannot read")
    rgba = bad / "rgba_1.png"
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(rgba)
    assert_cli_fails(capsys, ck + [str(rgba)], tmp_path / "o2", "rgba_1.png", "channel")
    deep = bad / "deep_1.png"
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(deep)
    assert_cli_fails(capsys, ck + [str(deep)], tmp_path / "o3", "deep_1.png", "8-bit")
    # 16-bit RGB: Pillow would silently read it as 8-bit RGB.
    deep_rgb = bad / "deeprgb_1.png"
    write_png16_rgb(deep_rgb, np.full((16, 16, 3), 40000, np.uint16))
    assert_cli_fails(capsys, ck + [str(deep_rgb)], tmp_path / "o3b", "deeprgb_1.png", "16-bit")
    two = bad / "two_1.png"
    Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA").save(two)
    assert_cli_fails(capsys, ck + [str(two)], tmp_path / "o3c", "two_1.png", "2 channels")
    jpg = bad / "photo_1.jpg"
    jpg.write_bytes(b"x")
    assert_cli_fails(capsys, ck + [str(jpg)], tmp_path / "o4", "unsupported file type")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_cli_fails(capsys, ck + [str(empty)], tmp_path / "o5", "empty folder")
    assert_cli_fails(capsys, ck + [str(tmp_path / "nope")], tmp_path / "o6", "no such file")
    # A checkpoint that is not ours.
    notours = tmp_path / "notours"
    (notours / "0").mkdir(parents=True)
    (notours / "0" / "weights.bin").write_bytes(b"\0" * 8)
    assert_cli_fails(
        capsys,
        ["--checkpoint", str(notours), "--input", str(data["lone"])],
        tmp_path / "o7",
        "not a unet_jax checkpoint",
    )
    assert_cli_fails(
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
    assert_cli_fails(
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
    assert_cli_fails(
        capsys,
        ck + [str(root)],
        tmp_path / "o2",
        f"no slice files in {root} nor in the 2 folders in it: found 2 .jpg files, "
        "1 .txt file, 1 *_mask file (ground truth, not slices); predict reads .tif/.tiff/.png",
    )


def test_a_step_that_does_not_exist_names_those_that_do(two_steps, data, tmp_path, capsys):
    assert_cli_fails(
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
    assert_cli_fails(capsys, ck, data["nonsquare"], "would overwrite")
    assert_cli_fails(capsys, ck, data["nonsquare"] / "pred", "inside the input folder")
    assert_cli_fails(capsys, ck, data["nonsquare"].parent, "would overwrite")
    assert_cli_fails(
        capsys,
        ["--checkpoint", str(checkpoint), "--input", str(data["lone"])],
        data["lone"],
        "exists and is not a folder",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_cli_fails(capsys, ck, full, "not empty")
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
    assert_cli_fails(
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
    assert_cli_fails(capsys, ck, out, str(out), f"{afile} is a file")
    # Checked before the checkpoint is read: a missing one is not what is reported.
    assert_cli_fails(
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
    assert_cli_fails(capsys, ck, out, f"cannot write the output {out}", "No space left")
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
        assert_cli_fails(capsys, ck, ro / "out", str(ro / "out"), "permission denied")
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
    err = assert_cli_fails(
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
