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

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unet_jax import evaluate, rundir
from unet_jax.checkpoint import TrainCheckpoints
from unet_jax.config import Config
from unet_jax.data import load_data
from unet_jax.epoch_end import Background, EpochCallbacks, EpochEnd, Saver, resume_log
from unet_jax.input_pipeline import (
    AugmentSpec,
    ResidentData,
    SplitData,
    StreamingData,
    fits_on_device,
    make_mesh,
)
from unet_jax.rundir import ConfigMismatchError
from unet_jax.trainer import Trainer

__all__ = [
    "ConfigMismatchError",  # defined in rundir; re-exported because train_and_evaluate raises it
    "NonFiniteLossError",
    "compile_seconds",
    "train_and_evaluate",
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


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; names the step and epoch."""


class _Progress:
    """tqdm progress bar with loss, images/s and ETA (quiet when not a terminal or in tests)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

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
        bar: _Progress,
        ckpts: TrainCheckpoints,
        workdir: Path,
    ):
        self.config = config
        self.trainer = trainer
        self.log = log
        self.bar = bar
        self.ckpts = ckpts
        self.workdir = workdir
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step index, outputs)
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

    def flush(self, steps_done: int | None = None) -> None:
        """Fetch the pending losses, log every ``log_every_steps``-th, each epoch's last and the
        one of step ``steps_done`` (where training stops), and raise
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
            if (
                (step + 1) % self.config.log_every_steps == 0
                or (step + 1) % steps_per_epoch == 0
                or step + 1 == steps_done
            ):
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
        self.bar.update(
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
    progress: bool | None = None,
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
      progress: show a progress bar (default: when stderr is a terminal).
      on_epoch_end: called as ``on_epoch_end(epoch, last_eval)`` once an epoch's evaluation and
        checkpoint are complete (they run in the background while the next epoch trains, so
        the call for an evaluated epoch comes at the next epoch's end, or when training ends).

    On Ctrl-C (KeyboardInterrupt) the pending evaluation is finished and the state reached is
    saved as ``latest`` before the exception propagates; a whole-epoch dispatch completes first,
    so the checkpoint is at most one epoch later than the moment of the interrupt.
    """
    t_start, compile_start = time.perf_counter(), compile_seconds()
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    rundir.prepare_workdir(config, workdir, restart, write_config=is_main)
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
    trainer = Trainer(config, train, mesh)
    log = rundir.RunLog(workdir, is_main)
    background = Background()
    ckpts = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
    steps_per_epoch = trainer.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    save = Saver(ckpts, trainer, config)

    restored = ckpts.restore_latest(trainer.model_state(), trainer.optimizer_state())
    if restored is not None:
        trainer.load_state(restored[0], restored[1])
        resume_log(log, ckpts, restored[2], trainer.step)
        print(
            f"resuming {workdir} at step {trainer.step} (epoch {trainer.step // steps_per_epoch})"
        )
    start = trainer.step
    if progress is None:
        progress = os.isatty(2)
    bar = _Progress(total_steps, start, progress and is_main)
    predict_step = evaluate.make_predict_step(trainer.apply_eval, val, config.threshold)
    epoch_end = EpochEnd(save, log, val, evaluate.eval_truth(val), workdir, is_main)
    if restored is not None:
        save.last_eval = restored[2].get("last_eval") or {}
    losses = _StepLosses(config, trainer, log, bar, ckpts, workdir)
    callbacks = EpochCallbacks(on_epoch_end, save)
    dispatch_s = 0.0  # main-thread time spent starting evaluations
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    # A whole epoch is one dispatch on the resident path (config.epoch_loop); steps one by one
    # when batches stream in, when checkpoints are asked for within epochs, and for the rest of
    # a partial epoch.
    whole_epochs = (
        _device_epoch_loop(config.epoch_loop)
        and streaming is None
        and not config.checkpoint_every_steps
    )

    try:
        batches = streaming.iterate(trainer.data_key, start, total_steps) if streaming else None
        step = start
        while step < total_steps:
            done = min(total_steps, (step // steps_per_epoch + 1) * steps_per_epoch)
            if whole_epochs and done - step == steps_per_epoch:
                losses.add_stacked(step, trainer.train_steps(steps_per_epoch))
                step = done
            else:
                for index in range(step, done):
                    if batches is None:
                        losses.add(index, trainer.train_step())
                    else:
                        losses.add(index, trainer.train_step_on(*next(batches)))
                    if len(losses) >= config.log_every_steps:
                        background.wait()  # the last evaluation's line first
                        losses.flush()
                    if (
                        config.checkpoint_every_steps
                        and (index + 1) % config.checkpoint_every_steps == 0
                        and index + 1 != done
                    ):
                        background.wait()
                        losses.flush(index + 1)
                        save.latest(index + 1)
                step = done
            background.wait()  # the last evaluation's line precedes this epoch's train lines
            callbacks.run()
            losses.flush(done)  # raises on a non-finite loss, before anything is saved
            epoch = done // steps_per_epoch
            if epoch % config.eval_every_epochs == 0 or done == total_steps:
                # Dispatch the evaluation on a copy of the state, then hand the host work to
                # the background thread: the next epoch's training starts at once.
                t0, compile_before = time.perf_counter(), compile_seconds()
                state = trainer.snapshot()
                dispatched = evaluate.dispatch_predictions(
                    predict_step, (state["params"], state["batch_stats"]), val
                )
                background.submit(epoch_end, done, epoch, state, dispatched)
                # The first evaluation compiles its program: that counts as compile time.
                dispatch_s += time.perf_counter() - t0 - (compile_seconds() - compile_before)
            elif config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
                save.latest(done)
            callbacks.ended(epoch, background.pending is None)
        background.wait()
        callbacks.run()
        if (
            total_steps
            and ckpts.latest.latest_step() != total_steps
            and trainer.step == total_steps
        ):
            save.latest(total_steps)
    except KeyboardInterrupt:
        # Between dispatches the state is consistent: finish the pending evaluation, keep what
        # was trained (a whole-epoch dispatch completes first: at worst one epoch later).
        try:
            background.wait()
            losses.flush(trainer.step)
        finally:
            if ckpts.latest.latest_step() != trainer.step:
                save.latest(trainer.step, interrupted=True)
            print(
                f"\ninterrupted: saved a checkpoint at step {trainer.step}; "
                "run the same command again to resume"
            )
        raise
    finally:
        bar.close()
        try:
            background.close()  # the last epoch's files are complete before the run returns
        finally:
            ckpts.close()
            log.close()

    best = ckpts.best_metric()
    last_eval = save.last_eval
    summary = {
        "type": "summary",
        "step": trainer.step,
        "epochs": config.epochs,
        "best_val_dsc": best,
        **{k: v for k, v in last_eval.items() if k.startswith("val_")},
        # Where this call's time went (seconds): compile (tracing, lowering, compiling;
        # persistent-cache loads are fast), epoch_end_visible (main-thread time for evaluations
        # and checkpoints: starting them and waiting for them), epoch_end_background (their
        # work on the worker thread, overlapped with training).
        "seconds": {
            "total": round(time.perf_counter() - t_start, 3),
            "compile": round(compile_seconds() - compile_start, 3),
            "epoch_end_visible": round(dispatch_s + background.waited_s, 3),
            "epoch_end_background": round(background.busy_s, 3),
        },
    }
    log.write(summary)
    if is_main:
        print(
            f"done: {config.name}: {trainer.step} steps, best validation DSC "
            f"{best if best is None else round(best, 4)}, last {last_eval.get('val_dsc')}"
            f" — {workdir}"
        )
    return summary


def _device_epoch_loop(setting: str) -> bool:
    """Whether ``Config.epoch_loop`` asks for one dispatch per epoch on this backend."""
    if setting not in ("auto", "device", "host"):
        raise ValueError(f"unknown epoch_loop {setting!r}; valid: auto, device, host")
    if setting == "auto":
        return jax.default_backend() != "cpu"
    return setting == "device"
