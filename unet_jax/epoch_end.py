"""The end of an evaluated epoch, off the training path, and what keeps resume exact.

While the device trains the next epoch, a worker thread (:class:`Background`) does the host side
of the epoch that ended (:class:`EpochEnd`): fetch the predictions dispatched on a copy of the
state, per-patient metrics and largest components, the ``best`` and ``latest`` checkpoints
(:class:`Saver`), the log line and the best epoch's files. ``on_epoch_end`` callbacks run once an
epoch's work is complete (:class:`EpochCallbacks`); :func:`resume_log` brings the log and the
best-so-far back to the checkpoint a run resumes from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import evaluate, rundir
from unet_jax.checkpoint import TrainCheckpoints
from unet_jax.config import Config
from unet_jax.input_pipeline import ResidentData
from unet_jax.trainer import Trainer

__all__ = [
    "PARAM_LIMIT",
    "Background",
    "DivergedError",
    "EpochCallbacks",
    "EpochEnd",
    "Saver",
    "resume_log",
]

#: Parameters larger than this in magnitude mean a diverged run, never saved as a checkpoint.
#: Adam moves a weight by at most about 3 learning rates per step and this U-Net starts with
#: weights below 1, so the baseline recipe (lr 1e-4, 24,000 steps) stays below 10, and even lr 1
#: over as many steps below 1e5.
PARAM_LIMIT = 1e6


class DivergedError(FloatingPointError):
    """Training diverged: a non-finite loss, or parameters that are not finite or beyond
    :data:`PARAM_LIMIT`. The message names the step and the last good checkpoint."""


@jax.jit
def _max_abs(tree: Any) -> jax.Array:
    """The largest magnitude in a pytree of float arrays (NaN if any value is NaN)."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))


