"""Training: ``train_and_evaluate``, the loop of a run: train, evaluate every epoch, checkpoint
with exact resume, log.

The steps live in :mod:`unet_jax.trainer`, the end of an evaluated epoch (in the background,
overlapping the next epoch) in :mod:`unet_jax.epoch_end`, the run folder's files in
:mod:`unet_jax.rundir`. The run's report is not written here: the caller does
(``experiments.run``), so training does not depend on the reporting code.

Multi-host: call ``jax.distributed.initialize()`` before anything else (``experiments.run
--distributed`` does), and every process runs this same function on the same config and the
same workdir (a shared file system). Each process loads the (small) split and places it on the
global mesh; only process 0 writes the config, logs and the best epoch's files, and Orbax
coordinates the checkpoint writes (tests/test_train.py runs two local processes).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unet_jax import evaluate, rundir
from unet_jax.checkpoint import TrainCheckpoints, latest_step
from unet_jax.config import Config
from unet_jax.data import load_data
from unet_jax.epoch_end import (
    Background,
    DivergedError,
    EpochCallbacks,
    EpochEnd,
    Saver,
    resume_log,
)
from unet_jax.input_pipeline import (
    AugmentSpec,
    ResidentData,
    SplitData,
    StreamingData,
    fits_on_device,
    make_mesh,
)
from unet_jax.rundir import ConfigMismatchError
from unet_jax.trainer import PackedTrainer, Trainer

__all__ = [
    "ConfigMismatchError",  # defined in rundir; re-exported because train_and_evaluate raises it
    "DivergedError",  # defined in epoch_end; likewise
    "NonFiniteLossError",
    "compile_seconds",
    "packable",
    "train_and_evaluate",
    "train_runs",
]


_compile_seconds = [0.0]  # JAX's compile-time events, summed over the process
_listening = [False]


def _on_duration(name: str, seconds: float, **_: Any) -> None:
    if name.startswith("/jax/core/compile/"):
        _compile_seconds[0] += seconds


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling programs so far (a load
    from the persistent compilation cache counts only its tracing and lowering)."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
    return _compile_seconds[0]


class NonFiniteLossError(DivergedError):
    """The training loss became NaN or infinite; names the step and epoch."""


#: Seconds between heartbeat lines within an epoch when the output is not a terminal (see
#: :class:`_Progress`); read when a run checks, so a test can shorten it.
HEARTBEAT_SECONDS = 60.0


def _output_is_terminal() -> bool:
    """Whether stderr, where the progress bar draws, is a terminal."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, OSError, ValueError):  # a replaced or closed stream
        return False


