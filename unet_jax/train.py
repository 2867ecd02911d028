"""Training: ``train_and_evaluate``, the loop of a run: train, evaluate every epoch, checkpoint
with exact resume, log.

The loop reads as its steps: :func:`_train_runs` sets a training up (data, the path it takes:
:func:`execution_path`), :func:`_train_loop` steps the runs and ends their epochs, and each run's
side is a :class:`_Run`. Elsewhere: the jitted steps in :mod:`unet_jax.train_steps`; what a run saves
and restores in :mod:`unet_jax.run_state`; the end of an evaluated epoch (in the background,
overlapping the next epoch) in :mod:`unet_jax.epoch_end`; the train lines and progress in
:mod:`unet_jax.progress`; the run folder's files in :mod:`unet_jax.rundir`. The run's report is
not written here: the caller does (``experiments.run``), so training does not depend on the
reporting code.

Multi-host: call ``jax.distributed.initialize()`` before anything else (``experiments.run
--distributed`` does), and every process runs this same function on the same config and the
same workdir (a shared file system). Each process loads the (small) split and places it on the
global mesh; only process 0 writes the config, logs and the best epoch's files, and Orbax
coordinates the checkpoint writes (tests/test_train.py runs two local processes).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from unet_jax import evaluate, rundir
from unet_jax.checkpoint import latest_step
from unet_jax.compile_cache import compile_seconds
from unet_jax.config import Config, packable
from unet_jax.data import SplitData, load_data
from unet_jax.epoch_end import Background, EpochCallbacks, EpochEnd
from unet_jax.input_pipeline import (
    AugmentSpec,
    HostRecords,
    ResidentData,
    StreamingData,
    fits_on_device,
    make_mesh,
    validation_data,
)
from unet_jax.progress import Progress, StepLosses, progress_mode
from unet_jax.run_state import DivergedError, NonFiniteLossError, RunState
from unet_jax.rundir import ConfigMismatchError
from unet_jax.train_steps import PackedTrainer, Trainer, pack_mode

__all__ = [
    "ConfigMismatchError",  # defined in rundir; re-exported because train_and_evaluate raises it
    "DivergedError",  # defined in run_state; likewise
    "NonFiniteLossError",  # likewise
    "execution_path",
    "packable",  # defined in config; re-exported for train_runs' callers
    "train_and_evaluate",
    "train_runs",
]


def train_and_evaluate(
    config: Config,
    workdir: str | Path,
    *,
    data: tuple[SplitData, SplitData] | Callable[[], tuple[SplitData, SplitData]] | None = None,
    restart: bool = False,
    progress: bool | str | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it holds a run), evaluate every epoch,
    checkpoint, log; returns the final summary.

    Args:
      config: the run's settings.
      workdir: the run folder (its files: :mod:`unet_jax.rundir`). The report is not
        written here: ``unet_jax.report.write_report(workdir)`` makes it from these files.
      data: ``(train, validation)`` splits, or a callable returning them (called once the
        workdir is prepared, e.g. one that builds the data set first); default: read from the
        built data set as ``config`` says (:func:`unet_jax.data.load_data`).
      restart: delete an existing run in ``workdir`` instead of resuming it.
      progress: what to show while training (process 0): ``None`` (the default) a progress
        bar when stderr is a terminal, else plain lines on stdout (one per evaluated epoch, a
        heartbeat within long epochs: :class:`_Progress`); ``True`` or ``"bar"`` the bar,
        ``"lines"`` the lines, ``False`` nothing.
      on_epoch_end: called as ``on_epoch_end(epoch, last_eval)`` once an epoch's evaluation and
        checkpoint are complete (they run in the background while the next epoch trains, so
        the call for an evaluated epoch comes at the next epoch's end, or when training ends).

    On Ctrl-C (KeyboardInterrupt) the pending evaluation is finished and the state reached is
    saved as ``latest`` before the exception propagates; a whole-epoch dispatch completes first,
    so the checkpoint is at most one epoch later than the moment of the interrupt.
    """
    return train_runs(
        [config],
        [workdir],
        data=data,
        restart=restart,
        progress=progress,
        on_epoch_end=on_epoch_end,
    )[0]


