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
process 0 writes logs, reports and the config, and Orbax coordinates checkpoint writes. This is
structured for but not tested here (one host only).

Resume is exact: a step's batch and augmentation are pure functions of ``(seed, step)``, so a
run restored from the checkpoint of step ``k`` continues with exactly the batches it would have
seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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

from unet_jax import evaluate
from unet_jax.checkpoint import TrainCheckpoints, build_model
from unet_jax.config import Config
from unet_jax.data import load_data
from unet_jax.input_pipeline import (AugmentSpec, ResidentData, SplitData, StreamingData,
                                     fits_on_device, make_mesh, replicated)
from unet_jax.losses import get_loss
from unet_jax.model import load_pure, model_to_pure


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; names the step and epoch."""


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


# ----------------------------------------------------------------------------- optimiser


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule: constant or cosine, with optional linear warmup."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    lr = config.learning_rate
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, max(total, warmup + 1),
            end_value=lr * config.final_lr_fraction)
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
        state = {"params": params, "batch_stats": batch_stats,
                 "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        self.rep = replicated(mesh)
        self.state = jax.device_put(state, self.rep)
        key = jax.random.key(config.seed)
        self.data_key = jax.random.fold_in(key, 1)
        self._train_step = jax.jit(self._step, donate_argnums=(0,),
                                   out_shardings=(self.rep, self.rep))
        self._batch_step = jax.jit(self._update, donate_argnums=(0,),
                                   out_shardings=(self.rep, self.rep))

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
        new_state = {"params": optax.apply_updates(state["params"], updates),
                     "batch_stats": batch_stats, "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def apply_eval(self, variables: tuple, images: jax.Array) -> jax.Array:
        """Eval-mode logits (running BatchNorm statistics)."""
        params, batch_stats = variables
        return nnx.merge(self.eval_graphdef, params, batch_stats, copy=True)(images)

    # -- state <-> checkpoint -------------------------------------------------------------
    def model_pure(self, state: dict | None = None) -> dict:
        state = self.state if state is None else state
        return model_to_pure(nnx.merge(self.eval_graphdef, state["params"], state["batch_stats"],
                                       copy=True))

    def opt_pure(self, state: dict | None = None) -> Any:
        state = self.state if state is None else state
        return {"opt_state": state["opt_state"], "step": state["step"]}

    def load_pure(self, model_pure: dict, opt_pure: Any) -> None:
        model = nnx.merge(self.eval_graphdef, self.state["params"], self.state["batch_stats"],
                          copy=True)
        load_pure(model, model_pure)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        state = {"params": params, "batch_stats": batch_stats,
                 "opt_state": opt_pure["opt_state"], "step": jnp.asarray(opt_pure["step"], jnp.int32)}
        self.state = jax.device_put(state, self.rep)

    def train_step(self) -> dict[str, jax.Array]:
        """One step on the resident pipeline's batch (sampled and augmented inside the jit)."""
        if not isinstance(self.data, ResidentData):
            raise TypeError("train_step needs resident data; streamed batches go through "
                            "train_step_on")
        self.state, out = self._train_step(self.state, self.data.arrays, self.data_key)
        return out

    def train_step_on(self, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """One step on a given batch (the streaming path; benchmarks with data excluded)."""
        self.state, out = self._batch_step(self.state, x, y)
        return out

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ----------------------------------------------------------------------------- logging


class RunLog:
    """``metrics.jsonl`` (+ optional TensorBoard via tensorboardX); writes on process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.path = workdir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional, TF-free
                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a killed run may have logged past its checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- workdir


def prepare_workdir(config: Config, workdir: Path, restart: bool) -> None:
    """Create the workdir, or check that an existing run there has the same config."""
    cfg_file = workdir / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old != json.loads(config.to_json()):
            if not restart:
                diff = sorted(k for k in set(old) | set(config.to_dict())
                              if old.get(k) != json.loads(config.to_json()).get(k))
                raise ConfigMismatchError(
                    f"{workdir} holds a run with a different config (differs in: {diff}). "
                    "Use another --workdir, or restart from scratch (--restart), which deletes it.")
        if restart:
            for name in ("checkpoints", "metrics.jsonl", "tensorboard", "report",
                         "per_patient.csv", "predictions.npz"):
                p = workdir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        tmp = cfg_file.with_suffix(".tmp")
        tmp.write_text(config.to_json() + "\n")
        tmp.replace(cfg_file)


class _Progress:
    """tqdm progress bar with loss, images/s and ETA (quiet when not a terminal or in tests)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            mininterval=1.0)

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
        return {"image": self.split.images[i], "mask": self.split.masks[i],
                "channel_mean": self.split.mean[v], "channel_std": self.split.std[v]}


