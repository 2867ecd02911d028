"""PyTorch baseline -> Flax parity, through the function and through the .pt -> CLI -> Orbax path;
and the CLI's refusals (no PyTorch, non-finite weights, outputs it cannot write), each one line
with exit status 2 and nothing left behind."""

import errno
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.checkpoint import CheckpointError, load_model
from unet_jax.convert import INSTALL_TORCH, ConversionError, main, unet_from_torch

REPO = Path(__file__).resolve().parent.parent

try:
    import torch
except ImportError:  # the refusal tests below run without it
    torch = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="the `baseline` extra (torch) is needed for parity tests"
)


@pytest.fixture(scope="module")
def torch_model():
    if torch is None:
        pytest.skip("the `baseline` extra (torch) is needed for parity tests")
    from benchmarks.torch_baseline.unet import UNet as TorchUNet
    from benchmarks.torch_baseline.unet import randomize_batchnorm_stats

    torch.manual_seed(0)
    return randomize_batchnorm_stats(TorchUNet(3, 1, 32), seed=1).eval()


@pytest.fixture(scope="module")
def inputs():
    return np.random.RandomState(0).randn(2, 256, 256, 3).astype(np.float32)


def _torch_sigmoid(model, x):
    with torch.no_grad():
        out = torch.sigmoid(model(torch.from_numpy(x.transpose(0, 3, 1, 2))))
    return out.numpy().transpose(0, 2, 3, 1)


def test_eval_mode_parity(torch_model, inputs):
    ref = _torch_sigmoid(torch_model, inputs)
    model = unet_from_torch(torch_model.state_dict())
    got = np.asarray(jax.nn.sigmoid(model(jnp.asarray(inputs))))
    err = np.abs(got - ref).max()
    print(f"eval-mode max abs sigmoid difference: {err:.2e}")
    assert err < 1e-5
    # Non-trivial statistics were really used: ignoring them changes the output a lot.
    model.train()
    assert np.abs(np.asarray(jax.nn.sigmoid(model(jnp.asarray(inputs)))) - ref).max() > 1e-3


@needs_torch
def test_training_mode_parity_and_running_stat_updates(inputs):
    from benchmarks.torch_baseline.unet import UNet as TorchUNet
    from benchmarks.torch_baseline.unet import randomize_batchnorm_stats

    torch.manual_seed(2)
    tm = randomize_batchnorm_stats(TorchUNet(3, 1, 8), seed=3)
    model = unet_from_torch(tm.state_dict())
    tm.train()
    model.train()
    x = inputs[:, :64, :64]
    ref = _torch_sigmoid(tm, x)
    got = np.asarray(jax.nn.sigmoid(model(jnp.asarray(x))))
    assert np.abs(got - ref).max() < 1e-5
    for name in ("encoder1", "bottleneck", "decoder1"):
        tnorm = getattr(tm, name)[1]
        jnorm = getattr(model, name).norm1
        np.testing.assert_allclose(
            np.asarray(jnorm.running_mean[...]), tnorm.running_mean.numpy(), atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(jnorm.running_var[...]), tnorm.running_var.numpy(), rtol=1e-5
        )


def test_pt_file_through_cli_and_orbax(torch_model, inputs, tmp_path):
    pt = tmp_path / "unet.pt"
    torch.save(torch_model.state_dict(), pt)
    assert main([str(pt), str(tmp_path / "ckpt")]) == 0
    # Written beside its place and renamed into it, with the umask's permissions (not the
    # temporary folder's 0700).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "unet.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask
    model, config, meta = load_model(tmp_path / "ckpt")
    assert config.features == 32 and meta["source"].endswith("unet.pt")
    got = np.asarray(jax.nn.sigmoid(model(jnp.asarray(inputs))))
    assert np.abs(got - _torch_sigmoid(torch_model, inputs)).max() < 1e-5
    # Refuses to overwrite a non-empty directory.
    assert main([str(pt), str(tmp_path / "ckpt")]) == 2


