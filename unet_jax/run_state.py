"""A run's saved state, in one owner: what a checkpoint holds, what a resume restores.

:class:`RunState` is the only holder of the best validation DSC so far and of the latest
evaluation's record. It restores a run (the trainer's state, the log brought back to the
checkpoint, the best-so-far and the latest evaluation as of that checkpoint), saves ``latest``
(with the latest evaluation in its meta) and saves ``best``, refusing to save diverged
parameters. The Orbax side (managers, layout, damaged steps) is
:class:`unet_jax.checkpoint.TrainCheckpoints`; the background thread that calls the saves at an
epoch's end is :mod:`unet_jax.epoch_end`.

What a ``latest`` checkpoint's meta holds, and why a resume is exact with it:

* ``epoch``: for people reading the folder.
* ``best_metric``: the best DSC as of this step. A ``best`` written after the ``latest`` a run
  resumes from (a kill between the two saves) is written again, identically, by the resumed
  run, because later evaluations are compared with this value, not with the files on disk.
* ``last_eval``: the latest evaluation's log record. The resumed run logs it again if a kill
  lost the line, and the run's summary reports it.

The data's PRNG key is not saved: it is derived from the config's seed, and the batches of a
step from that key and the step count that the optimiser state holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unet_jax import rundir
from unet_jax.checkpoint import BEST_METRIC, TrainCheckpoints
from unet_jax.config import Config

__all__ = ["PARAM_LIMIT", "DivergedError", "NonFiniteLossError", "RunState"]

#: Parameters larger than this in magnitude mean a diverged run, never saved as a checkpoint.
#: Adam moves a weight by at most about 3 learning rates per step and this U-Net starts with
#: weights below 1, so the baseline recipe (lr 1e-4, 24,000 steps) stays below 10, and even lr 1
#: over as many steps below 1e5.
PARAM_LIMIT = 1e6


class DivergedError(FloatingPointError):
    """Training diverged: a non-finite loss, or parameters that are not finite or beyond
    :data:`PARAM_LIMIT`. The message names the step and the last good checkpoint."""


class NonFiniteLossError(DivergedError):
    """The training loss became NaN or infinite; names the step and epoch."""


@jax.jit
def _size(tree: Any) -> tuple[jax.Array, jax.Array]:
    """``(every value is finite, the largest magnitude)`` of a pytree of float arrays. Finiteness
    is its own reduction: XLA's CPU max over a large array can skip a NaN (measured with jax
    0.10.2 and 0.12: a (3, 3, 32, 64) array of ones and one NaN has max 1.0)."""
    leaves = jax.tree.leaves(tree)
    finite = jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()
    return finite, jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))


class RunState:
    """One run's checkpoints, best validation DSC so far and latest evaluation.

    ``trainer`` (a :class:`unet_jax.train_steps.Trainer`) converts its training state to and
    from what checkpoints hold; ``log`` is the run's :class:`unet_jax.rundir.RunLog`.
    Saves may come from the epoch-end thread; the main thread only saves once that thread is
    idle (the loop waits for it first), so the two never save at once.
    """

    def __init__(self, workdir: Path, trainer: Any, config: Config, log: rundir.RunLog):
        self.trainer, self.config, self.log = trainer, config, log
        self.checkpoints = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
        #: The best validation DSC as of the trainer's step (None before the first evaluation).
        self.best_metric: float | None = None
        #: The latest evaluation's log record (``{}`` before the first).
        self.last_eval: dict[str, Any] = {}

    def restore(self) -> bool:
        """Resume from the latest checkpoint, if any; returns whether there was one.

        The trainer gets its state; the log loses the lines written after that step (the run
        writes them again) and gets the checkpoint's evaluation back if a kill lost it. With no
        checkpoint the run starts at step 0: lines of a run killed before its first checkpoint
        go, and so does its best-so-far (its best files were not written with it).
        """
        trainer = self.trainer
        restored = self.checkpoints.restore_latest(trainer.model_state(), trainer.optimizer_state())
        if restored is None:
            self.log.truncate_after(0)
            self.best_metric, self.last_eval = None, {}
            return False
        model_state, optimizer_state, meta = restored
        trainer.load_state(model_state, optimizer_state)
        self.log.truncate_after(trainer.step)
        self.last_eval = meta.get("last_eval") or {}
        record = self.last_eval
        if record and not self.log.has(record["type"], record["step"]):
            self.log.write(record)
        best = meta.get("best_metric", self.checkpoints.best_metric())
        self.best_metric = None if best is None else float(best)
        return True

    def latest_step(self) -> int | None:
        """The step of the newest ``latest`` checkpoint."""
        return self.checkpoints.latest.latest_step()

    def is_better(self, metric: float) -> bool:
        """Whether ``metric`` beats the best so far (the first one always does)."""
        return self.best_metric is None or metric > self.best_metric

    def save_latest(
        self,
        steps_done: int,
        state: dict | None = None,
        *,
        evaluation: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        """Save ``state`` (default: the trainer's current one) as ``latest`` step ``steps_done``;
        ``evaluation``, the log record of that step's evaluation, becomes the latest one first
        (so that the checkpoint carries it)."""
        self._check(steps_done, state)
        if evaluation is not None:
            self.last_eval = evaluation
        trainer = self.trainer
        self.checkpoints.save_latest(
            steps_done,
            trainer.model_state(state),
            trainer.optimizer_state(state),
            self.config,
            self._meta(steps_done, extra),
        )

    def save_best(self, steps_done: int, state: dict, metric: float, **extra: Any) -> None:
        """Save ``state`` as ``best`` (model only) and make ``metric`` the best so far; its meta
        holds ``metrics`` (the evaluation's summary, or at least ``metric``), which a later
        process reads back."""
        self._check(steps_done, state)
        extra.setdefault("metrics", {BEST_METRIC: float(metric)})
        self.checkpoints.save_best(
            steps_done,
            self.trainer.model_state(state),
            self.config,
            self._meta(steps_done, extra),
            metric,
        )
        self.best_metric = float(metric)

    def close(self) -> None:
        self.checkpoints.close()

    def _meta(self, steps_done: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "epoch": steps_done / self.trainer.steps_per_epoch,
            "best_metric": self.best_metric,
            "last_eval": self.last_eval,
            **extra,
        }

    def _check(self, steps_done: int, state: dict | None) -> None:
        """Refuse to save diverged parameters (:class:`DivergedError`): a checkpoint is only
        called good when every parameter is finite and within :data:`PARAM_LIMIT`."""
        state = self.trainer.state if state is None else state
        finite, size = (float(v) for v in _size(state["params"]))
        if finite and size <= PARAM_LIMIT:
            return
        what = "are not finite" if not finite else f"reach {size:.1e}"
        raise DivergedError(
            f"the parameters at step {steps_done} {what} (limit {PARAM_LIMIT:.0e}): the run "
            f"diverged (learning_rate {self.config.learning_rate}) and that step was not saved. "
            f"The last good checkpoint is step {self.latest_step()} in "
            f"{self.checkpoints.root}."
        )
