"""Training loop: learning, device-count invariance, exact resume after SIGKILL, best/latest
checkpoints, NaN handling and config protection. All on small generated data, CPU."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from _checks import assert_same_training
from _synth import blob_train_val, tiny_config
from unet_jax.checkpoint import TrainCheckpoints, load_model
from unet_jax.train import ConfigMismatchError, NonFiniteLossError, train_and_evaluate

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_train_worker.py"


def _records(workdir, kind):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _relative_param_gap(a, b) -> float:
    """Relative L2 distance between the parameters of two worker dumps."""
    keys = [k for k in a.files if k not in ("losses", "devices")]
    diff = np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in keys))
    return float(diff / np.sqrt(sum((a[k] ** 2).sum() for k in keys)))


def _worker(workdir, out, devices=1, extra=()):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, str(WORKER), str(workdir), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_loss_falls_and_validation_dsc_rises(tmp_path):
    # 160 steps of a 4-feature U-Net on blob data. Thresholds: the mean of the last 5 logged
    # training losses is below 75% of the first (soft Dice falls slowly; untrained stays ~0.8), and the best validation DSC (after LCC) reaches 0.6 while the
    # first evaluation is lower — an untrained model scores ~0.1 here.
    cfg = tiny_config("learn", epochs=40, log_every_steps=4, seed=0, eval_every_epochs=8)
    data = blob_train_val()
    summary = train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    train = _records(tmp_path, "train")
    evals = _records(tmp_path, "eval")
    assert len(evals) == 5 and summary["step"] == 160
    assert np.mean([r["loss"] for r in train[-5:]]) < 0.75 * train[0]["loss"]
    assert summary["best_val_dsc"] >= 0.6
    assert evals[0]["val_dsc"] < summary["best_val_dsc"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The worker's run trained without interruption on one device: ``(workdir, dump.npz)``
    (shared by the device-count and the interrupt tests)."""
    root = tmp_path_factory.mktemp("straight")
    run = _worker(root / "wd", root / "one.npz", devices=1)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "wd", root / "one.npz"


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_run(tmp_path, straight_run):
    # Same seed, same global batch of 8: on 8 fake CPU devices each holds one example and
    # BatchNorm statistics and gradients are all-reduced, so only the order of float32
    # reductions differs. Measured: the step-2 loss agrees to ~1e-7 relative, and the gap then
    # grows ~3x per step (Adam normalises each gradient element, so elements whose gradient is
    # near zero amplify rounding). Tolerances: losses of the first 3 steps 1e-5 relative, all 8
    # steps 1e-3; parameters after 8 steps within 5% in relative L2 norm — while a different
    # sampling/augmentation stream (tested below via a different seed's batches) differs at once.
    r8 = _worker(tmp_path / "w8", tmp_path / "eight.npz", devices=8)
    assert r8.returncode == 0, r8.stderr[-3000:]
    a, b = np.load(straight_run[1]), np.load(tmp_path / "eight.npz")
    assert int(a["devices"]) == 1 and int(b["devices"]) == 8
    np.testing.assert_allclose(a["losses"][:3], b["losses"][:3], rtol=1e-5)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-3)
    assert _relative_param_gap(a, b) < 0.05, _relative_param_gap(a, b)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    # jax.distributed with two local processes of one CPU device each (coordinator on loopback,
    # gloo collectives): the global batch of 8 is split over the two processes as over two
    # devices of one process. Same batches (same PRNG stream), so the losses agree to float
    # rounding of the cross-process sums; parameters within the tolerance of the 1-vs-8-device
    # test above. Only process 0 writes the run folder (one line per step, no duplicates).
    import socket

    one = _worker(tmp_path / "one", tmp_path / "one.npz", devices=2)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    wd = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(wd), "-", "--distributed", str(i), "2", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    dumped = _worker(wd, tmp_path / "two.npz", extra=("--dump-only",))
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert [r["step"] for r in _records(wd, "train")] == list(range(1, 9))
    assert [r["step"] for r in _records(wd, "eval")] == [4, 8]
    np.testing.assert_allclose(a["losses"][:3], b["losses"][:3], rtol=1e-5)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-3)
    assert _relative_param_gap(a, b) < 0.05, _relative_param_gap(a, b)