def test_bad_state_dicts_name_the_offending_keys(torch_model, tmp_path, capsys):
    sd = dict(torch_model.state_dict())
    del sd["decoder2.dec2norm1.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as e:
        unet_from_torch(sd)
    assert "decoder2.dec2norm1.running_var" in str(e.value) and "extra.weight" in str(e.value)
    sd = dict(torch_model.state_dict())
    sd["upconv2.bias"] = torch.zeros(7)
    with pytest.raises(ConversionError, match=r"upconv2.bias: \(7,\)"):
        unet_from_torch(sd)
    # A .pt holding something else than a state_dict, and a pickled object weights_only refuses.
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert main([str(tmp_path / "list.pt"), str(tmp_path / "o1")]) == 2
    assert "not a state_dict" in capsys.readouterr().err
    torch.save({"m": object()}, tmp_path / "obj.pt")
    assert main([str(tmp_path / "obj.pt"), str(tmp_path / "o2")]) == 2
    assert "weights-only" in capsys.readouterr().err


def test_load_model_rejects_foreign_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no unet_jax checkpoint"):
        load_model(tmp_path / "empty")


# ----------------------------------------------------------------------------- refusals


def _refused(capsys, argv: list[str], *expected: str) -> str:
    """The CLI exits 2 with one ``error:`` line holding ``expected``, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expected:
        assert e in err, (e, err)
    return err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name)


def test_without_torch_it_names_the_baseline_extra(tmp_path):
    """The README's plain install (``pip install -e .``) has no PyTorch: the command says which
    extra to install, in one line, instead of a ModuleNotFoundError traceback."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("torch") for d in extras["optional-dependencies"]["baseline"])
    assert INSTALL_TORCH == 'pip install -e ".[baseline]"'
    shim = tmp_path / "shim"
    shim.mkdir()
    # Shadows an installed torch: importing it fails as it does where torch is absent.
    (shim / "torch.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    pt = tmp_path / "unet.pt"
    pt.write_bytes(b"not read: torch is missing")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, "-m", "unet_jax.convert", str(pt), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(pt) in lines[0], proc.stderr
    assert 'pip install -e ".[baseline]"' in lines[0]
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@needs_torch
def test_non_finite_weights_are_refused(tmp_path, capsys):
    """NaN/inf weights (or negative variances) would convert into a model that predicts empty
    masks with exit status 0: refused, naming the tensors."""
    from benchmarks.torch_baseline.unet import UNet as TorchUNet

    torch.manual_seed(0)
    torch_model = TorchUNet(3, 1, 4)  # small: each conversion builds the model
    for key, bad in [
        ("decoder3.dec3conv2.weight", float("nan")),
        ("encoder2.enc2norm1.running_mean", float("inf")),
        ("upconv1.bias", float("-inf")),
    ]:
        sd = dict(torch_model.state_dict())
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = bad
        with pytest.raises(ConversionError, match="NaN or inf") as e:
            unet_from_torch(sd)
        assert key in str(e.value)
    sd = dict(torch_model.state_dict())
    sd["bottleneck.bottlenecknorm2.running_var"] = -sd["bottleneck.bottlenecknorm2.running_var"]
    with pytest.raises(ConversionError, match="negative BatchNorm running variances"):
        unet_from_torch(sd)
    # Through the command line: one line naming the file and the tensor, nothing written.
    sd = dict(torch_model.state_dict())
    sd["conv.weight"] = torch.full_like(sd["conv.weight"], float("nan"))
    pt = tmp_path / "nan.pt"
    torch.save(sd, pt)
    _refused(capsys, [str(pt), str(tmp_path / "out")], str(pt), "conv.weight", "NaN")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_outputs_it_cannot_write_are_refused_before_reading(tmp_path, capsys):
    """Checked first (the input here is never read): an output under a regular file (refused
    for root too), an output that is a file, a bad --image-size."""
    pt = tmp_path / "unet.pt"
    pt.write_bytes(b"never read")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile / "sub" / "ckpt"
    _refused(capsys, [str(pt), str(out)], str(out), f"{afile} is a file")
    _refused(capsys, [str(pt), str(afile)], str(afile), "exists and is not a directory")
    assert afile.read_text() == "mine"
    _refused(
        capsys,
        [str(pt), str(tmp_path / "o"), "--image-size", "100"],
        "--image-size 100",
        "multiple of 16",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "unet.pt"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores folder permissions (the file-in-the-way case covers root)",
)
def test_read_only_output_folder_is_refused(tmp_path, capsys):
    pt = tmp_path / "unet.pt"
    pt.write_bytes(b"never read")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _refused(capsys, [str(pt), str(ro / "ckpt")], str(ro / "ckpt"), "permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


@needs_torch
def test_a_failed_write_leaves_nothing(torch_model, tmp_path, monkeypatch, capsys):
    """A write failing half-way (here: no space left after part of the checkpoint) is one line
    naming the output, and removes what was written, including the parent folders made for it."""
    import unet_jax.checkpoint

    pt = tmp_path / "unet.pt"
    torch.save(torch_model.state_dict(), pt)

    def full_disk(directory, *args, **kwargs):
        (Path(directory) / "0").mkdir()
        (Path(directory) / "0" / "part").write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "0"))

    monkeypatch.setattr(unet_jax.checkpoint, "save_model_checkpoint", full_disk)
    out = tmp_path / "new" / "deeper" / "ckpt"
    _refused(capsys, [str(pt), str(out)], f"cannot write the output {out}", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.pt"]
