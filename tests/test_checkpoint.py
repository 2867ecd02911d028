"""unet_jax.checkpoint: a model round trip, the latest / best managers of a training workdir, and
the error for anything that is not a checkpoint. A 2-feature U-Net keeps every save to a fraction
of a second; its values are drawn with NumPy into the shape-only model (initialising it with JAX's
PRNG would compile for tens of seconds)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.checkpoint import (
    FORMAT,
    CheckpointError,
    TrainCheckpoints,
    abstract_model,
    load_model,
    save_model_checkpoint,
)
from unet_jax.config import Config
from unet_jax.model import load_pure, model_to_pure

CONFIG = Config(name="ckpt", features=2, image_size=16)


def _model(seed: int):
    """A tiny model with random parameters and BatchNorm statistics (none at its initial value)."""
    model = abstract_model(CONFIG)
    rng = np.random.default_rng(seed)
    shapes = model_to_pure(model)
    load_pure(model, jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes))
    return model


def _assert_same(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_checkpoint_round_trip(tmp_path):
    model = _model(1)
    out = save_model_checkpoint(tmp_path / "m", model, CONFIG, extra_meta={"note": "x"}, step=7)
    assert out == (tmp_path / "m").absolute()
    loaded, config, meta = load_model(tmp_path / "m")
    assert config == CONFIG
    assert meta["format"] == FORMAT and meta["step"] == 7 and meta["note"] == "x"
    assert meta["config"] == json.loads(json.dumps(CONFIG.to_dict()))
    _assert_same(model_to_pure(loaded), model_to_pure(model))
    assert loaded.encoder1.norm1.use_running_average  # eval mode


def test_latest_and_best_managers(tmp_path):
    opt = {"step": jnp.asarray(0, jnp.int32), "m": jnp.zeros(3)}
    models = {s: model_to_pure(_model(s)) for s in (1, 2, 3)}
    ckpts = TrainCheckpoints(tmp_path, keep_latest=1)
    assert ckpts.best_metric() is None and ckpts.restore_latest(models[1], opt) is None
    # (step, metric, is-best): the first metric is best; equal is not better; None never is.
    for step, metric, best in [
        (1, 0.5, True),
        (2, 0.5, False),
        (3, None, False),
        (4, 0.7, True),
        (5, 0.6, False),
    ]:
        state = models[min(step, 3)] if step != 4 else models[2]
        opt_s = {"step": jnp.asarray(step, jnp.int32), "m": jnp.full(3, float(step))}
        # As training saves: an evaluated step's meta holds its metrics.
        meta = {"epoch": step, **({"metrics": {"val_dsc": metric}} if metric else {})}
        assert ckpts.save(step, state, opt_s, CONFIG, meta, metric=metric) is best, step
    assert ckpts.best_metric() == 0.7
    model_s, opt_s, meta = ckpts.restore_latest(models[1], opt)
    _assert_same(model_s, models[3])
    assert int(opt_s["step"]) == 5 and np.asarray(opt_s["m"]).tolist() == [5.0] * 3
    assert meta["step"] == 5 and meta["epoch"] == 5
    assert Config.from_dict(meta["config"]) == CONFIG
    ckpts.close()

    # The best metric survives a restart (read back from disk).
    again = TrainCheckpoints(tmp_path, keep_latest=1)
    assert again.best_metric() == 0.7
    again.close()

    # A workdir gives its best checkpoint; a step picks it from either manager.
    loaded, config, meta = load_model(tmp_path)
    assert meta["step"] == 4 and config == CONFIG
    _assert_same(model_to_pure(loaded), models[2])
    loaded, _, meta = load_model(tmp_path, step=5)
    assert meta["step"] == 5
    _assert_same(model_to_pure(loaded), models[3])
    with pytest.raises(CheckpointError, match="no checkpoint for step 2"):
        load_model(tmp_path, step=2)  # only the most recent is kept besides the best


def test_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no unet_jax checkpoint"):
        load_model(tmp_path / "empty")

    save_model_checkpoint(tmp_path / "m", _model(1), CONFIG)
    meta_file: Path = tmp_path / "m" / "0" / "meta" / "metadata"
    good = meta_file.read_text()
    meta_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable meta"):
        load_model(tmp_path / "m")
    meta_file.write_text(json.dumps({**json.loads(good), "format": "other/1"}))
    with pytest.raises(CheckpointError, match="format 'other/1'"):
        load_model(tmp_path / "m")

    (tmp_path / "no_model" / "3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no 'model' item"):
        load_model(tmp_path / "no_model")