@pytest.mark.slow
def test_resume_after_any_interrupt_gives_the_uninterrupted_run_bitwise(tmp_path, straight_run):
    # The worker's run (2 epochs of 4 steps) interrupted by real signals at the moments that
    # used to lose something, resumed after each: SIGKILL before the first checkpoint (its train
    # lines must not be logged twice); SIGKILL between epoch 1's checkpoints and its
    # evaluation's log line (the evaluation must not be lost, nor the best mark move); SIGINT
    # during the last evaluation (its line must be written; training is complete, so the run
    # finishes). Then the same command once more, on the finished run. The result must be the
    # uninterrupted run's: the same log lines (train losses, evaluations, best marks), the same
    # best checkpoint, bitwise the same parameters (CPU XLA is deterministic for one program);
    # the rerun must leave the log as it was (no second summary).
    wd = tmp_path / "resumed"
    for signal_at, code in (("train:3:KILL", -9), ("eval:4:KILL", -9), ("eval:8:INT", 0)):
        run = _worker(wd, tmp_path / "unused.npz", extra=("--signal", signal_at))
        assert run.returncode == code, (signal_at, run.returncode, run.stderr[-3000:])
        steps = [r["step"] for r in _records(wd, "train")]
        assert steps == list(range(1, len(steps) + 1)), (signal_at, steps)  # no line twice
    assert "SIGINT: stopping" in run.stderr
    log = (wd / "metrics.jsonl").read_bytes()
    again = _worker(wd, tmp_path / "resumed.npz")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (wd / "metrics.jsonl").read_bytes() == log
    assert len(_records(wd, "summary")) == 1 and "val_dsc" in _records(wd, "summary")[0]
    straight_wd, straight_npz = straight_run
    a, b = np.load(straight_npz), np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(a["losses"], b["losses"])
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert _records(straight_wd, "eval") == _records(wd, "eval")
    assert [r["step"] for r in _records(wd, "eval")] == [4, 8]
    bests = []
    for d in (straight_wd, wd):
        ck = TrainCheckpoints(d)
        bests.append((ck.best.best_step(), ck.best_metric()))
        ck.close()
    assert bests[0] == bests[1] and bests[0][0] is not None


@pytest.mark.slow
def test_best_and_latest_survive_restart_and_nan_stops_cleanly(tmp_path):
    cfg = tiny_config("ck", epochs=3, log_every_steps=1, seed=1)
    data = blob_train_val()
    train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    evals = _records(tmp_path, "eval")
    best_seen = max(r["val_dsc"] for r in evals)
    ck = TrainCheckpoints(tmp_path)
    assert ck.latest.latest_step() == 12
    assert ck.best_metric() == pytest.approx(best_seen)
    best_step = [r["step"] for r in evals if r["val_dsc"] == best_seen][0]
    assert ck.best.best_step() == best_step
    ck.close()
    # The best checkpoint is for use (model + meta); only latest carries the optimiser state.
    items = {
        d.name for d in (tmp_path / "checkpoints" / "best" / str(best_step)).iterdir() if d.is_dir()
    }
    assert {"model", "meta"} <= items and "opt" not in items  # (+ Orbax's own "metrics")
    assert (tmp_path / "checkpoints" / "latest" / "12" / "opt").is_dir()
    _, _, meta = load_model(tmp_path)
    assert meta["step"] == best_step and meta["metrics"]["val_dsc"] == pytest.approx(best_seen)

    # The same workdir with another config is refused (no silent mixing of runs).
    with pytest.raises(ConfigMismatchError, match="epochs"):
        train_and_evaluate(cfg.replace(epochs=5), tmp_path, data=data, progress=False)