def _duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """What a run shows while it trains (process 0 only).

    ``mode`` ``"bar"`` (the default on a terminal): a tqdm bar on stderr with the loss,
    images/s and ETA. ``"lines"`` (the default when stderr is not a terminal: a log file,
    nohup, a scheduler, CI, a notebook): plain lines on stdout, one per evaluated epoch once
    its evaluation is complete (epoch, step, the epoch's mean training loss, validation DSC, best
    so far, images/s, elapsed time, ETA) and, within epochs, a heartbeat line when none was
    printed for :data:`HEARTBEAT_SECONDS` (on the host loop, where steps go one by one; a
    whole-epoch dispatch is one step for it). ``None``: nothing (tests).

    Rates leave out compile time (JAX's compile events), so the first epoch's images/s and the
    ETA do not count the one-off compilation.
    """

    def __init__(
        self,
        mode: str | None,
        *,
        name: str,
        total: int,
        initial: int,
        steps_per_epoch: int,
        batch_size: int,
        started: float,
    ):
        self.mode, self.name, self.total = mode, name, total
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.started = started  # perf_counter() when the command's training call began
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0
            )
        now, compiled = time.perf_counter(), compile_seconds()
        # This call's training (for the ETA) and the current epoch (for its images/s).
        self.run_start = (now, compiled, initial)
        self.epoch_start = (now, compiled, initial)
        self.last_line = now

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def _rate(self, start: tuple[float, float, int], step: int, now: float) -> float | None:
        """Steps per second since ``start`` (compile time left out), or None before a step."""
        t0, compiled, step0 = start
        seconds = now - t0 - (compile_seconds() - compiled)
        if seconds <= 0:  # compiles on another thread overlapped this one's time
            seconds = now - t0
        return (step - step0) / seconds if step > step0 and seconds > 0 else None

    def _eta(self, step: int, now: float) -> float | None:
        """Seconds left after step ``step`` at this call's pace so far, or None before a step."""
        rate = self._rate(self.run_start, step, now)
        return (self.total - step) / rate if rate else None

    def _timing(self, now: float, eta: float | None) -> str:
        return (
            f"elapsed {_duration(now - self.started)}, ETA {'?' if eta is None else _duration(eta)}"
        )

    def _print(self, text: str) -> None:
        # One write per line: epoch lines come from the epoch-end thread.
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()  # a log file sees each line at once
        self.last_line = time.perf_counter()

    def tick(self, step: int, loss: float | None) -> None:
        """After step ``step`` within an epoch: a heartbeat line when one is due."""
        now = time.perf_counter()
        if self.mode != "lines" or now - self.last_line < HEARTBEAT_SECONDS:
            return
        epochs = -(-self.total // self.steps_per_epoch)
        rate = self._rate(self.epoch_start, step, now)
        images = "?" if rate is None else f"{rate * self.batch_size:.1f}"
        self._print(
            f"{self.name}: epoch {(step - 1) // self.steps_per_epoch + 1}/{epochs} in "
            f"progress, step {step}/{self.total}: train loss "
            f"{'?' if loss is None else f'{loss:.4f}'} (last fetched), {images} images/s, "
            f"{self._timing(now, self._eta(step, now))}"
        )

    def epoch_ended(self, done: int, loss: float | None) -> dict[str, Any]:
        """At an epoch's end (step ``done``, ``loss`` the epoch's mean training loss): the
        numbers of its line (:meth:`evaluated`), taken now: the line comes once the evaluation
        is complete, while the next epoch trains."""
        now = time.perf_counter()
        rate = self._rate(self.epoch_start, done, now)
        self.epoch_start = (now, compile_seconds(), done)
        return {
            "step": done,
            "loss": loss,
            "images_per_s": None if rate is None else rate * self.batch_size,
            "time": now,
            "eta": self._eta(done, now),
        }

    def evaluated(self, ended: dict[str, Any], record: dict[str, Any], best: float | None) -> None:
        """The line of an evaluated epoch (``ended`` from :meth:`epoch_ended`, ``record`` its
        evaluation's log record, ``best`` the best validation DSC so far)."""
        if self.mode != "lines":
            return
        now = time.perf_counter()
        step, epochs = ended["step"], -(-self.total // self.steps_per_epoch)
        loss, images, dsc = ended["loss"], ended["images_per_s"], record.get("val_dsc")
        best_text = "n/a" if best is None else f"{best:.4f}"
        if record.get("best"):
            best_text += " (this epoch)"
        eta = ended["eta"]
        self._print(
            f"{self.name}: epoch {step // self.steps_per_epoch}/{epochs}, step "
            f"{step}/{self.total}: train loss {'?' if loss is None else f'{loss:.4f}'}, val DSC "
            f"{'n/a' if dsc is None else f'{dsc:.4f}'}, best {best_text}, "
            f"{'?' if images is None else f'{images:.1f}'} images/s, "
            f"{self._timing(now, None if eta is None else max(0.0, eta - (now - ended['time'])))}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- main loop


class _HostRecords:
    """A split's examples as TFDS-like record dicts (random access), for the streaming path."""

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_examples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        v = self.split.volume[i]
        return {
            "image": self.split.images[i],
            "mask": self.split.masks[i],
            "channel_mean": self.split.mean[v],
            "channel_std": self.split.std[v],
        }


class _StepLosses:
    """The train steps' outputs not yet fetched from the device.

    Fetching every step would make the host wait for the device each step; instead the outputs
    are collected and fetched together (every ``log_every_steps`` steps and at each epoch's
    end), then logged and checked: the first non-finite loss stops the run.
    """

    def __init__(
        self,
        config: Config,
        trainer: Trainer,
        log: rundir.RunLog,
        progress: _Progress,
        ckpts: TrainCheckpoints,
        workdir: Path,
    ):
        self.config = config
        self.trainer = trainer
        self.log = log
        self.progress = progress
        self.ckpts = ckpts
        self.workdir = workdir
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step index, outputs)
        self.first_loss: float | None = None  # this call's first loss (the exploding check)
        self.warned = False
        self.last_loss: float | None = None  # the newest loss fetched (heartbeat lines)
        self.loss_sum, self.loss_count = 0.0, 0  # this epoch's losses fetched so far
        # Start of the throughput window and the steps run since (reset by each flush).
        self.window_start = time.perf_counter()
        self.window_steps = 0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, out: dict[str, jax.Array]) -> None:
        """Record the outputs of step index ``step`` (0-based: the step count before it)."""
        self.pending.append((step, out))
        self.window_steps += 1

    def add_stacked(self, first_step: int, outs: dict[str, jax.Array]) -> None:
        """Record the stacked outputs of :meth:`Trainer.train_steps` from step ``first_step``."""
        num = int(outs["loss"].shape[0])
        self.pending.append((first_step, outs))
        self.window_steps += num

    def logged(self, step: int) -> bool:
        """Whether the loss of step number ``step`` (1-based) gets a train line: every
        ``log_every_steps``-th step, each epoch's last and each ``checkpoint_every_steps``-th.
        Where a run stops (Ctrl-C) adds no line, so a resumed run logs the lines of the
        uninterrupted one."""
        config = self.config
        every = config.checkpoint_every_steps
        return (
            step % config.log_every_steps == 0
            or step % self.trainer.steps_per_epoch == 0
            or bool(every and step % every == 0)
        )

    def epoch_loss(self) -> float | None:
        """The mean training loss of the steps fetched since the last call (an epoch's)."""
        mean = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        return mean

    def flush(self) -> None:
        """Fetch the pending losses, log those of :meth:`logged` steps, and raise
        :class:`NonFiniteLossError` on the first non-finite one. The lines logged do not depend
        on when flushes happen (every few steps, or once per one-dispatch epoch)."""
        if not self.pending:
            return
        steps_per_epoch = self.trainer.steps_per_epoch
        fetched = jax.device_get([out for _, out in self.pending])
        # One (step, outputs) pair per step, whether it was fetched alone or stacked.
        steps, outs = [], []
        for (first, _), out in zip(self.pending, fetched):
            if np.ndim(out["loss"]) == 0:
                steps.append(first)
                outs.append(out)
                continue
            for i in range(len(out["loss"])):
                steps.append(first + i)
                outs.append({k: v[i] for k, v in out.items()})
        now = time.perf_counter()
        images_per_s = (
            self.window_steps * self.config.batch_size / max(now - self.window_start, 1e-9)
        )
        for step, out in zip(steps, outs):
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {step} "
                    f"(epoch {step // steps_per_epoch}); the run stopped without saving it. The "
                    f"last good checkpoint is step {self.ckpts.latest.latest_step()} in "
                    f"{self.workdir / rundir.CHECKPOINTS_DIRNAME}."
                )
            self.last_loss = loss
            self.loss_sum += loss
            self.loss_count += 1
            if self.first_loss is None:
                self.first_loss = loss
            elif not self.warned and loss > max(100 * self.first_loss, 10.0):
                # Finite but exploding (a Dice loss stays below 1; BCE can grow without bound).
                self.warned = True
                print(
                    f"warning: {self.workdir.name}: training loss {loss:.3g} at step {step + 1} "
                    f"is over 100x the first ({self.first_loss:.3g}): the run is diverging "
                    f"(learning_rate {self.config.learning_rate})",
                    file=sys.stderr,
                )
            if self.logged(step + 1):
                self.log.write(
                    {
                        "type": "train",
                        "step": step + 1,
                        "epoch": (step + 1) / steps_per_epoch,
                        "loss": loss,
                        "grad_norm": float(out["grad_norm"]),
                        "lr": float(self.trainer.schedule(step)),
                        "images_per_s": images_per_s,
                    }
                )
        self.progress.update(
            len(steps), loss=f"{float(outs[-1]['loss']):.4f}", img_s=f"{images_per_s:.1f}"
        )
        self.pending.clear()
        self.window_start, self.window_steps = now, 0


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


