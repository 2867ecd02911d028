"""RunState: the one owner of what a run saves and what a resume restores (no training: a tiny
Trainer's initial state, changed by hand)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _synth import blob_train_val, tiny_config
from unet_jax import rundir
from unet_jax.checkpoint import TrainCheckpoints
from unet_jax.input_pipeline import AugmentSpec, ResidentData, make_mesh
from unet_jax.run_state import PARAM_LIMIT, DivergedError, RunState
from unet_jax.train_steps import Trainer


@pytest.fixture(scope="module")
def split():
    return blob_train_val()[0]


def _trainer(split, seed=0):
    cfg = tiny_config("state", seed=seed, keep_latest=2)
    mesh = make_mesh()
    aug = AugmentSpec(cfg.aug_scale, cfg.aug_angle, cfg.aug_flip, None)
    return Trainer(cfg, ResidentData(split, mesh, cfg.batch_size, cfg.sampling, aug), mesh)


def _state(trainer, step, scale=1.0):
    """The trainer's state moved to ``step`` with its parameters scaled (distinct per step)."""
    state = dict(trainer.state)
    state["params"] = jax.tree.map(lambda p: p * scale, state["params"])
    state["step"] = jnp.asarray(step, jnp.int32)
    return state


def _eval(step, dsc):
    return {"type": "eval", "step": step, "epoch": step // 4, "val_dsc": dsc, "best": False}


def _lines(workdir):
    path = workdir / rundir.METRICS_FILE
    return [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []


def test_a_resume_restores_the_state_the_best_so_far_and_the_evaluation(tmp_path, split):
    trainer = _trainer(split)
    log = rundir.RunLog(tmp_path, True)
    saved = RunState(tmp_path, trainer, trainer.config, log)
    assert not saved.restore() and saved.best_metric is None and saved.last_eval == {}
    # Step 4: best (0.5). Step 8: not better (0.4). As an epoch end saves: best first, then
    # latest with the evaluation.
    for step, dsc, scale in [(4, 0.5, 2.0), (8, 0.4, 3.0)]:
        state, record = _state(trainer, step, scale), _eval(step, dsc)
        if saved.is_better(dsc):
            saved.save_best(step, state, dsc)
        saved.save_latest(step, state, evaluation=record)
        log.write(record)
    assert saved.best_metric == 0.5 and saved.last_eval == _eval(8, 0.4)
    log.write({"type": "train", "step": 9, "loss": 0.3})  # logged after the last checkpoint
    saved.close()

    # A new process: the state of step 8, the best DSC and evaluation as of step 8, the log
    # cut back to step 8.
    fresh = _trainer(split)
    again = RunState(tmp_path, fresh, fresh.config, rundir.RunLog(tmp_path, True))
    assert again.restore()
    assert fresh.step == 8
    want = jax.tree.leaves(_state(trainer, 8, 3.0)["params"])
    for a, b in zip(jax.tree.leaves(fresh.state["params"]), want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same bytes, saved
    assert again.best_metric == 0.5 and again.last_eval == _eval(8, 0.4)
    assert [r["step"] for r in _lines(tmp_path)] == [4, 8]
    assert not again.is_better(0.5) and again.is_better(0.51)
    again.close()


def test_a_lost_eval_line_is_logged_again_and_a_later_best_does_not_count(tmp_path, split):
    # A kill after `best` of step 8 was written but before its `latest`: the resume starts from
    # step 4, whose meta says best 0.5. The best on disk (0.9, step 8) must not be what later
    # evaluations are compared with: the resumed run writes step 8's best again, identically.
    trainer = _trainer(split)
    saved = RunState(tmp_path, trainer, trainer.config, rundir.RunLog(tmp_path, True))
    saved.save_best(4, _state(trainer, 4), 0.5)
    saved.save_latest(4, _state(trainer, 4), evaluation=_eval(4, 0.5))
    saved.save_best(8, _state(trainer, 8, 2.0), 0.9)  # ... and the kill: no latest 8
    saved.close()
    assert not (tmp_path / rundir.METRICS_FILE).exists()  # the eval line was lost too
    assert TrainCheckpoints(tmp_path).best_metric() == 0.9  # what the disk says

    fresh = _trainer(split)
    again = RunState(tmp_path, fresh, fresh.config, rundir.RunLog(tmp_path, True))
    assert again.restore() and fresh.step == 4
    assert again.best_metric == 0.5  # as of step 4
    assert again.is_better(0.9)
    assert _lines(tmp_path) == [_eval(4, 0.5)]  # logged again from the checkpoint
    again.close()


def test_diverged_parameters_are_never_saved(tmp_path, split):
    trainer = _trainer(split)
    saved = RunState(tmp_path, trainer, trainer.config, rundir.RunLog(tmp_path, True))
    saved.save_latest(4, _state(trainer, 4))
    for bad, what in [(np.nan, "are not finite"), (PARAM_LIMIT * 10, r"reach 1\.0e\+07")]:
        state = _state(trainer, 8)
        leaves, tree = jax.tree.flatten(state["params"])
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(bad)
        state["params"] = jax.tree.unflatten(tree, leaves)
        with pytest.raises(DivergedError, match=what) as e:
            saved.save_latest(8, state)
        assert "step 8" in str(e.value) and "last good checkpoint is step 4" in str(e.value)
        with pytest.raises(DivergedError):
            saved.save_best(8, state, 0.9)
    assert saved.latest_step() == 4 and saved.best_metric is None
    saved.close()