@pytest.mark.slow
def test_nan_in_data_stops_cleanly_with_last_good_checkpoint(tmp_path):
    from _train_worker import CONFIG

    wd = tmp_path / "run"
    killed = _worker(wd, tmp_path / "unused.npz", extra=("--kill-after-epoch", "1"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    # Resume the same run on data with a NaN injected (every slice's normalisation is NaN).
    bad_train, val = blob_train_val()
    bad_train.std[:] = np.nan
    with pytest.raises(
        NonFiniteLossError, match=r"step 4 \(epoch 1\).*last good checkpoint is step 4"
    ):
        train_and_evaluate(CONFIG, wd, data=(bad_train, val), progress=False)
    ck = TrainCheckpoints(wd)
    assert ck.latest.latest_step() == 4
    ck.close()
    model, config, meta = load_model(wd, step=4)
    assert config == CONFIG and meta["step"] == 4
    from flax import nnx

    assert all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(nnx.state(model))
    )


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    # Evaluate (and so checkpoint) only every 2 epochs; Ctrl-C at the end of epoch 1 (step 4)
    # must save step 4 itself before the exception propagates.
    cfg = tiny_config("int", epochs=2, eval_every_epochs=2, log_every_steps=1, seed=2)
    data = blob_train_val()

    def interrupt(epoch, _):
        if epoch == 1:  # SIGTERM (what schedulers send) is a stop request, as Ctrl-C is
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, tmp_path, data=data, progress=False, on_epoch_end=interrupt)
    ck = TrainCheckpoints(tmp_path)
    assert ck.latest.latest_step() == 4
    ck.close()
    summary = train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    assert summary["step"] == 8
    assert [r["step"] for r in _records(tmp_path, "train")] == list(range(1, 9))


@pytest.mark.slow
def test_streaming_path_trains_like_the_resident_one(tmp_path):
    # A device-memory budget smaller than the data switches to grain streaming; the batches are
    # the same, only normalisation/augmentation is compiled separately (float rounding), so the
    # losses agree to 1e-4 relative over one epoch.
    cfg = tiny_config("s", epochs=1, log_every_steps=1, seed=4)
    data = blob_train_val()
    train_and_evaluate(cfg, tmp_path / "resident", data=data, progress=False)
    train_and_evaluate(
        cfg.replace(device_memory_budget_gb=1e-6), tmp_path / "stream", data=data, progress=False
    )
    a = [r["loss"] for r in _records(tmp_path / "resident", "train")]
    b = [r["loss"] for r in _records(tmp_path / "stream", "train")]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # Each run took the path its budget asks for (were the switch to stop switching, both
    # would train resident and the losses above would still agree).
    assert _records(tmp_path / "resident", "summary")[-1]["path"]["input"] == "resident"
    assert _records(tmp_path / "stream", "summary")[-1]["path"] == {
        "input": "streaming",
        "epoch_loop": "host",
        "pack_mode": None,
    }


@pytest.mark.slow
def test_an_evaluation_a_kill_lost_from_the_log_is_logged_again_on_resume(tmp_path):
    # The evaluation's record rides in the `latest` checkpoint's meta; a kill after the
    # checkpoint but before the log line (it is written on the epoch-end thread) must not lose
    # it. Simulated by deleting the last evaluation (and the summary) from the log.
    cfg = tiny_config("lost", epochs=2, log_every_steps=4, seed=6)
    data = blob_train_val()
    first = train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    path = tmp_path / "metrics.jsonl"
    evals = _records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    kept = [
        ln
        for ln in path.read_text().splitlines()
        if json.loads(ln)["type"] == "train" or json.loads(ln) == evals[0]
    ]
    path.write_text("".join(ln + "\n" for ln in kept))
    again = train_and_evaluate(cfg, tmp_path, data=data, progress=False)
    assert _records(tmp_path, "eval") == evals
    assert again["val_dsc"] == first["val_dsc"] and again["best_val_dsc"] == first["best_val_dsc"]