def packable(configs: list[Config]) -> bool:
    """Whether runs of these configs can share one program: the same config but for ``name``,
    ``seed`` and the packing settings."""
    ignored = ("name", "seed", "pack_runs", "pack_mode")
    keys = [{k: v for k, v in c.to_dict().items() if k not in ignored} for c in configs]
    return all(k == keys[0] for k in keys[1:])


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
    runs, :class:`unet_jax.trainer.PackedTrainer`); one config is :func:`train_and_evaluate`.

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
            "packed runs must differ only in name and seed: "
            f"{[c.name for c in configs]} differ in more"
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
    """:func:`train_runs` with its workdirs locked."""
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
    aug = AugmentSpec(
        config.aug_scale,
        config.aug_angle,
        config.aug_flip,
        None if config.image_size == train_split.images.shape[1] else config.image_size,
    )
    streaming = None
    if not fits_on_device(train_split, config.device_memory_budget_gb):
        if len(configs) > 1:
            raise ValueError("packed runs need the training data resident on the device")
        # Over the device-memory budget: the same batches, read by grain from host records.
        streaming = StreamingData(
            _HostRecords(train_split), train_split, mesh, config.batch_size, config.sampling, aug
        )
        print(
            f"training data ({train_split.nbytes() / 2**30:.2f} GiB) exceeds the device-memory "
            f"budget of {config.device_memory_budget_gb} GiB: streaming it with grain"
        )
    train = streaming or ResidentData(train_split, mesh, config.batch_size, config.sampling, aug)
    # Validation is evaluated in order from device memory (it is a tenth of the data).
    val = ResidentData(
        val_split, mesh, config.batch_size, config.sampling, AugmentSpec(0, 0, 0, aug.image_size)
    )
    trainers = [Trainer(c, train, mesh) for c in configs]
    stepper = PackedTrainer(trainers, config.pack_mode) if len(trainers) > 1 else None
    steps_per_epoch = trainers[0].steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    mode = _progress_mode(progress)
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
        # Signals become stop requests once there is training to save (before, they stop
        # the data build or the setup at once, which loses nothing).
        with _StopRequests() as stop:
            _train_loop(runs, stepper, streaming, eval_steps, total_steps, stop)
    except BaseException:
        _for_each(runs, _Run.close)  # the first error is the one that propagates
        raise
    _for_each(runs, _Run.close, raise_first=True)

    seconds = {
        "total": round(time.perf_counter() - t_start, 3),
        "compile": round(compile_seconds() - compile_start, 3),
    }
    return [run.summary(seconds, len(runs)) for run in runs]


