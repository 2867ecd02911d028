"""Training: a jitted, data-parallel train step over a device mesh, per-epoch evaluation,
Orbax checkpoints with exact resume, and logs.

One code path from 1 CPU to N accelerators: the train step is ``jax.jit``-ed over a 1-D mesh
with a ``data`` axis; the batch is sharded over it, the model and optimiser state are
replicated and donated. Because the batch is one global array, BatchNorm's mean and variance
span the global batch (XLA inserts the all-reduce) with no extra code — this is how the
"pmap-ready" requirement is met today: ``jit`` over a mesh is pmap's successor and scales the
same program from one device to a pod.

Multi-host: call ``jax.distributed.initialize()`` before anything else (``experiments.run
--distributed`` does), and every process runs this same function on the same config. Each
process loads the (small) split and places it on its own devices of the global mesh; only
process 0 writes the config, logs and the best epoch's files (through :mod:`unet_jax.rundir`), and
Orbax coordinates checkpoint writes. This is structured for but not tested here (one host only).

The run's report is not written here: the caller does (``experiments.run``), so training does not
depend on the reporting code.

Resume is exact: a step's batch and augmentation are pure functions of ``(seed, step)``, so a
run restored from the checkpoint of step ``k`` continues with exactly the batches it would have
seen.

Speed: on the resident path a whole epoch is one dispatch (``lax.scan`` of the step over the
device-resident data; the same PRNG stream, batches and updates as step-by-step calls), and the
host side of an evaluated epoch's end (fetching predictions, per-patient metrics and the largest
component, checkpoints, the best epoch's files) runs on a worker thread while the device trains
the next epoch; the evaluation itself is dispatched on a device copy of the state.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unet_jax import evaluate, rundir
from unet_jax.checkpoint import TrainCheckpoints, build_model
from unet_jax.config import Config
from unet_jax.data import load_data
from unet_jax.input_pipeline import (
    AugmentSpec,
    ResidentData,
    SplitData,
    StreamingData,
    fits_on_device,
    make_mesh,
    replicated,
)
from unet_jax.losses import get_loss
from unet_jax.model import load_pure, model_to_pure
from unet_jax.rundir import ConfigMismatchError

__all__ = [
    "ConfigMismatchError",  # defined in rundir; re-exported because train_and_evaluate raises it
    "NonFiniteLossError",
    "Trainer",
    "make_optimizer",
    "make_schedule",
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


# ----------------------------------------------------------------------------- optimiser


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule: constant or cosine, with optional linear warmup."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    lr = config.learning_rate
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr,
            lr,
            warmup,
            max(total, warmup + 1),
            end_value=lr * config.final_lr_fraction,
        )
    raise ValueError(f"unknown schedule {config.schedule!r}; valid: constant, cosine")


def make_optimizer(config: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``optax.adamw`` (decoupled weight decay; with 0 it is Adam), optional global-norm clip."""
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


# ----------------------------------------------------------------------------- state