def evaluate_split(trainer: Trainer, val: ResidentData, predict_step: Callable,
                   truth: np.ndarray) -> tuple[dict, list[dict], np.ndarray]:
    """Per-patient metrics of the current model on ``val``: (summary, rows, binary preds).

    ``predict_step``: :func:`evaluate.make_predict_step` of ``val``; ``truth``: the validation
    masks at the model's input size (:func:`eval_truth`). Both are made once per run.
    """
    out = evaluate.predict_split(predict_step, (trainer.state["params"],
                                                trainer.state["batch_stats"]), val)
    rows = evaluate.per_volume(out["pred"], truth, val.data, out)
    return evaluate.summarize(rows), rows, out["pred"]


def eval_truth(val: ResidentData) -> np.ndarray:
    """The validation masks (bool, N x H x W) at the model's input size, exactly as the
    evaluation batches see them (resized on device when the model trains below 256)."""
    if val.aug.image_size is None:
        return val.data.masks[..., 0].astype(bool)

    @jax.jit
    def masks_of(arrays, b):
        return val.eval_batch(b, arrays)[1]
    out = [np.asarray(masks_of(val.arrays, b))[..., 0] for b in range(val.num_eval_batches)]
    return np.concatenate(out)[: val.data.num_examples] >= 0.5


class _BackgroundWriter:
    """Writes the best epoch's per_patient.csv and predictions.npz on one thread, so training goes
    on while they are compressed (about a second at 256x256; a GPU epoch takes about as long).

    At most one write is pending: a new one first waits for the last, so files appear in order, and
    :meth:`wait` (called when training ends, also on errors) raises the writer's error, if any.
    """

    def __init__(self, enabled: bool):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet_jax_writer") if enabled else None
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
    evaluate.write_per_patient_csv(rows, workdir / "per_patient.csv")
    evaluate.write_predictions(workdir / "predictions.npz", split, pred)


