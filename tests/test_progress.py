"""What a run reports while it trains: the train lines (StepLosses) and the progress modes, with
hand-made step outputs (the lines of whole runs are covered in test_train.py)."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unet_jax import rundir
from unet_jax.config import Config
from unet_jax.progress import Progress, StepLosses, _duration, progress_mode
from unet_jax.run_state import NonFiniteLossError


class _Trainer:
    steps_per_epoch = 4
    schedule = staticmethod(optax.constant_schedule(1e-3))


class _Saved:
    def latest_step(self):
        return 4


def _losses(tmp_path, **fields):
    config = Config(batch_size=2, **fields)
    tmp_path.mkdir(exist_ok=True)
    log = rundir.RunLog(tmp_path, True)
    progress = Progress(
        None, name="t", total=8, initial=0, steps_per_epoch=4, batch_size=2, started=0.0
    )
    return StepLosses(config, _Trainer(), log, progress, _Saved(), tmp_path), log


def _out(*losses):
    return {"loss": jnp.asarray(losses), "grad_norm": jnp.ones(len(losses))}


def _train_lines(tmp_path):
    lines = (tmp_path / rundir.METRICS_FILE).read_text().splitlines()
    return [json.loads(t) for t in lines]


def test_lines_do_not_depend_on_how_steps_were_fetched(tmp_path):
    # Every 3rd step, each epoch's last (4, 8) and every checkpoint_every_steps-th (6): the same
    # records whether the 8 steps came one by one or as stacked epochs.
    losses = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    one, _ = _losses(tmp_path / "one", log_every_steps=3, checkpoint_every_steps=6)
    for i, v in enumerate(losses):
        one.add(i, {"loss": jnp.asarray(v), "grad_norm": jnp.asarray(1.0)})
        if i % 2:
            one.flush()
    stacked, _ = _losses(tmp_path / "two", log_every_steps=3, checkpoint_every_steps=6)
    stacked.add_stacked(0, _out(*losses[:4]))
    stacked.add_stacked(4, _out(*losses[4:]))
    stacked.flush()
    a, b = _train_lines(tmp_path / "one"), _train_lines(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 4, 6, 8]
    np.testing.assert_allclose([r["loss"] for r in a], [0.7, 0.6, 0.4, 0.2], rtol=1e-6)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["epoch"] for r in a] == [0.75, 1.0, 1.5, 2.0] and a[0]["lr"] == pytest.approx(1e-3)
    assert stacked.epoch_loss() == pytest.approx(np.mean(losses))
    assert stacked.epoch_loss() is None  # reset by each call


def test_a_non_finite_loss_names_its_step_and_the_last_good_checkpoint(tmp_path):
    losses, _ = _losses(tmp_path)
    losses.add_stacked(4, _out(0.5, float("nan"), 0.4))
    with pytest.raises(NonFiniteLossError) as e:
        losses.flush()
    message = str(e.value)
    assert "non-finite training loss (nan) at step 5 (epoch 1)" in message
    assert "last good checkpoint is step 4" in message


def test_progress_modes_and_durations():
    assert progress_mode(True) == "bar" and progress_mode(False) is None
    assert progress_mode("lines") == "lines" and progress_mode("bar") == "bar"
    assert progress_mode(None) in ("bar", "lines")  # the terminal decides
    with pytest.raises(ValueError, match="progress must be"):
        progress_mode("loud")
    assert [_duration(s) for s in (0, 59.6, 3599, 3600 * 25 + 61)] == [
        "0:00:00",
        "0:01:00",
        "0:59:59",
        "25:01:01",
    ]