@pytest.mark.slow
def test_device_and_host_epoch_loops_log_the_same_run(tmp_path):
    # The training loop with one dispatch per epoch (the accelerators' default) and with one
    # per step (the CPU's): the same log lines, the losses equal up to float rounding (two
    # programs: bounds in tests/_checks.py), the evaluations close.
    cfg = tiny_config("loops", epochs=2, log_every_steps=1, seed=7)
    data = blob_train_val()
    runs = {}
    for loop in ("device", "host"):
        train_and_evaluate(cfg.replace(epoch_loop=loop), tmp_path / loop, data=data, progress=False)
        runs[loop] = (_records(tmp_path / loop, "train"), _records(tmp_path / loop, "eval"))
        # The loop asked for is the loop taken (both logs would match if one path ran twice).
        assert _records(tmp_path / loop, "summary")[-1]["path"]["epoch_loop"] == loop
    (dev_train, dev_eval), (host_train, host_eval) = runs["device"], runs["host"]
    assert [r["step"] for r in dev_train] == [r["step"] for r in host_train] == list(range(1, 9))
    assert_same_training([r["loss"] for r in dev_train], [r["loss"] for r in host_train])
    assert [r["step"] for r in dev_eval] == [r["step"] for r in host_eval] == [4, 8]
    np.testing.assert_allclose(
        [r["val_dsc"] for r in dev_eval], [r["val_dsc"] for r in host_eval], atol=1e-3
    )
    with pytest.raises(ValueError, match="epoch_loop"):  # refused when the config is built
        cfg.replace(epoch_loop="gpu")


def _param_leaves(workdir):
    from unet_jax.model import model_to_pure

    model, _, meta = load_model(workdir)
    return jax.tree.leaves(model_to_pure(model)), meta


def test_packed_runs_train_as_the_lone_runs_and_keep_their_own_folders(tmp_path):
    # Two seeds trained side by side in one program (pack_mode="unroll", the CPU's default)
    # against each seed trained alone: the same log lines and best marks, losses and final
    # parameters equal up to float rounding (two programs: bounds in tests/_checks.py; bitwise
    # on the Intel and AMD CPUs measured, which XLA does not promise), each run in its own
    # folder with its own summary.
    from unet_jax.train import train_runs

    cfg = tiny_config("pack", epochs=2, log_every_steps=1, pack_mode="unroll")
    configs = [cfg.replace(name=f"pack-s{s}", seed=s) for s in (3, 4)]
    data = blob_train_val()
    packed = train_runs(configs, [tmp_path / "p3", tmp_path / "p4"], data=data, progress=False)
    for c, name, summary in zip(configs, ("3", "4"), packed):
        alone = train_and_evaluate(c, tmp_path / f"a{name}", data=data, progress=False)
        for kind in ("train", "eval"):
            a = _records(tmp_path / f"p{name}", kind)
            b = _records(tmp_path / f"a{name}", kind)
            assert [(r["step"], r.get("best")) for r in a] == [
                (r["step"], r.get("best")) for r in b
            ]
            assert len(a) == (8 if kind == "train" else 2)
        a, b = _records(tmp_path / f"p{name}", "train"), _records(tmp_path / f"a{name}", "train")
        pa, _ = _param_leaves(tmp_path / f"p{name}")
        pb, _ = _param_leaves(tmp_path / f"a{name}")
        assert_same_training([r["loss"] for r in a], [r["loss"] for r in b], pa, pb)
        a, b = _records(tmp_path / f"p{name}", "eval"), _records(tmp_path / f"a{name}", "eval")
        np.testing.assert_allclose([r["val_dsc"] for r in a], [r["val_dsc"] for r in b], atol=1e-3)
        assert json.loads((tmp_path / f"p{name}" / "config.json").read_text())["seed"] == c.seed
        assert summary["packed_runs"] == 2 and summary["step"] == 8
        assert summary["path"] == {"input": "resident", "epoch_loop": "host", "pack_mode": "unroll"}
        assert summary["best_val_dsc"] == pytest.approx(alone["best_val_dsc"], abs=1e-3)
    # The seeds really differ (the test above would pass trivially if both ran one seed).
    assert (
        _records(tmp_path / "p3", "train")[0]["loss"]
        != _records(tmp_path / "p4", "train")[0]["loss"]
    )
    # Only seeds may differ between packed runs.
    with pytest.raises(ValueError, match="differ only in name, seed and execution-only"):
        train_runs(
            [configs[0], configs[1].replace(learning_rate=1e-3)],
            [tmp_path / "x", tmp_path / "y"],
            data=data,
        )


