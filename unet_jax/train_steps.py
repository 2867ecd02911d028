"""The Trainer: model, optimiser and the jitted training steps of one config and data set.

One code path from 1 CPU to N accelerators: the step is ``jax.jit``-ed over a 1-D mesh with a
``data`` axis; the batch is sharded over it, the model and optimiser state are replicated and
donated. Because the batch is one global array, BatchNorm's mean and variance span the global
batch (XLA inserts the all-reduce) with no extra code: ``jit`` over a mesh is pmap's successor
and scales the same program from one device to a pod (and to several hosts).

A step's batch and augmentation are pure functions of ``(seed, step)``: a run restored from
step ``k`` continues with exactly the batches it would have seen. On the resident path a whole
epoch can be one dispatch (:meth:`Trainer.train_steps`: the step looped on the device).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unet_jax.config import Config
from unet_jax.input_pipeline import ResidentData, StreamingData, replicated
from unet_jax.losses import get_loss
from unet_jax.model import build_model, load_pure, model_to_pure

__all__ = ["PackedTrainer", "Trainer", "make_optimizer", "make_schedule", "pack_mode"]


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


# ----------------------------------------------------------------------------- packed runs


def pack_mode(setting: str) -> str:
    """``Config.pack_mode`` on this backend: ``vmap`` or ``unroll`` (``auto``: ``vmap`` on
    accelerators, ``unroll`` on the CPU)."""
    if setting not in ("auto", "vmap", "unroll"):
        raise ValueError(f"unknown pack_mode {setting!r}; valid: auto, vmap, unroll")
    if setting == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "vmap"
    return setting


class PackedTrainer:
    """Several runs of one config that differ only in their seed, stepped by one program.

    Each run keeps its own :class:`Trainer` (its state, data PRNG key, checkpoints); this
    object owns the programs that advance all of them at once, over the same resident data:

    * ``vmap``: the step vectorised over a leading run axis (``jax.vmap`` over model, optimiser
      state and data key). R runs of batch B make convolutions R times as large (grouped over
      the runs), which fills an accelerator that batch 16 leaves underused. Not bit-for-bit
      the lone runs: XLA lowers a convolution whose weights carry the run axis as one grouped
      convolution, whose float32 sums run in another order (losses agree to ~1e-4 relative,
      parameters drift as Adam amplifies last-bit differences: bounds in tests/_checks.py).
    * ``unroll``: the runs' steps one after another inside one program. Each run computes
      what it computes alone (a different program, so equal to float rounding; bitwise on the
      Intel and AMD CPUs measured with jax 0.10.2, not promised by XLA): one dispatch and one
      compilation for all runs, but no larger kernels.
    """

    def __init__(self, trainers: list[Trainer], mode: str):
        if not trainers:
            raise ValueError("PackedTrainer needs at least one trainer")
        first = trainers[0]
        for t in trainers[1:]:
            if t.data is not first.data:
                raise ValueError("packed runs must share one ResidentData")
        if not isinstance(first.data, ResidentData):
            raise TypeError("packed runs need resident data")
        self.trainers = trainers
        self.mode = pack_mode(mode)
        self.first = first
        self.steps_per_epoch = first.steps_per_epoch
        rep = first.rep
        self._step_program = jax.jit(
            self._packed_step, donate_argnums=(0,), out_shardings=(rep, rep)
        )
        self._steps_program = jax.jit(
            self._packed_steps, static_argnums=(3,), donate_argnums=(0,), out_shardings=(rep, rep)
        )

    # -- pure functions -------------------------------------------------------------------
    def _pack(self, trees: tuple) -> Any:
        if self.mode == "vmap":
            return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
        return tuple(trees)

    def _unpack(self, packed: Any, axis: int = 0) -> tuple:
        if self.mode == "vmap":
            n = len(self.trainers)
            return tuple(
                jax.tree.map(lambda x, i=i: jnp.take(x, i, axis=axis), packed) for i in range(n)
            )
        return tuple(packed)

    def _body(self, packed: Any, arrays: dict, keys: Any):
        step = self.first._step
        if self.mode == "vmap":
            return jax.vmap(step, in_axes=(0, None, 0))(packed, arrays, keys)
        results = [step(s, arrays, k) for s, k in zip(packed, keys)]
        return tuple(r[0] for r in results), tuple(r[1] for r in results)

    def _packed_step(self, states: tuple, arrays: dict, keys: tuple):
        new, outs = self._body(self._pack(states), arrays, self._pack(keys))
        return self._unpack(new), self._unpack(outs)

    def _packed_steps(self, states: tuple, arrays: dict, keys: tuple, num_steps: int):
        packed_keys = self._pack(keys)

        def body(packed, _):
            return self._body(packed, arrays, packed_keys)

        new, outs = jax.lax.scan(body, self._pack(states), None, length=num_steps)
        # Stacked outputs are (num_steps, runs) under vmap: split on the run axis.
        return self._unpack(new), self._unpack(outs, axis=1)

    # -- stepping -------------------------------------------------------------------------
    def _run(self, program, *static) -> list[dict[str, jax.Array]]:
        states = tuple(t.state for t in self.trainers)
        keys = tuple(t.data_key for t in self.trainers)
        new, outs = program(states, self.first.data.arrays, keys, *static)
        for trainer, state in zip(self.trainers, new):
            trainer.state = state
        return list(outs)

    def train_step(self) -> list[dict[str, jax.Array]]:
        """One step of every run (as :meth:`Trainer.train_step`); the outputs per run."""
        return self._run(self._step_program)

    def train_steps(self, num_steps: int) -> list[dict[str, jax.Array]]:
        """``num_steps`` steps of every run in one dispatch (as :meth:`Trainer.train_steps`)."""
        return self._run(self._steps_program, num_steps)