def train_runs(
    configs: list[Config],
    workdirs: list[str | Path],
    *,
    data: tuple[SplitData, SplitData] | Callable[[], tuple[SplitData, SplitData]] | None = None,
    restart: bool = False,
    progress: bool | str | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Train several runs that differ only in their seed side by side in one program (packed
    runs, :class:`unet_jax.train_steps.PackedTrainer`); one config is :func:`train_and_evaluate`.

    Every run has its own workdir, log, checkpoints, evaluations and summary, exactly as when
    trained alone (``config.pack_mode``: ``unroll`` computes the lone runs (to float rounding),
    ``vmap`` fills an accelerator); ``data`` is shared (it must not depend on the seed). Runs
    resumed from checkpoints at different steps (an interrupt between their saves) continue
    one after another. ``on_epoch_end`` is called for every run's epochs. A non-finite loss in
    any run stops all of them (each keeps its last checkpoint; resume the others alone).
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError(f"{len(configs)} configs for {len(workdirs)} workdirs")
    workdirs = [Path(w).absolute() for w in workdirs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError(f"packed runs need distinct workdirs, got {workdirs}")
    if not packable(configs):
        raise ValueError(
            "packed runs must differ only in name, seed and execution-only settings, and not in "
            f"seed on synthetic data (generated from the seed): {[c.name for c in configs]} do"
        )
    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        # One training process per workdir (process 0 of a multi-host run holds the lock).
        for w in workdirs:
            stack.enter_context(rundir.lock_workdir(w, enabled=is_main))
        return _train_runs(configs, workdirs, data, restart, progress, on_epoch_end)


class _StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers and ``kill`` send) during training: the first
    asks the loop to stop at its next safe point (between dispatches, where every run's state
    and log are consistent), which then raises KeyboardInterrupt: the pending evaluation
    finishes and ``latest`` is saved. A second signal raises at once. Installed in the main
    thread only (Python delivers signals there); elsewhere signals keep their handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping at the next step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for (called at safe points)."""
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(self.signum).name)


def _train_runs(configs, workdirs, data, restart, progress, on_epoch_end) -> list[dict[str, Any]]:
    """:func:`train_runs` with its workdirs locked: set up, train, summarise."""
    t_start, compile_start = time.perf_counter(), compile_seconds()
    config = configs[0]
    is_main = jax.process_index() == 0
    for c, w in zip(configs, workdirs):
        rundir.prepare_workdir(c, w, restart, write_config=is_main)
    if len(configs) > 1:
        steps = {latest_step(w) or 0 for w in workdirs}
        if len(steps) > 1:
            print(f"packed runs resume at different steps {sorted(steps)}: one after another")
            return [
                _train_runs([c], [w], data, False, progress, on_epoch_end)[0]
                for c, w in zip(configs, workdirs)
            ]
    if data is None:
        data = load_data(config)
    elif callable(data):
        data = data()
    train_split, val_split = data
    mesh = make_mesh()
    streaming = not fits_on_device(train_split, config.device_memory_budget_gb)
    path = execution_path(config, streaming=streaming, packed=len(configs) > 1)
    image_size = None if config.image_size == train_split.images.shape[1] else config.image_size
    aug = AugmentSpec(config.aug_scale, config.aug_angle, config.aug_flip, image_size)
    if streaming:
        if len(configs) > 1:
            raise ValueError("packed runs need the training data resident on the device")
        # Over the device-memory budget: the same batches, read by grain from host records.
        train = StreamingData(
            HostRecords(train_split), train_split, mesh, config.batch_size, config.sampling, aug
        )
        print(
            f"training data ({train_split.nbytes() / 2**30:.2f} GiB) exceeds the device-memory "
            f"budget of {config.device_memory_budget_gb} GiB: streaming it with grain"
        )
    else:
        train = ResidentData(train_split, mesh, config.batch_size, config.sampling, aug)
    val = validation_data(val_split, mesh, config.batch_size, config.sampling, image_size)
    trainers = [Trainer(c, train, mesh) for c in configs]
    total_steps = config.epochs * trainers[0].steps_per_epoch
    mode = progress_mode(progress)
    # One evaluation program for all runs (their eval graphs are the same).
    eval_steps = (
        evaluate.make_predict_step(trainers[0].apply_eval, val, config.threshold),
        evaluate.make_loss_step(trainers[0].apply_eval, trainers[0].loss_fn, val),
    )
    truth = evaluate.eval_truth(val)
    runs: list[_Run] = []
    try:
        for c, w, t in zip(configs, workdirs, trainers):
            runs.append(
                _Run(c, w, t, val, truth, is_main, total_steps, mode, on_epoch_end, t_start)
            )
        stepper = _stepper(trainers, path, train, total_steps)
        # Signals become stop requests once there is training to save (before, they stop
        # the data build or the setup at once, which loses nothing).
        with _StopRequests() as stop:
            _train_loop(runs, stepper, path, eval_steps, total_steps, stop)
    except BaseException:
        _for_each(runs, _Run.close)  # the first error is the one that propagates
        raise
    _for_each(runs, _Run.close, raise_first=True)

    seconds = {
        "total": round(time.perf_counter() - t_start, 3),
        "compile": round(compile_seconds() - compile_start, 3),
    }
    return [run.summary(seconds, len(runs), path) for run in runs]


def execution_path(config: Config, *, streaming: bool, packed: bool) -> dict[str, str | None]:
    """The path a training takes, with the ``"auto"`` settings resolved (here only): ``input``
    (``resident``: the data lives on the device; ``streaming``: over the device-memory budget,
    grain reads it from the host), ``epoch_loop`` (``device``: one dispatch per epoch, on the
    resident path without checkpoints within epochs; ``host``: step by step) and ``pack_mode``
    (``vmap`` or ``unroll`` for packed runs, else None). The run's summary records it."""
    if config.epoch_loop == "auto":
        device_loop = jax.default_backend() != "cpu"
    else:
        device_loop = config.epoch_loop == "device"
    whole_epochs = device_loop and not streaming and not config.checkpoint_every_steps
    return {
        "input": "streaming" if streaming else "resident",
        "epoch_loop": "device" if whole_epochs else "host",
        "pack_mode": pack_mode(config.pack_mode) if packed else None,
    }


class _Stepper(Protocol):
    """What the loop steps: every run's outputs (losses, gradient norm), one per run, for one
    step or stacked for ``num_steps`` steps in one dispatch."""

    def train_step(self) -> list[dict[str, jax.Array]]: ...

    def train_steps(self, num_steps: int) -> list[dict[str, jax.Array]]: ...


class _Lone:
    """One run on resident data."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def train_step(self) -> list[dict[str, jax.Array]]:
        return [self.trainer.train_step()]

    def train_steps(self, num_steps: int) -> list[dict[str, jax.Array]]:
        return [self.trainer.train_steps(num_steps)]


class _Streamed:
    """One run whose batches stream from the host, from its current step on (host loop only)."""

    def __init__(self, trainer: Trainer, train: StreamingData, total_steps: int):
        self.trainer = trainer
        self.batches = train.iterate(trainer.data_key, trainer.step, total_steps)

    def train_step(self) -> list[dict[str, jax.Array]]:
        return [self.trainer.train_step_on(*next(self.batches))]

    def train_steps(self, num_steps: int) -> list[dict[str, jax.Array]]:
        raise TypeError("streamed batches are stepped one by one (epoch_loop 'host')")


def _stepper(trainers: list[Trainer], path: dict, train: Any, total_steps: int) -> _Stepper:
    """The stepper for ``path`` (:func:`execution_path`), once the runs are restored."""
    if path["pack_mode"] is not None:
        return PackedTrainer(trainers, path["pack_mode"])
    if path["input"] == "streaming":
        return _Streamed(trainers[0], train, total_steps)
    return _Lone(trainers[0])


class _Run:
    """One run's side of the loop: its folder, log, saved state (restored on resume),
    background epoch ends, pending losses and progress."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        trainer: Trainer,
        val: ResidentData,
        truth: np.ndarray,
        is_main: bool,
        total_steps: int,
        progress: str | None,
        on_epoch_end: Callable[[int, dict], None] | None,
        started: float,
    ):
        self.config, self.workdir, self.trainer, self.is_main = config, workdir, trainer, is_main
        self.total_steps = total_steps
        self.log = rundir.RunLog(workdir, is_main)
        self.background = Background()
        self.saved = RunState(workdir, trainer, config, self.log)
        self.progress: Progress | None = None
        if self.saved.restore():
            print(
                f"resuming {workdir} at step {trainer.step} "
                f"(epoch {trainer.step // trainer.steps_per_epoch})"
            )
        self.trained = False  # whether this call trained any step (see summary)
        self.progress = Progress(
            progress if is_main else None,
            name=config.name,
            total=total_steps,
            initial=trainer.step,
            steps_per_epoch=trainer.steps_per_epoch,
            batch_size=config.batch_size,
            started=started,
        )
        self.epoch_end = EpochEnd(self.saved, self.log, val, truth, workdir, is_main)
        self.losses = StepLosses(config, trainer, self.log, self.progress, self.saved, workdir)
        self.callbacks = EpochCallbacks(on_epoch_end, self.saved)
        self.dispatch_s = 0.0  # main-thread time spent starting evaluations

    def settle(self) -> None:
        """Wait for the background epoch end, then fetch, log and check the pending losses: the
        last evaluation's line precedes the next train lines, and nothing is saved from the
        main thread while the background saves (raises on a non-finite loss)."""
        self.background.wait()
        self.losses.flush()

    def save_latest(self, steps_done: int) -> None:
        """A ``latest`` checkpoint of the current state, within an epoch (``checkpoint_every_steps``)."""
        self.settle()
        self.saved.save_latest(steps_done)

    def end_epoch(self, done: int, eval_steps: tuple[Callable, Callable]) -> None:
        """After the steps up to ``done``: log the losses (raising on a non-finite one), then
        start the evaluation and checkpoint of an evaluated epoch in the background."""
        config = self.config
        self.trained = True
        self.background.wait()
        self.callbacks.run()  # the epochs whose evaluation is complete, before a loss error
        self.settle()  # raises on a non-finite loss, before anything is saved
        epoch = done // self.trainer.steps_per_epoch
        ended = self.progress.epoch_ended(done, self.losses.epoch_loss())
        if epoch % config.eval_every_epochs == 0 or done == self.total_steps:
            # Dispatch the evaluation on a copy of the state, then hand the host work to the
            # background thread: the next epoch's training starts at once.
            t0, compile_before = time.perf_counter(), compile_seconds()
            state = self.trainer.snapshot()
            dispatched = evaluate.dispatch_predictions(
                eval_steps[0],
                (state["params"], state["batch_stats"]),
                self.epoch_end.val,
                eval_steps[1],
            )
            self.background.submit(self._epoch_end, done, epoch, state, dispatched, ended)
            # The first evaluation compiles its program: that counts as compile time.
            self.dispatch_s += time.perf_counter() - t0 - (compile_seconds() - compile_before)
        elif config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
            self.saved.save_latest(done)
        self.callbacks.ended(epoch, self.background.pending is None)

    def _epoch_end(
        self, done: int, epoch: int, state: dict, dispatched: list, ended: dict[str, Any]
    ) -> None:
        """The evaluated epoch's end (on the background thread), then its progress line."""
        self.epoch_end(done, epoch, state, dispatched)
        self.progress.evaluated(ended, self.saved.last_eval, self.saved.best_metric)

    def finish(self) -> None:
        """Training ended: wait for the last epoch end; save ``latest`` at the last step."""
        self.background.wait()
        self.callbacks.run()
        step = self.trainer.step
        if self.total_steps and self.saved.latest_step() != step == self.total_steps:
            self.saved.save_latest(step)

    def interrupted(self) -> None:
        """Ctrl-C between dispatches (the state is consistent): finish the pending evaluation
        and keep what was trained."""
        step = self.trainer.step
        try:
            self.background.wait()
            self.losses.flush()  # checks the losses; logs no line for where the run stopped
        finally:
            if self.saved.latest_step() != step:
                self.saved.save_latest(step, interrupted=True)
            print(
                f"\ninterrupted: saved a checkpoint of {self.workdir.name} at step {step}; "
                "run the same command again to resume"
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        try:
            self.background.close()  # the last epoch's files are complete before returning
        finally:
            self.saved.close()
            self.log.close()

    def summary(self, seconds: dict[str, float], packed: int, path: dict) -> dict[str, Any]:
        best = self.saved.best_metric
        last_eval = self.saved.last_eval
        summary = {
            "type": "summary",
            "step": self.trainer.step,
            "epochs": self.config.epochs,
            "best_val_dsc": best,
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
            # Where this call's time went (seconds): compile (tracing, lowering, compiling;
            # persistent-cache loads are fast), epoch_end_visible (main-thread time for
            # evaluations and checkpoints: starting them and waiting for them),
            # epoch_end_background (their work on the worker thread, overlapped with training).
            # Packed runs share total and compile.
            "seconds": {
                **seconds,
                "epoch_end_visible": round(self.dispatch_s + self.background.waited_s, 3),
                "epoch_end_background": round(self.background.busy_s, 3),
            },
            "path": path,  # the path this call's training took (execution_path)
        }
        if packed > 1:
            summary["packed_runs"] = packed
        previous = self.log.last("summary")
        if not self.trained and previous is not None and previous.get("step") == summary["step"]:
            # The command of a finished run, run again: its record stays as it was.
            summary = previous
        else:
            self.log.write(summary)
        if self.is_main:
            print(
                f"done: {self.config.name}: {self.trainer.step} steps, best validation DSC "
                f"{_rounded(best)}, last {_rounded(last_eval.get('val_dsc'))}"
                f" — {self.workdir}"
            )
        return summary


def _train_loop(
    runs: list[_Run],
    stepper: _Stepper,
    path: dict,
    eval_steps: tuple[Callable, Callable],
    total_steps: int,
    stop: _StopRequests,
) -> None:
    """Step every run to ``total_steps`` (together when packed), ending each epoch per run."""
    config = runs[0].config
    steps_per_epoch = runs[0].trainer.steps_per_epoch
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    step = runs[0].trainer.step
    try:
        while step < total_steps:
            stop.check()
            done = min(total_steps, (step // steps_per_epoch + 1) * steps_per_epoch)
            if path["epoch_loop"] == "device" and done - step == steps_per_epoch:
                for run, out in zip(runs, stepper.train_steps(steps_per_epoch)):
                    run.losses.add_stacked(step, out)
            else:  # step by step (also the rest of a partial epoch)
                for index in range(step, done):
                    _one_step(runs, stepper, index, config, stop, last=index + 1 == done)
            step = done
            for run in runs:
                run.end_epoch(done, eval_steps)
        for run in runs:
            run.finish()
    except KeyboardInterrupt:
        # A whole-epoch dispatch completes first: the checkpoint is at worst one epoch later.
        _for_each(runs, _Run.interrupted, raise_first=True)
        raise


def _one_step(
    runs: list[_Run],
    stepper: _Stepper,
    index: int,
    config: Config,
    stop: _StopRequests,
    last: bool,
) -> None:
    """Step ``index`` (0-based) on the host loop, with what falls due after it: a stop request
    (not after an epoch's last step: the epoch ends first), a flush of the losses every
    ``log_every_steps``, a ``latest`` checkpoint every ``checkpoint_every_steps``."""
    for run, out in zip(runs, stepper.train_step()):
        run.losses.add(index, out)
        run.progress.tick(index + 1, run.losses.last_loss)
    if last:
        return
    stop.check()
    every = config.checkpoint_every_steps
    if every and (index + 1) % every == 0:
        for run in runs:
            run.save_latest(index + 1)
    elif len(runs[0].losses) >= config.log_every_steps:
        for run in runs:
            run.settle()


def _rounded(value: float | None) -> float | None:
    """A DSC as the ``done:`` line shows it (4 decimals)."""
    return None if value is None else round(float(value), 4)


def _for_each(runs: list[_Run], method: Callable[[_Run], None], raise_first=False) -> None:
    """``method`` on every run even when one fails; then raise the first failure if asked."""
    errors = []
    for run in runs:
        try:
            method(run)
        except BaseException as e:
            errors.append(e)
    if errors and raise_first:
        raise errors[0]
