"""PyTorch baseline -> Flax parity, through the function and through the .pt -> CLI -> Orbax path."""

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the `baseline` extra (torch) is needed for parity tests"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.torch_baseline.unet import UNet as TorchUNet  # noqa: E402
from benchmarks.torch_baseline.unet import randomize_batchnorm_stats  # noqa: E402
from unet_jax.checkpoint import CheckpointError, load_model  # noqa: E402
from unet_jax.convert import ConversionError, main, unet_from_torch  # noqa: E402


@pytest.fixture(scope="module")
def torch_model():
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


def test_training_mode_parity_and_running_stat_updates(inputs):
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