class _Run:
    """One run's side of the loop: its folder, log, checkpoints (restored on resume),
    background epoch ends, pending losses and progress bar."""

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
        self.log = rundir.RunLog(workdir, is_main)
        self.background = Background()
        self.ckpts = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
        self.save = Saver(self.ckpts, trainer, config)
        self.progress: _Progress | None = None
        restored = self.ckpts.restore_latest(trainer.model_state(), trainer.optimizer_state())
        if restored is not None:
            trainer.load_state(restored[0], restored[1])
            resume_log(self.log, self.ckpts, restored[2], trainer.step)
            self.save.last_eval = restored[2].get("last_eval") or {}
            print(
                f"resuming {workdir} at step {trainer.step} "
                f"(epoch {trainer.step // trainer.steps_per_epoch})"
            )
        else:
            # No checkpoint: the run starts at step 0, so lines a run killed before its first
            # checkpoint logged go, and so does its best-so-far (its best files were not
            # written with it: the first evaluation must count as best again).
            resume_log(self.log, self.ckpts, {"best_metric": None}, 0)
        self.trained = False  # whether this call trained any step (see summary)
        self.progress = _Progress(
            progress if is_main else None,
            name=config.name,
            total=total_steps,
            initial=trainer.step,
            steps_per_epoch=trainer.steps_per_epoch,
            batch_size=config.batch_size,
            started=started,
        )
        self.epoch_end = EpochEnd(self.save, self.log, val, truth, workdir, is_main)
        self.losses = _StepLosses(config, trainer, self.log, self.progress, self.ckpts, workdir)
        self.callbacks = EpochCallbacks(on_epoch_end, self.save)
        self.dispatch_s = 0.0  # main-thread time spent starting evaluations

    def end_epoch(self, done: int, total_steps: int, eval_steps: tuple[Callable, Callable]) -> None:
        """After the steps up to ``done``: log the losses (raising on a non-finite one), then
        start the evaluation and checkpoint of an evaluated epoch in the background."""
        config = self.config
        self.trained = True
        self.background.wait()  # the last evaluation's line precedes this epoch's train lines
        self.callbacks.run()
        self.losses.flush()  # raises on a non-finite loss, before anything is saved
        epoch = done // self.trainer.steps_per_epoch
        ended = self.progress.epoch_ended(done, self.losses.epoch_loss())
        if epoch % config.eval_every_epochs == 0 or done == total_steps:
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
            self.save.latest(done)
        self.callbacks.ended(epoch, self.background.pending is None)

    def _epoch_end(
        self, done: int, epoch: int, state: dict, dispatched: list, ended: dict[str, Any]
    ) -> None:
        """The evaluated epoch's end (on the background thread), then its progress line."""
        self.epoch_end(done, epoch, state, dispatched)
        self.progress.evaluated(ended, self.save.last_eval, self.ckpts.best_metric())

    def finish(self, total_steps: int) -> None:
        """Training ended: wait for the last epoch end; save ``latest`` at the last step."""
        self.background.wait()
        self.callbacks.run()
        step = self.trainer.step
        if total_steps and self.ckpts.latest.latest_step() != total_steps and step == total_steps:
            self.save.latest(total_steps)

    def interrupted(self) -> None:
        """Ctrl-C between dispatches (the state is consistent): finish the pending evaluation
        and keep what was trained."""
        step = self.trainer.step
        try:
            self.background.wait()
            self.losses.flush()  # checks the losses; logs no line for where the run stopped
        finally:
            if self.ckpts.latest.latest_step() != step:
                self.save.latest(step, interrupted=True)
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
            self.ckpts.close()
            self.log.close()

    def summary(self, seconds: dict[str, float], packed: int) -> dict[str, Any]:
        best = self.ckpts.best_metric()
        last_eval = self.save.last_eval
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
    stepper: PackedTrainer | None,
    streaming: StreamingData | None,
    eval_steps: tuple[Callable, Callable],
    total_steps: int,
    stop: _StopRequests,
) -> None:
    """Step every run to ``total_steps`` (together when packed), ending each epoch per run."""
    first = runs[0]
    config, trainer = first.config, first.trainer
    steps_per_epoch = trainer.steps_per_epoch
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    # A whole epoch is one dispatch on the resident path (config.epoch_loop); steps one by one
    # when batches stream in, when checkpoints are asked for within epochs, and for the rest of
    # a partial epoch.
    whole_epochs = (
        _device_epoch_loop(config.epoch_loop)
        and streaming is None
        and not config.checkpoint_every_steps
    )
    start = trainer.step

    def one_step() -> list[dict[str, jax.Array]]:
        if stepper is not None:
            return stepper.train_step()
        if batches is not None:
            return [trainer.train_step_on(*next(batches))]
        return [trainer.train_step()]

    try:
        batches = streaming.iterate(trainer.data_key, start, total_steps) if streaming else None
        step = start
        while step < total_steps:
            stop.check()
            done = min(total_steps, (step // steps_per_epoch + 1) * steps_per_epoch)
            if whole_epochs and done - step == steps_per_epoch:
                outs = (
                    stepper.train_steps(steps_per_epoch)
                    if stepper is not None
                    else [trainer.train_steps(steps_per_epoch)]
                )
                for run, out in zip(runs, outs):
                    run.losses.add_stacked(step, out)
            else:
                for index in range(step, done):
                    for run, out in zip(runs, one_step()):
                        run.losses.add(index, out)
                        run.progress.tick(index + 1, run.losses.last_loss)
                    if index + 1 < done:
                        stop.check()  # after the epoch's last step, the epoch ends first
                    if len(first.losses) >= config.log_every_steps:
                        for run in runs:
                            run.background.wait()  # the last evaluation's line first
                            run.losses.flush()
                    if (
                        config.checkpoint_every_steps
                        and (index + 1) % config.checkpoint_every_steps == 0
                        and index + 1 != done
                    ):
                        for run in runs:
                            run.background.wait()
                            run.losses.flush()
                            run.save.latest(index + 1)
            step = done
            for run in runs:
                run.end_epoch(done, total_steps, eval_steps)
        for run in runs:
            run.finish(total_steps)
    except KeyboardInterrupt:
        # A whole-epoch dispatch completes first: the checkpoint is at worst one epoch later.
        _for_each(runs, _Run.interrupted, raise_first=True)
        raise


def _progress_mode(progress: bool | str | None) -> str | None:
    """``train_runs``'s ``progress`` as a :class:`_Progress` mode."""
    if progress is None:
        return "bar" if _output_is_terminal() else "lines"
    if progress in ("bar", "lines"):
        return progress
    if isinstance(progress, bool):
        return "bar" if progress else None
    raise ValueError(f"progress must be None, a bool, 'bar' or 'lines', got {progress!r}")


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


def _device_epoch_loop(setting: str) -> bool:
    """Whether ``Config.epoch_loop`` (validated with the config) asks for one dispatch per
    epoch on this backend."""
    if setting == "auto":
        return jax.default_backend() != "cpu"
    return setting == "device"
