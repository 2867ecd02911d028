"""The end of an evaluated epoch, off the training path, and what keeps resume exact.

While the device trains the next epoch, a worker thread (:class:`Background`) does the host side
of the epoch that ended (:class:`EpochEnd`): fetch the predictions dispatched on a copy of the
state, per-patient metrics and largest components, the ``best`` and ``latest`` checkpoints
(through :class:`unet_jax.run_state.RunState`, the owner of what a run saves), the log line and
the best epoch's files. ``on_epoch_end`` callbacks run once an epoch's work is complete
(:class:`EpochCallbacks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import evaluate, rundir
from unet_jax.input_pipeline import ResidentData
from unet_jax.run_state import RunState

__all__ = ["Background", "EpochCallbacks", "EpochEnd"]


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
        saved: RunState,
        log: rundir.RunLog,
        val: ResidentData,
        truth: np.ndarray,
        workdir: Path,
        is_main: bool,
    ):
        self.saved = saved
        self.log = log
        self.val = val
        self.truth = truth
        self.workdir = workdir
        self.is_main = is_main

    def __call__(self, steps_done: int, epoch: int, state: dict, dispatched: list) -> None:
        summary, rows, pred = evaluate.evaluate_dispatched(dispatched, self.val, self.truth)
        metric = summary["val_dsc"]
        is_best = self.saved.is_better(metric)
        if is_best:
            self.saved.save_best(steps_done, state, metric, metrics=summary)
        record = {"type": "eval", "step": steps_done, "epoch": epoch, **summary, "best": is_best}
        self.saved.save_latest(steps_done, state, evaluation=record, metrics=summary)
        self.log.write(record)
        if is_best and self.is_main:
            rundir.write_best(self.workdir, rows, evaluate.stored_predictions(self.val.data, pred))


class EpochCallbacks:
    """Calls ``on_epoch_end(epoch, last_eval)`` once the epoch's evaluation and checkpoint are
    complete: at once for an epoch without them, else when the background job is done (at the
    next epoch's end or when training ends), in epoch order."""

    def __init__(self, fn: Callable[[int, dict], None] | None, saved: RunState):
        self.fn = fn
        self.saved = saved
        self.waiting: list[int] = []

    def ended(self, epoch: int, complete: bool) -> None:
        self.waiting.append(epoch)
        if complete:
            self.run()

    def run(self) -> None:
        while self.waiting:
            epoch = self.waiting.pop(0)
            if self.fn is not None:
                self.fn(epoch, self.saved.last_eval)
