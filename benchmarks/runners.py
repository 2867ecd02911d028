"""The benchmarked implementations behind one interface: :class:`JaxRunner` (unet_jax: the
device-resident pipeline and the real :class:`unet_jax.train_steps.Trainer` step) and
:class:`TorchRunner` (the PyTorch baseline's data path and training loop from
``benchmarks/torch_baseline``, as is or ``tuned``).

A runner measures one *task* per call (``data``, ``step_fixed``, ``step_data``) over a given number
of steps and returns its wall time, so a driver can alternate variants repetition by repetition
(:mod:`benchmarks.workers` runs each in its own process).

Timing conventions (the same for every variant):

* JAX work is timed to ``block_until_ready``; PyTorch steps end with the baseline's
  ``loss.item()`` (which also synchronises CUDA).
* A DataLoader iterator is created for every measurement and shut down after it, so no worker
  process computes in the background while another variant is measured. Before the clock starts
  the first ``max(1, workers)`` batches are taken: that covers the workers' start-up, and skipping
  exactly one batch per worker keeps their phases aligned, so the timed batches are steady-state
  production (start-up time is reported apart as ``startup_s``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.flops import flops_of
from unet_jax.config import Config  # light (no JAX); the heavy imports stay inside functions

#: The baseline's augmentation ranges (scale, angle in degrees, flip probability): the Config
#: defaults, so both frameworks augment as a default unet_jax run does.
AUG = (Config.aug_scale, Config.aug_angle, Config.aug_flip)


class JaxRunner:
    """unet_jax on one device: the resident input pipeline and the real Trainer step.

    Tasks:
      ``data``: jitted ``ResidentData.train_batch`` (gather + normalise + [resize] + augment) for
        ``steps`` batches, each to ``block_until_ready``.
      ``step_fixed``: the Trainer's jitted, donated step on one fixed pre-made batch (data
        excluded).
      ``step_data``: ``Trainer.train_step()`` — sampling and augmentation inside the jitted step
        (data included).
    """

    def __init__(
        self,
        split,
        *,
        batch_sizes: Sequence[int],
        image_size: int,
        features: int = 32,
        dtype: str = "float32",
        seed: int = 42,
        build_trainer: bool = True,
    ):
        import jax
        import jax.numpy as jnp

        from unet_jax.input_pipeline import AugmentSpec, ResidentData, SamplerSpec, make_mesh

        t0 = time.perf_counter()
        self.mesh = make_mesh(jax.devices()[:1])
        stored = split.images.shape[1]
        self.image_size = image_size
        self.aug = AugmentSpec(*AUG, image_size=None if image_size == stored else image_size)
        first = ResidentData(split, self.mesh, batch_sizes[0], "weighted", self.aug)
        self.datas = {batch_sizes[0]: first}
        for b in batch_sizes[1:]:
            # Same device arrays, another batch size: train_batch reads only `spec` and `arrays`,
            # so a shallow copy avoids a second device copy of the whole split.
            other = copy.copy(first)
            other.spec = SamplerSpec(split.num_examples, b, "weighted")
            self.datas[b] = other
        self.batch_fns = {b: jax.jit(d.train_batch) for b, d in self.datas.items()}
        self.key = jax.random.key(seed)
        self.counter = 0
        self.compile_s: dict[str, float] = {}
        fixed_batch = None
        for b, fn in self.batch_fns.items():
            t = time.perf_counter()
            out = jax.block_until_ready(fn(self.key, 0, first.arrays))
            self.compile_s[f"data_b{b}"] = time.perf_counter() - t
            if b == batch_sizes[0]:
                fixed_batch = out  # step_fixed's batch below: the same call, kept not recomputed
        self.trainer = self.fixed = None
        self.flops: dict[str, float | None] = {}
        if build_trainer:
            from unet_jax.train_steps import Trainer

            b = batch_sizes[0]
            # The augmentation is Config's default, which AUG is.
            config = Config(
                name="benchmark",
                features=features,
                batch_size=b,
                image_size=image_size,
                dtype=dtype,
                seed=seed,
            )
            t = time.perf_counter()
            self.trainer = Trainer(config, first, self.mesh)
            self.compile_s["trainer_init"] = time.perf_counter() - t
            self.fixed_batch = fixed_batch
            # The same Trainer on its own copy of the state, stepped on the one fixed batch.
            self.fixed = copy.copy(self.trainer)
            self.fixed.state = jax.device_put(
                jax.tree.map(jnp.copy, self.trainer.state), self.trainer.rep
            )
            for name in ("step_data", "step_fixed"):
                t = time.perf_counter()
                jax.block_until_ready(self._step_fn(name)())
                self.compile_s[name] = time.perf_counter() - t
            self.flops = self._xla_flops(b)
        self.setup_s = time.perf_counter() - t0
        dev = jax.devices()[0]
        self.device = f"{dev.platform}: {getattr(dev, 'device_kind', '')}"
        self.device_kind = getattr(dev, "device_kind", "")

    def _xla_flops(self, batch: int) -> dict[str, float | None]:
        """XLA's cost analysis (lowered HLO, no extra compile) of the forward pass of one example
        and of the whole train step per example (forward, backward, optimiser, augmentation)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        out: dict[str, float | None] = {
            "xla_forward_per_example": None,
            "xla_train_step_per_example": None,
        }
        tr = self.trainer
        try:

            def forward(params, stats, x):
                return nnx.merge(tr.graphdef, params, stats, copy=True)(x)

            x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
            lowered = jax.jit(forward).lower(tr.state["params"], tr.state["batch_stats"], x)
            out["xla_forward_per_example"] = flops_of(lowered.cost_analysis())
            lowered = tr._train_step.lower(tr.state, tr.data.arrays, tr.data_key)
            f = flops_of(lowered.cost_analysis())
            out["xla_train_step_per_example"] = f / batch if f else None
        except Exception as e:  # cost analysis is informative only; never fail the benchmark
            print(f"[jax] XLA cost analysis unavailable: {e}", file=sys.stderr)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "framework": "jax",
            "device": self.device,
            "device_kind": self.device_kind,
            "setup_s": self.setup_s,
            "compile_s": self.compile_s,
            "flops": self.flops,
            "resize": self.aug.image_size is not None,
        }

    def run(self, task: str, steps: int, batch: int | None = None, **_: Any) -> dict[str, Any]:
        import jax

        if task == "data":
            b = batch or next(iter(self.datas))
            fn, arrays = self.batch_fns[b], self.datas[b].arrays
            t0 = time.perf_counter()
            for _i in range(steps):
                self.counter += 1
                jax.block_until_ready(fn(self.key, self.counter, arrays))
            return _timing(time.perf_counter() - t0, steps * b)
        if task in ("step_fixed", "step_data"):
            if self.trainer is None:
                raise ValueError("this runner was built without a trainer")
            tr, step = (self.fixed if task == "step_fixed" else self.trainer), self._step_fn(task)
            t0 = time.perf_counter()
            for _i in range(steps):
                out = step()
            jax.block_until_ready((tr.state, out))
            seconds = time.perf_counter() - t0
            return {**_timing(seconds, steps * tr.data.spec.batch_size), "loss": float(out["loss"])}
        raise ValueError(f"unknown task {task!r}")

    def _step_fn(self, task: str):
        """One training step: ``Trainer.train_step`` (data included) or ``train_step_on`` the
        fixed batch (data excluded; the Trainer's own jitted, donated step for given batches)."""
        if task == "step_fixed":
            return lambda: self.fixed.train_step_on(*self.fixed_batch)
        return self.trainer.train_step

    def memory(self) -> dict[str, Any]:
        import jax

        stats = None
        try:
            stats = jax.devices()[0].memory_stats()
        except Exception:  # CPU devices may not report memory statistics
            pass
        peak = stats.get("peak_bytes_in_use") if stats else None
        return {"device_peak_mb": peak / 2**20 if peak else None}


