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

    # -- pure functions -------------------------------------------------------------------
    def _step(self, state: dict, arrays: dict, key: jax.Array):
        x, y = self.data.train_batch(key, state["step"], arrays)
        return self._update(state, x, y)

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


class _BackgroundWriter:
    """Writes the best epoch's files (:func:`unet_jax.rundir.write_best`) on one thread, so training
    goes on while they are compressed (about a second at 256x256; a GPU epoch takes about as long).

    At most one write is pending: a new one first waits for the last, so files appear in order, and
    :meth:`wait` (called when training ends, also on errors) raises the writer's error, if any.
    """

    def __init__(self, enabled: bool):
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet_jax_writer")
            if enabled
            else None
        )
        self.pending: Future | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.pool is None:
            return
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


def _write_best(workdir: Path, rows: list[dict], split: SplitData, pred: np.ndarray) -> None:
    """The best evaluation's files; on the writer thread, so the LCC step runs there too."""
    rundir.write_best(workdir, rows, evaluate.stored_predictions(split, pred))


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

    def flush(self, steps_done: int) -> None:
        """Fetch the pending losses, log every ``log_every_steps``-th and the one of step
        ``steps_done``, and raise :class:`NonFiniteLossError` on the first non-finite one."""
        if not self.pending:
            return
        steps_per_epoch = self.trainer.steps_per_epoch
        outs = jax.device_get([out for _, out in self.pending])
        now = time.perf_counter()
        images_per_s = (
            self.window_steps * self.config.batch_size / max(now - self.window_start, 1e-9)
        )
        for (step, _), out in zip(self.pending, outs):
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {step} "
                    f"(epoch {step // steps_per_epoch}); the run stopped without saving it. The "
                    f"last good checkpoint is step {self.ckpts.latest.latest_step()} in "
                    f"{self.workdir / rundir.CHECKPOINTS_DIRNAME}."
                )
            if (step + 1) % self.config.log_every_steps == 0 or step + 1 == steps_done:
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
            len(self.pending), loss=f"{float(outs[-1]['loss']):.4f}", img_s=f"{images_per_s:.1f}"
        )
        self.pending.clear()
        self.window_start, self.window_steps = now, 0


class _Saver:
    """Saves the trainer's current state to the run's checkpoints, with the epoch and the data
    PRNG key in the meta (what a resume checks)."""

    def __init__(self, ckpts: TrainCheckpoints, trainer: Trainer, config: Config):
        self.ckpts = ckpts
        self.trainer = trainer
        self.config = config

    def __call__(
        self, steps_done: int, metric: float | None = None, meta: dict[str, Any] | None = None
    ) -> bool:
        """Save as step ``steps_done``; also as best when ``metric`` beats it. Returns is-best."""
        trainer = self.trainer
        return self.ckpts.save(
            steps_done,
            trainer.model_state(),
            trainer.optimizer_state(),
            self.config,
            {
                "epoch": steps_done / trainer.steps_per_epoch,
                "rng_key": np.asarray(jax.random.key_data(trainer.data_key)).tolist(),
                **(meta or {}),
            },
            metric,
        )


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
    """
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
    writer = _BackgroundWriter(is_main)
    ckpts = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
    steps_per_epoch = trainer.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch

    restored = ckpts.restore_latest(trainer.model_state(), trainer.optimizer_state())
    if restored is not None:
        trainer.load_state(restored[0], restored[1])
        log.truncate_after(trainer.step)
        print(
            f"resuming {workdir} at step {trainer.step} (epoch {trainer.step // steps_per_epoch})"
        )
    start = trainer.step
    if progress is None:
        progress = os.isatty(2)
    bar = _Progress(total_steps, start, progress and is_main)
    predict_step = evaluate.make_predict_step(trainer.apply_eval, val, config.threshold)
    val_truth = evaluate.eval_truth(val)  # once: the same masks every epoch
    last_eval: dict[str, Any] = {}
    losses = _StepLosses(config, trainer, log, bar, ckpts, workdir)
    save = _Saver(ckpts, trainer, config)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

    try:
        batches = streaming.iterate(trainer.data_key, start, total_steps) if streaming else None
        for step in range(start, total_steps):
            if batches is None:
                losses.add(step, trainer.train_step())
            else:
                losses.add(step, trainer.train_step_on(*next(batches)))
            done = step + 1
            end_of_epoch = done % steps_per_epoch == 0
            if len(losses) >= config.log_every_steps or end_of_epoch:
                losses.flush(done)
            if end_of_epoch:
                epoch = done // steps_per_epoch
                if epoch % config.eval_every_epochs == 0 or done == total_steps:
                    summary, rows, pred = evaluate.evaluate_split(
                        trainer.variables, val, predict_step, val_truth
                    )
                    is_best = save(done, summary["val_dsc"], {"metrics": summary})
                    if is_best:
                        writer.submit(_write_best, workdir, rows, val.data, pred)
                    last_eval = {
                        "type": "eval",
                        "step": done,
                        "epoch": epoch,
                        **summary,
                        "best": is_best,
                    }
                    log.write(last_eval)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, last_eval)
            if (
                config.checkpoint_every_steps
                and done % config.checkpoint_every_steps == 0
                and ckpts.latest.latest_step() != done
            ):
                losses.flush(done)
                save(done)
        losses.flush(total_steps)
        if (
            total_steps
            and ckpts.latest.latest_step() != total_steps
            and trainer.step == total_steps
        ):
            save(total_steps)
    except KeyboardInterrupt:
        # Between steps the state is consistent: keep what was trained.
        try:
            losses.flush(trainer.step)
        finally:
            save(trainer.step, meta={"interrupted": True})
            print(
                f"\ninterrupted: saved a checkpoint at step {trainer.step}; "
                "run the same command again to resume"
            )
        raise
    finally:
        bar.close()
        try:
            writer.close()  # the best epoch's files are complete before the run returns
        finally:
            ckpts.close()
            log.close()

    best = ckpts.best_metric()
    summary = {
        "type": "summary",
        "step": trainer.step,
        "epochs": config.epochs,
        "best_val_dsc": best,
        **{k: v for k, v in last_eval.items() if k.startswith("val_")},
    }
    log.write(summary)
    if is_main:
        print(
            f"done: {config.name}: {trainer.step} steps, best validation DSC "
            f"{best if best is None else round(best, 4)}, last {last_eval.get('val_dsc')}"
            f" — {workdir}"
        )
    return summary