class Trainer:
    """Model, optimiser and the jitted steps for one config and one data set.

    The training state is a dict pytree ``{"params", "batch_stats", "opt_state", "step"}``
    replicated over the mesh.
    """

    def __init__(self, config: Config, train: ResidentData | StreamingData, mesh):
        """``train``: resident data for :meth:`train_step`; streaming data only describes the
        sampler (its batches come through :meth:`train_step_on`)."""
        self.config = config
        self.data = train
        self.mesh = mesh
        self.steps_per_epoch = train.spec.steps_per_epoch
        model = build_model(config, seed=config.seed)
        model.train()
        self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        model.eval()
        self.eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.schedule = make_schedule(config, self.steps_per_epoch)
        self.tx = make_optimizer(config, self.schedule)
        self.loss_fn = get_loss(config.loss)
        state = {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }
        self.rep = replicated(mesh)
        self.state = jax.device_put(state, self.rep)
        key = jax.random.key(config.seed)
        self.data_key = jax.random.fold_in(key, 1)
        self._train_step = jax.jit(
            self._step, donate_argnums=(0,), out_shardings=(self.rep, self.rep)
        )
        self._batch_step = jax.jit(
            self._update, donate_argnums=(0,), out_shardings=(self.rep, self.rep)
        )
        # A whole epoch as one program: the same step body, looped on the device.
        self._steps_program = jax.jit(
            self._steps,
            static_argnums=(3,),
            donate_argnums=(0,),
            out_shardings=(self.rep, self.rep),
        )

    # -- pure functions -------------------------------------------------------------------
    def _step(self, state: dict, arrays: dict, key: jax.Array):
        x, y = self.data.train_batch(key, state["step"], arrays)
        return self._update(state, x, y)

    def _steps(self, state: dict, arrays: dict, key: jax.Array, num_steps: int):
        """``num_steps`` of :meth:`_step` as one ``lax.scan``; outputs stacked on axis 0."""

        def body(state, _):
            return self._step(state, arrays, key)

        return jax.lax.scan(body, state, None, length=num_steps)

    def _update(self, state: dict, x: jax.Array, y: jax.Array):
        """One optimiser step on the batch ``(x, y)``."""

        def loss_of(params):
            model = nnx.merge(self.graphdef, params, state["batch_stats"], copy=True)
            loss = self.loss_fn(model(x), y)
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def apply_eval(self, variables: tuple, images: jax.Array) -> jax.Array:
        """Eval-mode logits (running BatchNorm statistics)."""
        params, batch_stats = variables
        return nnx.merge(self.eval_graphdef, params, batch_stats, copy=True)(images)

    # -- state <-> checkpoint -------------------------------------------------------------
    def model_state(self, state: dict | None = None) -> dict:
        """Parameters and BatchNorm statistics as a plain nested dict (what checkpoints hold)."""
        state = self.state if state is None else state
        return model_to_pure(
            nnx.merge(self.eval_graphdef, state["params"], state["batch_stats"], copy=True)
        )

    def optimizer_state(self, state: dict | None = None) -> dict[str, Any]:
        """The optimiser state and the step counter (what resuming needs besides the model)."""
        state = self.state if state is None else state
        return {"opt_state": state["opt_state"], "step": state["step"]}

    @property
    def variables(self) -> tuple[Any, Any]:
        """``(params, batch_stats)``: the argument of :meth:`apply_eval`."""
        return self.state["params"], self.state["batch_stats"]

    def load_state(self, model_state: dict, optimizer_state: dict[str, Any]) -> None:
        """Replace the training state by :meth:`model_state` / :meth:`optimizer_state` dicts."""
        model = nnx.merge(
            self.eval_graphdef, self.state["params"], self.state["batch_stats"], copy=True
        )
        load_pure(model, model_state)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        state = {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": optimizer_state["opt_state"],
            "step": jnp.asarray(optimizer_state["step"], jnp.int32),
        }
        self.state = jax.device_put(state, self.rep)

    def train_step(self) -> dict[str, jax.Array]:
        """One step on the resident pipeline's batch (sampled and augmented inside the jit)."""
        if not isinstance(self.data, ResidentData):
            raise TypeError(
                "train_step needs resident data; streamed batches go through train_step_on"
            )
        self.state, out = self._train_step(self.state, self.data.arrays, self.data_key)
        return out

    def train_steps(self, num_steps: int) -> dict[str, jax.Array]:
        """``num_steps`` steps on the resident pipeline in one dispatch (a compiled loop over
        the device-resident data): the same batches and updates as as many :meth:`train_step`
        calls. Returns the outputs stacked, shape ``(num_steps,)`` each."""
        if not isinstance(self.data, ResidentData):
            raise TypeError("train_steps needs resident data")
        self.state, out = self._steps_program(
            self.state, self.data.arrays, self.data_key, num_steps
        )
        return out

    def snapshot(self) -> dict:
        """A device copy of the training state that later (donating) steps leave intact: what
        an evaluation and its checkpoint read while training goes on."""
        return jax.tree.map(jnp.copy, self.state)

    def train_step_on(self, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """One step on a given batch (the streaming path; benchmarks with data excluded)."""
        self.state, out = self._batch_step(self.state, x, y)
        return out

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ----------------------------------------------------------------------------- progress


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


class _Background:
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


class _Saver:
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

    def latest(self, steps_done: int, state: dict | None = None, **extra: Any) -> None:
        """Save ``state`` (default: the trainer's current one) as step ``steps_done``."""
        trainer = self.trainer
        self.ckpts.save_latest(
            steps_done,
            trainer.model_state(state),
            trainer.optimizer_state(state),
            self.config,
            self.meta(steps_done, extra),
        )

    def best(self, steps_done: int, state: dict, metric: float, **extra: Any) -> None:
        self.ckpts.save_best(
            steps_done,
            self.trainer.model_state(state),
            self.config,
            self.meta(steps_done, extra),
            metric,
        )


class _EpochEnd:
    """The host side of an evaluated epoch's end, run on the :class:`_Background` thread while
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
        saver: _Saver,
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
    background = _Background()
    ckpts = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
    steps_per_epoch = trainer.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    save = _Saver(ckpts, trainer, config)

    restored = ckpts.restore_latest(trainer.model_state(), trainer.optimizer_state())
    if restored is not None:
        trainer.load_state(restored[0], restored[1])
        _resume_log(log, ckpts, restored[2], trainer.step)
        print(
            f"resuming {workdir} at step {trainer.step} (epoch {trainer.step // steps_per_epoch})"
        )
    start = trainer.step
    if progress is None:
        progress = os.isatty(2)
    bar = _Progress(total_steps, start, progress and is_main)
    predict_step = evaluate.make_predict_step(trainer.apply_eval, val, config.threshold)
    epoch_end = _EpochEnd(save, log, val, evaluate.eval_truth(val), workdir, is_main)
    if restored is not None:
        save.last_eval = restored[2].get("last_eval") or {}
    losses = _StepLosses(config, trainer, log, bar, ckpts, workdir)
    callbacks = _EpochCallbacks(on_epoch_end, save)
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


class _EpochCallbacks:
    """Calls ``on_epoch_end(epoch, last_eval)`` once the epoch's evaluation and checkpoint are
    complete: at once for an epoch without them, else when the background job is done (at the
    next epoch's end or when training ends), in epoch order."""

    def __init__(self, fn: Callable[[int, dict], None] | None, saver: _Saver):
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


def _resume_log(log: rundir.RunLog, ckpts: TrainCheckpoints, meta: dict, step: int) -> None:
    """Bring the log and the best-so-far back to the checkpoint of ``step``: lines logged after
    it go (the resumed run logs them again), its evaluation is logged if a kill lost it, and
    later saves are compared with the best DSC as of that checkpoint."""
    log.truncate_after(step)
    record = meta.get("last_eval")
    if record and not log.has(record["type"], record["step"]):
        log.write(record)
    if "best_metric" in meta:
        ckpts.reset_best_metric(meta["best_metric"])