def examples_needed(steps: int, workers: int, batch: int) -> int:
    """Examples one DataLoader measurement draws within one epoch: ``steps`` timed batches after
    the ``max(1, workers)`` untimed start-up batches (see the module docstring)."""
    return (steps + max(1, workers)) * batch


def _timing(seconds: float, examples: int) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "examples": examples,
        "examples_per_s": examples / seconds if seconds > 0 else math.nan,
    }


class ResizePair:
    """Resize an (image, mask) HWC pair to ``size x size`` on the fly, before augmentation.

    The counterpart of unet_jax's on-device resize for model sizes below the stored 256: images
    with scikit-image's anti-aliased linear resize, masks resized linearly (anti-aliased) and
    thresholded at 0.5, so both frameworks train on the same kind of input.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample):
        from skimage.transform import resize

        image, mask = sample
        shape = (self.size, self.size)
        image = resize(
            image,
            shape + image.shape[2:],
            order=1,
            mode="constant",
            anti_aliasing=True,
            preserve_range=True,
        ).astype(np.float32)
        mask = resize(
            mask.astype(np.float32),
            shape + mask.shape[2:],
            order=1,
            mode="constant",
            anti_aliasing=True,
            preserve_range=True,
        )
        return image, (mask >= 0.5).astype(np.float32)


def baseline_volumes(split) -> list[tuple[np.ndarray, np.ndarray]]:
    """The baseline's in-memory float32 volumes (standardised per volume) from a SplitData.

    Converted one patient at a time so the transient float copies stay one volume large.
    """
    from benchmarks.torch_baseline.data import volumes_from_slices

    volumes = []
    for v in range(len(split.patients)):
        rows = split.volume_slices(v)
        volumes += volumes_from_slices(
            split.images[rows],
            split.masks[rows],
            np.zeros(rows.size, np.int32),
            np.repeat(split.mean[v][None], rows.size, axis=0),
            np.repeat(split.std[v][None], rows.size, axis=0),
        )
    return volumes


class TorchRunner:
    """The PyTorch baseline (``tuned=False``: fp32, NCHW, the baseline's DataLoader settings) or
    tuned PyTorch (channels_last, autocast, ``workers`` DataLoader workers, no per-step loss sync;
    pinned memory and cuDNN autotuning on CUDA).

    Tasks:
      ``data``: iterate a fresh DataLoader (``workers`` / ``batch`` may be overridden per call).
      ``step_fixed``: ``train_epoch`` over one fixed batch repeated (data excluded).
      ``step_data``: ``train_epoch`` over a fresh DataLoader iterator (data included).
    """

    def __init__(
        self,
        split,
        *,
        batch: int,
        image_size: int,
        features: int = 32,
        tuned: bool = False,
        workers: int = 0,
        device: str = "cpu",
        seed: int = 42,
        build_model: bool = True,
        mp_context: str | None = None,
    ):
        import torch

        from benchmarks.torch_baseline import data as bdata
        from benchmarks.torch_baseline.train import tuned_setup

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.torch = torch
        self.device = torch.device(device)
        self.batch, self.workers, self.tuned = batch, workers, tuned
        self.mp_context = mp_context
        stored = split.images.shape[1]
        pre = [ResizePair(image_size)] if image_size != stored else []
        transform = bdata.Compose(pre + bdata.transforms(*AUG).transforms)
        self.dataset = bdata.BaselineDataset(baseline_volumes(split), transform=transform)
        self.opt = self.fixed = None
        self.compile_s: dict[str, float] = {}
        model = None
        if build_model:
            from benchmarks.torch_baseline.unet import UNet

            model = UNet(3, 1, features)
        # The baseline's or tuned PyTorch's switches, as torch_baseline/train.py sets them.
        self.model, self.loader_kwargs, self.train_kwargs = tuned_setup(self.device, tuned, model)
        if self.model is not None:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
            x, y = next(iter(bdata.make_loader(self.dataset, batch, 0)))
            fmt = torch.channels_last if tuned else torch.contiguous_format
            self.fixed = (x.to(self.device, memory_format=fmt), y.to(self.device))
            t = time.perf_counter()
            self._train([self.fixed] * 2, 2)  # allocator / cuDNN warm-up
            self.compile_s["warmup"] = time.perf_counter() - t
        self.setup_s = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _loader(self, batch: int, workers: int):
        from benchmarks.torch_baseline.data import make_loader

        return make_loader(
            self.dataset,
            batch,
            workers,
            **self.loader_kwargs,
            multiprocessing_context=self.mp_context,
        )

    def _started(self, batch: int, workers: int, steps: int):
        """A fresh iterator with the first ``max(1, workers)`` batches taken (start-up)."""
        need = examples_needed(steps, workers, batch)
        if len(self.dataset) < need:
            raise ValueError(
                f"an epoch of {len(self.dataset)} examples holds fewer than "
                f"{need // batch} batches of {batch}: use more data or fewer steps"
            )
        t0 = time.perf_counter()
        it = iter(self._loader(batch, workers))
        for _ in range(max(1, workers)):
            next(it)
        return it, time.perf_counter() - t0

    def _train(self, loader, steps: int) -> dict[str, Any]:
        from benchmarks.torch_baseline.train import train_epoch

        return train_epoch(
            self.model, loader, self.opt, self.device, max_steps=steps, **self.train_kwargs
        )

    def info(self) -> dict[str, Any]:
        torch = self.torch
        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f": {torch.cuda.get_device_name(self.device)}"
        return {
            "framework": "torch",
            "device": dev,
            "setup_s": self.setup_s,
            "compile_s": self.compile_s,
            "threads": torch.get_num_threads(),
            "workers": self.workers,
            "tuned": self.tuned,
        }

    def run(
        self, task: str, steps: int, batch: int | None = None, workers: int | None = None, **_: Any
    ) -> dict[str, Any]:
        batch = batch or self.batch
        workers = self.workers if workers is None else workers
        if task == "data":
            it, startup = self._started(batch, workers, steps)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            seconds = time.perf_counter() - t0
            del it  # shuts the workers down before the next variant runs
            return {**_timing(seconds, steps * batch), "startup_s": startup}
        if self.model is None:
            raise ValueError("this runner was built without a model")
        if task == "step_fixed":
            r = self._train([self.fixed] * steps, steps)
            return {**_timing(r["wall_s"], r["examples"]), "loss": r["final_loss"]}
        if task == "step_data":
            it, startup = self._started(self.batch, workers, steps)
            r = self._train(it, steps)
            del it
            return {
                **_timing(r["wall_s"], r["examples"]),
                "loss": r["final_loss"],
                "startup_s": startup,
                "data_wait_s": r["data_wait_total_s"],
            }
        raise ValueError(f"unknown task {task!r}")

    def memory(self) -> dict[str, Any]:
        torch = self.torch
        if self.device.type == "cuda":
            return {"device_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}
        return {"device_peak_mb": None}


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner}