class Background:
    """One worker thread for the host side of epoch ends (evaluation metrics, largest
    component, checkpoints, the best epoch's files), so that it overlaps the next epoch's
    training on the device.

    At most one job is pending: a new one first waits for the last, so jobs finish in order, and
    :meth:`wait` (before the next log flush, before saving from the main thread, when training
    ends, also on errors and Ctrl-C) raises the job's error, if any. Every process of a
    multi-host run runs the jobs (Orbax saves are collective); only process 0 writes files.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet_jax_epoch_end")
        self.pending: Future | None = None
        self.busy_s = 0.0  # time the jobs took (on the worker thread)
        self.waited_s = 0.0  # time the main thread waited for them (their visible cost)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.wait()
        self.pending = self.pool.submit(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.busy_s += time.perf_counter() - t0

    def wait(self) -> None:
        if self.pending is not None:
            t0 = time.perf_counter()
            pending, self.pending = self.pending, None
            try:
                pending.result()
            finally:
                self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


class Saver:
    """Checkpoints of the run: ``latest`` (with the epoch, the data PRNG key and the best
    validation DSC so far in its meta: what an exact resume needs) and ``best``."""

    def __init__(self, ckpts: TrainCheckpoints, trainer: Trainer, config: Config):
        self.ckpts = ckpts
        self.trainer = trainer
        self.config = config
        #: The latest evaluation's log record (every ``latest`` carries it: a resume logs it
        #: again if a kill lost the line, and the run's summary reports it).
        self.last_eval: dict[str, Any] = {}

    def meta(self, steps_done: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "epoch": steps_done / self.trainer.steps_per_epoch,
            "rng_key": np.asarray(jax.random.key_data(self.trainer.data_key)).tolist(),
            "best_metric": self.ckpts.best_metric(),
            "last_eval": self.last_eval,
            **(extra or {}),
        }

    def check(self, steps_done: int, state: dict | None = None) -> None:
        """Refuse to save diverged parameters (:class:`DivergedError`): a checkpoint is only
        called good when every parameter is finite and within :data:`PARAM_LIMIT`."""
        state = self.trainer.state if state is None else state
        size = float(_max_abs(state["params"]))
        if math.isfinite(size) and size <= PARAM_LIMIT:
            return
        what = "are not finite" if not math.isfinite(size) else f"reach {size:.1e}"
        raise DivergedError(
            f"the parameters at step {steps_done} {what} (limit {PARAM_LIMIT:.0e}): the run "
            f"diverged (learning_rate {self.config.learning_rate}) and that step was not saved. "
            f"The last good checkpoint is step {self.ckpts.latest.latest_step()} in "
            f"{self.ckpts.root}."
        )

    def latest(self, steps_done: int, state: dict | None = None, **extra: Any) -> None:
        """Save ``state`` (default: the trainer's current one) as step ``steps_done``."""
        self.check(steps_done, state)
        trainer = self.trainer
        self.ckpts.save_latest(
            steps_done,
            trainer.model_state(state),
            trainer.optimizer_state(state),
            self.config,
            self.meta(steps_done, extra),
        )

    def best(self, steps_done: int, state: dict, metric: float, **extra: Any) -> None:
        self.check(steps_done, state)
        self.ckpts.save_best(
            steps_done,
            self.trainer.model_state(state),
            self.config,
            self.meta(steps_done, extra),
            metric,
        )


class EpochEnd:
    """The host side of an evaluated epoch's end, run on the :class:`Background` thread while
    the device trains the next epoch: fetch the predictions dispatched at the epoch end, compute
    the per-patient metrics, save ``best`` (when it is), then ``latest`` with the evaluation in
    its meta, then log the evaluation and write the best epoch's files.

    This order keeps resume exact whatever the moment of a kill: a ``latest`` checkpoint always
    carries its evaluation (a resume logs it if the log lost it), and a ``best`` written after
    the ``latest`` a run resumes from is written again, identically, by the resumed run (the
    best-so-far comes from ``latest``'s meta).
    """

    def __init__(
        self,
        saver: Saver,
        log: rundir.RunLog,
        val: ResidentData,
        truth: np.ndarray,
        workdir: Path,
        is_main: bool,
    ):
        self.saver = saver
        self.log = log
        self.val = val
        self.truth = truth
        self.workdir = workdir
        self.is_main = is_main

    def __call__(self, steps_done: int, epoch: int, state: dict, dispatched: list) -> None:
        summary, rows, pred = evaluate.evaluate_dispatched(dispatched, self.val, self.truth)
        metric = summary["val_dsc"]
        is_best = self.saver.ckpts.is_better(metric)
        if is_best:
            self.saver.best(steps_done, state, metric, metrics=summary)
        record = {"type": "eval", "step": steps_done, "epoch": epoch, **summary, "best": is_best}
        self.saver.last_eval = record
        self.saver.latest(steps_done, state, metrics=summary)
        self.log.write(record)
        if is_best and self.is_main:
            rundir.write_best(self.workdir, rows, evaluate.stored_predictions(self.val.data, pred))


class EpochCallbacks:
    """Calls ``on_epoch_end(epoch, last_eval)`` once the epoch's evaluation and checkpoint are
    complete: at once for an epoch without them, else when the background job is done (at the
    next epoch's end or when training ends), in epoch order."""

    def __init__(self, fn: Callable[[int, dict], None] | None, saver: Saver):
        self.fn = fn
        self.saver = saver
        self.waiting: list[int] = []

    def ended(self, epoch: int, complete: bool) -> None:
        self.waiting.append(epoch)
        if complete:
            self.run()

    def run(self) -> None:
        while self.waiting:
            epoch = self.waiting.pop(0)
            if self.fn is not None:
                self.fn(epoch, self.saver.last_eval)


def resume_log(log: rundir.RunLog, ckpts: TrainCheckpoints, meta: dict, step: int) -> None:
    """Bring the log and the best-so-far back to the checkpoint of ``step``: lines logged after
    it go (the resumed run logs them again), its evaluation is logged if a kill lost it, and
    later saves are compared with the best DSC as of that checkpoint."""
    log.truncate_after(step)
    record = meta.get("last_eval")
    if record and not log.has(record["type"], record["step"]):
        log.write(record)
    if "best_metric" in meta:
        ckpts.reset_best_metric(meta["best_metric"])