def train_and_evaluate(config: Config, workdir: str | Path, *,
                       data: tuple[SplitData, SplitData]
                       | Callable[[], tuple[SplitData, SplitData]] | None = None,
                       restart: bool = False, progress: bool | None = None,
                       on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it holds a run), evaluate every epoch,
    checkpoint, log; returns the final summary.

    Args:
      config: the run's settings.
      workdir: where config.json, metrics.jsonl, checkpoints/, per_patient.csv,
        predictions.npz and the report go.
      data: ``(train, validation)`` splits, or a callable returning them (called once the
        workdir is prepared, e.g. one that builds the data set first); default: read from the
        built data set as ``config`` says (:func:`unet_jax.data.load_data`).
      restart: delete an existing run in ``workdir`` instead of resuming it.
      progress: show a progress bar (default: when stderr is a terminal).
    """
    workdir = Path(workdir).absolute()
    prepare_workdir(config, workdir, restart)
    if data is None:
        data = load_data(config)
    elif callable(data):
        data = data()
    train_split, val_split = data
    mesh = make_mesh()
    aug = AugmentSpec(config.aug_scale, config.aug_angle, config.aug_flip,
                      None if config.image_size == train_split.images.shape[1] else config.image_size)
    streaming = None
    if not fits_on_device(train_split, config.device_memory_budget_gb):
        # Over the device-memory budget: the same batches, read by grain from host records.
        streaming = StreamingData(_HostRecords(train_split), train_split, mesh, config.batch_size,
                                  config.sampling, aug)
        print(f"training data ({train_split.nbytes() / 2**30:.2f} GiB) exceeds the device-memory "
              f"budget of {config.device_memory_budget_gb} GiB: streaming it with grain")
    train = streaming or ResidentData(train_split, mesh, config.batch_size, config.sampling, aug)
    # Validation is evaluated in order from device memory (it is a tenth of the data).
    val = ResidentData(val_split, mesh, config.batch_size, config.sampling,
                       AugmentSpec(0, 0, 0, aug.image_size))
    trainer = Trainer(config, train, mesh)
    is_main = jax.process_index() == 0
    log = RunLog(workdir, is_main)
    writer = _BackgroundWriter(is_main)
    ckpts = TrainCheckpoints(workdir, keep_latest=config.keep_latest)
    spe = trainer.steps_per_epoch
    total_steps = config.epochs * spe

    restored = ckpts.restore_latest(trainer.model_pure(), trainer.opt_pure())
    if restored is not None:
        trainer.load_pure(restored[0], restored[1])
        log.truncate_after(trainer.step)
        print(f"resuming {workdir} at step {trainer.step} (epoch {trainer.step // spe})")
    start = trainer.step
    if progress is None:
        progress = os.isatty(2)
    bar = _Progress(total_steps, start, progress and is_main)
    predict_step = evaluate.make_predict_step(trainer.apply_eval, val, config.threshold)
    val_truth = eval_truth(val)  # once: the same masks every epoch
    last_eval: dict[str, Any] = {}
    pending: list[tuple[int, dict]] = []
    t_last, n_last = time.perf_counter(), 0
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

    def flush(step_now: int) -> None:
        """Fetch pending step losses; stop on the first non-finite one."""
        nonlocal t_last, n_last
        if not pending:
            return
        losses = jax.device_get([p[1] for p in pending])
        now = time.perf_counter()
        ips = n_last * config.batch_size / max(now - t_last, 1e-9)
        for (s, _), out in zip(pending, losses):
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {s} (epoch {s // spe}); the run "
                    f"stopped without saving it. The last good checkpoint is step "
                    f"{ckpts.latest.latest_step()} in {workdir / 'checkpoints'}.")
            if (s + 1) % config.log_every_steps == 0 or s + 1 == step_now:
                log.write({"type": "train", "step": s + 1, "epoch": (s + 1) / spe, "loss": loss,
                           "grad_norm": float(out["grad_norm"]), "lr": float(trainer.schedule(s)),
                           "images_per_s": ips})
        bar.update(len(pending), loss=f"{float(losses[-1]['loss']):.4f}", img_s=f"{ips:.1f}")
        pending.clear()
        t_last, n_last = now, 0

    def save(step_now: int, metric: float | None, meta: dict) -> bool:
        return ckpts.save(step_now, trainer.model_pure(), trainer.opt_pure(), config,
                          {"epoch": step_now / spe,
                           "rng_key": np.asarray(jax.random.key_data(trainer.data_key)).tolist(),
                           **meta}, metric)

    try:
        batches = streaming.iterate(trainer.data_key, start, total_steps) if streaming else None
        for s in range(start, total_steps):
            if batches is None:
                pending.append((s, trainer.train_step()))
            else:
                pending.append((s, trainer.train_step_on(*next(batches))))
            n_last += 1
            done = s + 1
            end_of_epoch = done % spe == 0
            if len(pending) >= config.log_every_steps or end_of_epoch:
                flush(done)
            if end_of_epoch:
                epoch = done // spe
                if epoch % config.eval_every_epochs == 0 or done == total_steps:
                    summary, rows, pred = evaluate_split(trainer, val, predict_step, val_truth)
                    is_best = save(done, summary["val_dsc"], {"metrics": summary})
                    if is_best:
                        writer.submit(_write_best, workdir, rows, val.data, pred)
                    last_eval = {"type": "eval", "step": done, "epoch": epoch, **summary,
                                 "best": is_best}
                    log.write(last_eval)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, last_eval)
            if (config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
                    and ckpts.latest.latest_step() != done):
                flush(done)
                save(done, None, {})
        flush(total_steps)
        if total_steps and ckpts.latest.latest_step() != total_steps and trainer.step == total_steps:
            save(total_steps, None, {})
    except KeyboardInterrupt:
        # Between steps the state is consistent: keep what was trained.
        try:
            flush(trainer.step)
        finally:
            save(trainer.step, None, {"interrupted": True})
            print(f"\ninterrupted: saved a checkpoint at step {trainer.step}; "
                  "run the same command again to resume")
        raise
    finally:
        bar.close()
        try:
            writer.close()  # the best epoch's files are complete before the run returns
        finally:
            ckpts.close()
            log.close()

    best = ckpts.best_metric()
    summary = {"type": "summary", "step": trainer.step, "epochs": config.epochs,
               "best_val_dsc": best, **{k: v for k, v in last_eval.items() if k.startswith("val_")}}
    log.write(summary)
    if is_main and config.write_report:
        try:
            from unet_jax.report import write_report
            write_report(workdir)
        except Exception as e:  # a figure must not lose a finished run
            print(f"warning: report not written: {e}")
    if is_main:
        print(f"done: {config.name}: {trainer.step} steps, best validation DSC "
              f"{best if best is None else round(best, 4)}, last {last_eval.get('val_dsc')}"
              f" — {workdir}")
    return summary
