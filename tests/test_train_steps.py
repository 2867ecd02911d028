"""The jitted train steps: one run's step and whole-epoch program (Trainer), packed runs
(PackedTrainer). The loop that drives them is covered in test_train.py."""

import jax
import numpy as np
import pytest

from _checks import LOSS_RTOL, assert_same_training
from _synth import blob_train_val, tiny_config
from unet_jax.input_pipeline import AugmentSpec, ResidentData, make_mesh
from unet_jax.train_steps import PackedTrainer, Trainer, pack_mode


def _resident_trainer(cfg, split):
    mesh = make_mesh()
    aug = AugmentSpec(cfg.aug_scale, cfg.aug_angle, cfg.aug_flip, None)
    return Trainer(cfg, ResidentData(split, mesh, cfg.batch_size, cfg.sampling, aug), mesh)


def test_one_dispatch_epoch_matches_the_per_step_loop():
    # The epoch as one program (lax.scan of the step) against step-by-step dispatches, from the
    # same initial state: the same PRNG stream draws the same batches, and the two programs
    # train the same run up to float
    # rounding (XLA may order the backward pass's sums differently inside the loop; the bounds
    # and where they come from: tests/_checks.py).
    cfg = tiny_config("scan", epochs=1, seed=5)
    train, _ = blob_train_val()
    scanned, stepped = _resident_trainer(cfg, train), _resident_trainer(cfg, train)
    steps = scanned.steps_per_epoch
    assert steps == 4

    arrays, key = scanned.data.arrays, scanned.data_key
    batches = jax.jit(
        lambda: jax.lax.scan(
            lambda s, _: (s + 1, scanned.data.train_batch(key, s, arrays)),
            jax.numpy.int32(0),
            None,
            length=steps,
        )[1]
    )()
    for step in range(steps):
        x, y = jax.jit(stepped.data.train_batch)(key, jax.numpy.int32(step), arrays)
        # The same slices and augmentation parameters (integer work and the PRNG stream); the
        # resampled images to float rounding (measured: 1.7e-5 of a range of ~7 on jax 0.12,
        # bitwise on 0.10.2); another slice or draw would differ by O(1).
        np.testing.assert_allclose(np.asarray(batches[0][step]), np.asarray(x), rtol=0, atol=1e-4)
        assert np.mean(np.asarray(batches[1][step]) != np.asarray(y)) <= 1e-3

    losses = np.asarray(scanned.train_steps(steps)["loss"])
    step_losses = np.array([float(stepped.train_step()["loss"]) for _ in range(steps)])
    assert losses.shape == (steps,)
    assert scanned.step == stepped.step == steps
    state = lambda t: jax.tree.leaves((t.state["params"], t.state["batch_stats"]))
    assert_same_training(losses, step_losses, state(scanned), state(stepped))


def test_vmapped_packing_matches_the_lone_runs_within_float_rounding():
    # pack_mode="vmap" (accelerators' default) runs the step vectorised over the runs; XLA then
    # lowers convolutions whose weights carry the run axis as grouped convolutions, whose
    # float32 sums are ordered differently: two programs, equal up to amplified float rounding
    # (bounds and the measurements behind them, Intel and AMD: tests/_checks.py). 6 steps of 2
    # seeds, one dispatch per step.
    cfg = tiny_config("vmap", epochs=1)
    train, _ = blob_train_val()
    mode = "vmap"
    lone = [_resident_trainer(cfg.replace(seed=s), train) for s in (0, 1)]
    packed = [_resident_trainer(cfg.replace(seed=s), train) for s in (0, 1)]
    for t in packed[1:]:  # packed runs share one resident copy of the data
        t.data = packed[0].data
    pack = PackedTrainer(packed, mode)
    assert pack.mode == mode
    outs = [pack.train_step() for _ in range(6)]
    for r, t in enumerate(lone):
        a = np.array([float(o[r]["loss"]) for o in outs])
        b = np.array([float(t.train_step()["loss"]) for _ in range(6)])
        assert_same_training(
            a, b, jax.tree.leaves(packed[r].state["params"]), jax.tree.leaves(t.state["params"])
        )
        assert packed[r].step == t.step == 6
    # The bounds tell runs apart: the two seeds' losses differ far beyond them.
    runs = [np.array([float(o[r]["loss"]) for o in outs]) for r in (0, 1)]
    assert np.max(np.abs(runs[0] - runs[1]) / runs[1]) > 10 * LOSS_RTOL


def test_pack_mode_resolves_auto_by_backend_and_refuses_unknown_modes():
    assert pack_mode("auto") == ("unroll" if jax.default_backend() == "cpu" else "vmap")
    assert pack_mode("vmap") == "vmap" and pack_mode("unroll") == "unroll"
    with pytest.raises(ValueError, match="unknown pack_mode 'fast'"):
        pack_mode("fast")