def test_diverged_parameters_are_never_called_a_good_checkpoint(tmp_path):
    # Issue: with an absurd learning rate the message named a checkpoint whose parameters
    # reached 5e28 (predict from it: empty masks). Now a checkpoint is saved only when every
    # parameter is finite and within PARAM_LIMIT; the error names the last good one, and it is.
    from unet_jax.model import model_to_pure
    from unet_jax.run_state import PARAM_LIMIT
    from unet_jax.train import DivergedError

    cfg = tiny_config(
        "diverge", epochs=2, warmup_epochs=1, schedule="constant", checkpoint_every_steps=1,
        log_every_steps=1, seed=8,
    ).replace(learning_rate=1e30)  # fmt: skip
    with pytest.raises(DivergedError) as info:
        train_and_evaluate(cfg, tmp_path, data=blob_train_val(), progress=False)
    message = str(info.value)
    assert "\n" not in message and "last good checkpoint is step" in message
    good = int(message.split("last good checkpoint is step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir())
    assert steps and steps[-1] == good
    for step in steps:
        model, _, _ = load_model(tmp_path, step=step)
        leaves = [np.asarray(x) for x in jax.tree.leaves(model_to_pure(model))]
        assert all(np.isfinite(x).all() and np.abs(x).max() <= PARAM_LIMIT for x in leaves)


@pytest.mark.slow
def test_output_that_is_not_a_terminal_gets_a_line_per_evaluated_epoch(
    tmp_path, capsys, monkeypatch
):
    # Issue: with stdout not a terminal (nohup, a scheduler, CI, a notebook) the progress bar is
    # off and nothing was printed per epoch. The default output (the CLI's) there: one line per
    # evaluated epoch once its evaluation is complete (epoch, step, the epoch's mean train loss,
    # val DSC, best so far, images/s, elapsed, ETA) and heartbeat lines within epochs (every
    # step here: the interval shortened to 0 s). Epochs 2 and 3 of 3 are evaluated.
    import re

    from unet_jax import progress

    monkeypatch.setattr(progress, "_output_is_terminal", lambda: False)
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    cfg = tiny_config("lines", epochs=3, eval_every_epochs=2, log_every_steps=1, seed=11)
    train_and_evaluate(cfg, tmp_path, data=blob_train_val())
    out, err = capsys.readouterr()
    assert "\r" not in err and "\x1b" not in err  # no bar
    lines = out.splitlines()
    epoch = re.compile(
        r"lines: epoch (\d)/3, step (\d+)/12: train loss (\d\.\d{4}), val DSC (\d\.\d{4}), "
        r"best (\d\.\d{4})( \(this epoch\))?, (\d+\.\d) images/s, elapsed \d:\d\d:\d\d, "
        r"ETA \d:\d\d:\d\d"
    )
    found = [m for m in map(epoch.fullmatch, lines) if m]
    evals = _records(tmp_path, "eval")
    assert [int(m[1]) for m in found] == [r["epoch"] for r in evals] == [2, 3]
    train_lines = _records(tmp_path, "train")
    best = 0.0
    for m, record in zip(found, evals):
        assert int(m[2]) == record["step"]
        epoch_losses = [
            r["loss"] for r in train_lines if record["step"] - 4 < r["step"] <= record["step"]
        ]
        assert float(m[3]) == pytest.approx(np.mean(epoch_losses), abs=5.1e-5)
        assert m[4] == f"{record['val_dsc']:.4f}"
        best = max(best, record["val_dsc"])
        assert m[5] == f"{best:.4f}" and bool(m[6]) == record["best"]
    heartbeat = re.compile(
        r"lines: epoch (\d)/3 in progress, step (\d+)/12: train loss (\d\.\d{4}|\?) \(last "
        r"fetched\), (\d+\.\d|\?) images/s, elapsed \d:\d\d:\d\d, ETA (\d:\d\d:\d\d|\?)"
    )
    beats = [m for m in map(heartbeat.fullmatch, lines) if m]
    assert [int(m[2]) for m in beats] == list(range(1, 13))
    assert [int(m[1]) for m in beats] == [1] * 4 + [2] * 4 + [3] * 4
    assert lines[-1].startswith("done: lines: 12 steps")
    assert len(lines) == len(found) + len(beats) + 1  # nothing else

    # progress=False (the tests' setting) prints nothing per epoch.
    train_and_evaluate(cfg, tmp_path / "quiet", data=blob_train_val(), progress=False)
    assert [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("done:")] == []


def _interrupt_after(monkeypatch, cls, calls):
    """SIGINT (Ctrl-C) once ``cls.train_step`` has run ``calls`` times."""
    original = cls.train_step
    count = [0]

    def train_step(self):
        out = original(self)
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(cls, "train_step", train_step)


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_resumes_with_the_log_lines_of_the_uninterrupted_run(
    tmp_path, monkeypatch
):
    # Issue: a run stopped by SIGINT logged an extra train line at the step where it stopped
    # (single and packed runs), so the resumed run's log was not the uninterrupted run's.
    # Steps 3, 4, 6 and 8 are logged (every 3rd and each epoch's last); Ctrl-C after step 5.
    from unet_jax.train import train_runs
    from unet_jax.train_steps import PackedTrainer, Trainer

    cfg = tiny_config("stop", epochs=2, log_every_steps=3, seed=9, pack_mode="unroll")
    data = blob_train_val()
    train_and_evaluate(cfg, tmp_path / "straight", data=data, progress=False)
    straight = _records(tmp_path / "straight", "train")
    assert [r["step"] for r in straight] == [3, 4, 6, 8]

    with monkeypatch.context() as m:
        _interrupt_after(m, Trainer, 5)
        with pytest.raises(KeyboardInterrupt):
            train_and_evaluate(cfg, tmp_path / "single", data=data, progress=False)
    assert [r["step"] for r in _records(tmp_path / "single", "train")] == [3, 4]
    train_and_evaluate(cfg, tmp_path / "single", data=data, progress=False)
    resumed = _records(tmp_path / "single", "train")
    assert [r["step"] for r in resumed] == [3, 4, 6, 8]
    assert_same_training([r["loss"] for r in resumed], [r["loss"] for r in straight])
    assert [r["step"] for r in _records(tmp_path / "single", "eval")] == [4, 8]

    configs = [cfg, cfg.replace(name="stop-s10", seed=10)]
    dirs = [tmp_path / "p9", tmp_path / "p10"]
    with monkeypatch.context() as m:
        _interrupt_after(m, PackedTrainer, 5)
        with pytest.raises(KeyboardInterrupt):
            train_runs(configs, dirs, data=data, progress=False)
    for d in dirs:
        assert [r["step"] for r in _records(d, "train")] == [3, 4]
        ck = TrainCheckpoints(d)
        assert ck.latest.latest_step() == 5
        ck.close()
    train_runs(configs, dirs, data=data, progress=False)
    for d in dirs:
        assert [r["step"] for r in _records(d, "train")] == [3, 4, 6, 8]
    packed = [r["loss"] for r in _records(dirs[0], "train")]
    assert_same_training(packed, [r["loss"] for r in straight])  # seed 9 alone and packed


@pytest.mark.slow
def test_loading_a_checkpoint_logs_no_read_only_notes(straight_run, caplog):
    # Loading a checkpoint made Orbax log four `WARNING:absl:... read_only ...` notes (and one
    # "Metadata file does not exist" per item restored alone). They are dropped where they arise
    # (an absl filter of unet_jax.checkpoint); other absl warnings still come through, whatever
    # ran before in this process (no command sets the absl logger's level).
    import logging

    with caplog.at_level(logging.WARNING):
        load_model(straight_run[0])
        load_model(straight_run[0], step=4)
        logging.getLogger("absl").warning("another warning")
    assert "read only" not in caplog.text and "read_only" not in caplog.text, caplog.text
    assert "does not exist" not in caplog.text, caplog.text  # a step's item restored alone
    assert "another warning" in caplog.text
