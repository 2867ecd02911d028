"""Shared harness of the side-by-side benchmarks (``epoch_time``, ``input_pipeline``).

What it provides:

* **Data**: :func:`load_data` reads the real training split (the built TFDS data set under
  ``--data_dir``) or, when it is absent, generates synthetic arrays of the same layout and says so
  in its label (printed in every table). The split is handed to worker processes through a
  temporary ``.npy`` cache (:func:`save_split` / :func:`load_saved_split`), so the TFDS data set is
  read once.
* **Runners**: :class:`JaxRunner` (unet_jax: the device-resident pipeline and the real
  :class:`unet_jax.train.Trainer` step) and :class:`TorchRunner` (the PyTorch baseline's data path
  and training loop from ``benchmarks/torch_baseline``, as is or ``tuned``). A runner measures one
  *task* per call (``data``, ``step_fixed``, ``step_data``) over a given number of steps and returns
  its wall time, so a driver can alternate variants repetition by repetition.
* **Processes**: every runner normally lives in its own worker process (:class:`Remote`), so its
  peak RSS is attributable to it, PyTorch's DataLoader workers can fork from a process without
  JAX threads, and each can have its own XLA flags. Only one worker computes at a time (the others
  block on their stdin), so all variants see the same background load. :class:`Local` runs a
  runner in the calling process instead (tests; memory is then not attributable).

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

import contextlib
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.config import Config  # light (no JAX); the heavy imports stay inside functions

REPO = Path(__file__).resolve().parent.parent
#: Training slices of the real split (REFERENCE.md); epochs are projected for this many examples
#: when the data at hand is synthetic or a subset.
REAL_TRAIN_EXAMPLES = 3336
#: The baseline's augmentation ranges (scale, angle in degrees, flip probability): the Config
#: defaults, so both frameworks augment as a default unet_jax run does.
AUG = (Config.aug_scale, Config.aug_angle, Config.aug_flip)
#: The TFDS config benchmarked; the data set name comes from ``unet_jax.data.DATASET`` (imported
#: where it is used, as ``unet_jax.data`` pulls in JAX).
DATASET_CONFIG = "baseline"


# ----------------------------------------------------------------------------- small helpers


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (in measurement order)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def fmt_summary(s: dict[str, Any] | None, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`summarize` dict, or ``-``."""
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def rss_mb() -> float:
    """Current resident set size of this process in MiB (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS in MiB (``ru_maxrss`` is KiB on Linux). For ``RUSAGE_CHILDREN``: the largest
    waited-for child's peak."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (plus the AVX-512/AMX features that matter for bf16)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    for line in text.splitlines():
        if line.startswith("model name") and name in ("unknown", platform.processor()):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} [{', '.join(extras)}]" if extras else name


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Date, CPU model, core counts, memory, load average and library versions."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": round(mem, 1) if mem else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                               "scikit-image")},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def format_machine(info: dict[str, Any]) -> str:
    """One line describing the machine, for the top of a printed table."""
    v = info["versions"]
    return (f"{info['date']}; {info['cpu']}, {info['cores_usable']} usable cores "
            f"(cpu_count {info['cpu_count']}), {info['mem_total_gib']} GiB; load avg "
            f"{info['loadavg']}; python {info['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
            f"flax {v['flax']}, torch {v['torch']}, scikit-image {v['scikit-image']}, "
            f"numpy {v['numpy']}")


# ----------------------------------------------------------------------------- data


def synthetic_split(num_patients: int = 100, slices: int = 33, size: int = 256, seed: int = 0):
    """Synthetic stand-in for the training split: noisy discs ("brains") with lesion discs in the
    middle slices of every volume, uint8, with per-volume channel statistics.

    Only for timing: the work per example of both pipelines does not depend on the content.
    """
    from unet_jax.input_pipeline import SplitData
    from unet_jax.preprocess import channel_stats_uint8

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    n = num_patients * slices
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size, 1), np.uint8)
    mean = np.empty((num_patients, 3), np.float32)
    std = np.empty((num_patients, 3), np.float32)
    for p in range(num_patients):
        rows = slice(p * slices, (p + 1) * slices)
        vol = rng.integers(0, 160, (slices, size, size, 3), dtype=np.uint8) * brain[None, :, :, None]
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        for z in range(slices // 4, max(slices // 4 + 1, 3 * slices // 4)):
            r = size * rng.uniform(0.04, 0.12)
            lesion = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            masks[p * slices + z, ..., 0] = lesion
            vol[z, ..., 1] = np.where(lesion, 230, vol[z, ..., 1])
        images[rows] = vol
        mean[p], std[p] = channel_stats_uint8(vol)
    volume = np.repeat(np.arange(num_patients, dtype=np.int32), slices)
    slice_index = np.tile(np.arange(1, slices + 1, dtype=np.int32), num_patients)
    return SplitData(images, masks, volume, slice_index, mean, std,
                     tuple(f"SYNTH_{p:03d}" for p in range(num_patients)))


def synthetic_reason(data_dir: str | None) -> str:
    """Why synthetic data stands in for the real split (the ``SYNTHETIC data (...)`` labels)."""
    return "no --data_dir given" if not data_dir else f"no built data set under {data_dir}"


def load_data(data_dir: str | None, *, patients: int | None = None,
              synthetic: tuple[int, int, int] = (100, 33, 256), seed: int = 0):
    """The training split to benchmark on, and a label saying what it is.

    Real data: ``lgg_mri_segmentation/<DATASET_CONFIG>`` ``train`` from the TFDS data directory
    ``data_dir`` (read without TensorFlow). When ``data_dir`` is not given or holds no such built
    data set, synthetic arrays (:func:`synthetic_split` with ``synthetic = (patients, slices,
    size)``) are used instead and the label starts with ``SYNTHETIC``. ``patients`` keeps only the
    first that many patients.
    """
    from unet_jax.data import DATASET, is_built
    from unet_jax.input_pipeline import select_patients

    if data_dir and is_built(Path(data_dir), DATASET_CONFIG):
        import datasets.lgg_mri_segmentation  # noqa: F401  (registers the builder)
        from unet_jax.input_pipeline import load_split

        name = f"{DATASET}/{DATASET_CONFIG}"
        split = load_split(name, "train", data_dir)
        label = f"real data: {name} train, {data_dir}"
    else:
        why = synthetic_reason(data_dir)
        split = synthetic_split(*synthetic, seed=seed)
        label = (f"SYNTHETIC data ({why}): {synthetic[0]} patients x {synthetic[1]} slices of "
                 f"{synthetic[2]}x{synthetic[2]}")
    if patients is not None and patients < len(split.patients):
        split = select_patients(split, split.patients[:patients])
        label += f" (first {patients} patients)"
    label += (f"; {split.num_examples} slices of {split.images.shape[1]}x{split.images.shape[2]}, "
              f"{len(split.patients)} patients")
    return split, label


_SPLIT_ARRAYS = ("images", "masks", "volume", "slice_index", "mean", "std")


def save_split(split, directory: str | Path) -> None:
    """Write a SplitData as plain ``.npy`` files (for worker processes; never in the repo)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name in _SPLIT_ARRAYS:
        np.save(d / f"{name}.npy", getattr(split, name))
    (d / "patients.json").write_text(json.dumps(list(split.patients)))


def load_saved_split(directory: str | Path):
    """Inverse of :func:`save_split`."""
    from unet_jax.input_pipeline import SplitData

    d = Path(directory)
    arrays = {name: np.load(d / f"{name}.npy") for name in _SPLIT_ARRAYS}
    return SplitData(patients=tuple(json.loads((d / "patients.json").read_text())), **arrays)


# ----------------------------------------------------------------------------- FLOPs


def unet_forward_flops(features: int, image_size: int, in_channels: int = 3,
                       out_channels: int = 1) -> int:
    """Analytic FLOPs (2 x multiply-accumulates) of one U-Net forward pass on one image.

    Counts the convolutions and the transposed convolutions (the matmul-like work); BatchNorm,
    ReLU, pooling and concatenation are a fraction of a percent and left out. 3x3 convolutions
    count all 9 taps at every output pixel (zero padding included), as is usual for MFU.
    """
    def conv(h: int, cin: int, cout: int, k: int) -> int:
        return 2 * h * h * cin * cout * k * k

    f, h, c, total = features, image_size, in_channels, 0
    levels = [f, 2 * f, 4 * f, 8 * f]
    for ch in levels:  # encoder blocks
        total += conv(h, c, ch, 3) + conv(h, ch, ch, 3)
        c, h = ch, h // 2
    total += conv(h, c, 16 * f, 3) + conv(h, 16 * f, 16 * f, 3)  # bottleneck
    c = 16 * f
    for ch in reversed(levels):  # 2x2 stride-2 up-convolution, then a block on the concatenation
        total += 2 * h * h * c * 4 * ch
        h *= 2
        total += conv(h, 2 * ch, ch, 3) + conv(h, ch, ch, 3)
        c = ch
    return total + conv(h, c, out_channels, 1)


def training_flops_per_example(features: int, image_size: int) -> int:
    """Model FLOPs of one training example: forward + backward ~= 3 x forward."""
    return 3 * unet_forward_flops(features, image_size)


#: Dense bf16/fp16 tensor-core peaks (TFLOP/s) per device, for model FLOP utilisation; matched on
#: ``device_kind`` substrings in order. ``--peak-tflops`` overrides.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("V100", 125.0),
               ("T4", 65.0))


def peak_tflops(device_kind: str | None) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_TFLOPS`, or None if unknown."""
    if not device_kind:
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def _flops_of(cost: Any) -> float | None:
    """``flops`` from a JAX cost analysis (a dict, or a list of dicts in some versions)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


# ----------------------------------------------------------------------------- runners


class JaxRunner:
    """unet_jax on one device: the resident input pipeline and the real Trainer step.

    Tasks:
      ``data``: jitted ``ResidentData.train_batch`` (gather + normalise + [resize] + augment) for
        ``steps`` batches, each to ``block_until_ready``.
      ``step_fixed``: the Trainer's jitted, donated step on one fixed pre-made batch (data excluded).
      ``step_data``: ``Trainer.train_step()`` — sampling and augmentation inside the jitted step
        (data included).
    """

    def __init__(self, split, *, batch_sizes: Sequence[int], image_size: int, features: int = 32,
                 dtype: str = "float32", seed: int = 42, build_trainer: bool = True):
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
            from unet_jax.train import Trainer

            b = batch_sizes[0]
            # The augmentation is Config's default, which AUG is.
            config = Config(name="benchmark", features=features, batch_size=b,
                            image_size=image_size, dtype=dtype, seed=seed)
            t = time.perf_counter()
            self.trainer = Trainer(config, first, self.mesh)
            self.compile_s["trainer_init"] = time.perf_counter() - t
            self.fixed_batch = fixed_batch
            # The same Trainer on its own copy of the state, stepped on the one fixed batch.
            self.fixed = copy.copy(self.trainer)
            self.fixed.state = jax.device_put(jax.tree.map(jnp.copy, self.trainer.state),
                                              self.trainer.rep)
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

        out: dict[str, float | None] = {"xla_forward_per_example": None,
                                        "xla_train_step_per_example": None}
        tr = self.trainer
        try:
            def forward(params, stats, x):
                return nnx.merge(tr.graphdef, params, stats, copy=True)(x)

            x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
            lowered = jax.jit(forward).lower(tr.state["params"], tr.state["batch_stats"], x)
            out["xla_forward_per_example"] = _flops_of(lowered.cost_analysis())
            lowered = tr._train_step.lower(tr.state, tr.data.arrays, tr.data_key)
            f = _flops_of(lowered.cost_analysis())
            out["xla_train_step_per_example"] = f / batch if f else None
        except Exception as e:  # cost analysis is informative only; never fail the benchmark
            print(f"[jax] XLA cost analysis unavailable: {e}", file=sys.stderr)
        return out

    def info(self) -> dict[str, Any]:
        return {"framework": "jax", "device": self.device, "device_kind": self.device_kind,
                "setup_s": self.setup_s, "compile_s": self.compile_s, "flops": self.flops,
                "resize": self.aug.image_size is not None}

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
    return {"seconds": seconds, "examples": examples,
            "examples_per_s": examples / seconds if seconds > 0 else math.nan}


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
        image = resize(image, shape + image.shape[2:], order=1, mode="constant",
                       anti_aliasing=True, preserve_range=True).astype(np.float32)
        mask = resize(mask.astype(np.float32), shape + mask.shape[2:], order=1, mode="constant",
                      anti_aliasing=True, preserve_range=True)
        return image, (mask >= 0.5).astype(np.float32)


def baseline_volumes(split) -> list[tuple[np.ndarray, np.ndarray]]:
    """The baseline's in-memory float32 volumes (standardised per volume) from a SplitData.

    Converted one patient at a time so the transient float copies stay one volume large.
    """
    from benchmarks.torch_baseline.data import volumes_from_slices

    volumes = []
    for v in range(len(split.patients)):
        rows = split.volume_slices(v)
        volumes += volumes_from_slices(split.images[rows], split.masks[rows],
                                       np.zeros(rows.size, np.int32),
                                       np.repeat(split.mean[v][None], rows.size, axis=0),
                                       np.repeat(split.std[v][None], rows.size, axis=0))
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

    def __init__(self, split, *, batch: int, image_size: int, features: int = 32,
                 tuned: bool = False, workers: int = 0, device: str = "cpu", seed: int = 42,
                 build_model: bool = True, mp_context: str | None = None):
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

        return make_loader(self.dataset, batch, workers, **self.loader_kwargs,
                           multiprocessing_context=self.mp_context)

    def _started(self, batch: int, workers: int, steps: int):
        """A fresh iterator with the first ``max(1, workers)`` batches taken (start-up)."""
        need = examples_needed(steps, workers, batch)
        if len(self.dataset) < need:
            raise ValueError(f"an epoch of {len(self.dataset)} examples holds fewer than "
                             f"{need // batch} batches of {batch}: use more data or fewer steps")
        t0 = time.perf_counter()
        it = iter(self._loader(batch, workers))
        for _ in range(max(1, workers)):
            next(it)
        return it, time.perf_counter() - t0

    def _train(self, loader, steps: int) -> dict[str, Any]:
        from benchmarks.torch_baseline.train import train_epoch

        return train_epoch(self.model, loader, self.opt, self.device, max_steps=steps,
                           **self.train_kwargs)

    def info(self) -> dict[str, Any]:
        torch = self.torch
        dev = str(self.device)
        if self.device.type == "cuda":
            dev += f": {torch.cuda.get_device_name(self.device)}"
        return {"framework": "torch", "device": dev, "setup_s": self.setup_s,
                "compile_s": self.compile_s, "threads": torch.get_num_threads(),
                "workers": self.workers, "tuned": self.tuned}

    def run(self, task: str, steps: int, batch: int | None = None, workers: int | None = None,
            **_: Any) -> dict[str, Any]:
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
            return {**_timing(r["wall_s"], r["examples"]), "loss": r["final_loss"],
                    "startup_s": startup, "data_wait_s": r["data_wait_total_s"]}
        raise ValueError(f"unknown task {task!r}")

    def memory(self) -> dict[str, Any]:
        torch = self.torch
        if self.device.type == "cuda":
            return {"device_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}
        return {"device_peak_mb": None}


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner}


# ----------------------------------------------------------------------------- processes


def _memory_report(runner, rss0: float, *, attributable: bool) -> dict[str, Any]:
    """End-of-run memory of a runner's process: device peak, peak RSS and its growth over
    ``rss0`` (the RSS before the data was loaded), and the DataLoader workers' largest peak."""
    peak = peak_rss_mb()
    return {**runner.memory(), "peak_rss_mb": peak, "peak_rss_delta_mb": max(0.0, peak - rss0),
            "workers_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
            "attributable": attributable}


class Local:
    """A runner in this process (tests): same interface as :class:`Remote`."""

    def __init__(self, kind: str, split, **kwargs: Any):
        self.rss0 = rss_mb()
        self.runner = RUNNERS[kind](split, **kwargs)
        self.info = {**self.runner.info(), "process": "in-process"}

    def call(self, **task: Any) -> dict[str, Any]:
        return self.runner.run(**task)

    def finish(self) -> dict[str, Any]:
        return _memory_report(self.runner, self.rss0, attributable=False)


class Remote:
    """A runner in its own worker process, driven over stdin/stdout with JSON lines."""

    def __init__(self, kind: str, split_dir: str | Path, env: dict[str, str] | None = None,
                 **kwargs: Any):
        spec = {"kind": kind, "split_dir": str(split_dir), "kwargs": kwargs}
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.harness", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, **(env or {})})
        self.info = {**self._read(), "process": "subprocess"}

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"{self.kind} worker exited (rc {rc}) without answering; see its "
                               "stderr above")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.kind} worker failed: {msg['error']}")
        return msg

    def call(self, **task: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> dict[str, Any]:
        out = self.call(task="finish")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve(spec: dict[str, Any]) -> None:
    """Worker process main loop: build the runner, then answer one task per stdin line."""
    # The protocol owns the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    kind = spec["kind"]
    if kind == "jax":
        import jax  # noqa: F401  (import before measuring the baseline RSS)
    else:
        import torch  # noqa: F401
    from unet_jax import input_pipeline  # noqa: F401
    rss0 = rss_mb()
    try:
        split = load_saved_split(spec["split_dir"])
        runner = RUNNERS[kind](split, **spec["kwargs"])
        del split
        info = {**runner.info(), "rss_before_data_mb": rss0,
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
        proto.write(json.dumps(info) + "\n")
    except Exception as e:
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise
    for line in sys.stdin:
        task = json.loads(line)
        if task.get("task") == "finish":
            proto.write(json.dumps(_memory_report(runner, rss0, attributable=True)) + "\n")
            return
        try:
            out = runner.run(**task)
        except Exception as e:
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            raise
        proto.write(json.dumps(out) + "\n")


@contextlib.contextmanager
def started(specs: dict[str, tuple[str, dict[str, Any]]], split, *, inprocess: bool,
            env: dict[str, dict[str, str]] | None = None, log=print):
    """Start one runner per name (``{name: (kind, kwargs)}``), one after another; yield
    ``{name: Local | Remote}``; always stop the worker processes."""
    import tempfile

    handles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="unet_jax_bench_") as tmp:
        if not inprocess:
            save_split(split, tmp)
        try:
            for name, (kind, kwargs) in specs.items():
                t = time.perf_counter()
                if inprocess:
                    handles[name] = Local(kind, split, **kwargs)
                else:
                    handles[name] = Remote(kind, tmp, env=(env or {}).get(name), **kwargs)
                log(f"  ready: {name:<12s} ({time.perf_counter() - t:.1f} s: data, model, "
                    f"compile, warm-up)")
            yield handles
        finally:
            for h in handles.values():
                if isinstance(h, Remote):
                    h.kill()


def round_robin(handles: dict[str, Any], tasks: Sequence[tuple[str, dict[str, Any]]], reps: int,
                log=print) -> dict[int, list[dict[str, Any]]]:
    """Run every task once per repetition, the order rotated each repetition so no task always
    follows the same one; returns ``{task index: [result per rep]}``. ``tasks`` are
    ``(handle name, call kwargs)``."""
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(tasks))}
    order = list(range(len(tasks)))
    for r in range(reps):
        k = r % len(order)
        for i in order[k:] + order[:k]:
            name, kwargs = tasks[i]
            out = handles[name].call(**kwargs)
            results[i].append(out)
            log(f"  rep {r + 1}/{reps} {name:<12s} {kwargs.get('task'):<10s} "
                + " ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("task", "steps"))
                + f"  {out['examples_per_s']:.2f} ex/s")
    return results


# ----------------------------------------------------------------------------- command lines


def add_data_args(parser) -> None:
    """The data and output options shared by ``epoch_time`` and ``input_pipeline``."""
    parser.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                        help="TFDS data dir holding lgg_mri_segmentation/baseline (else synthetic "
                             "data)")
    parser.add_argument("--patients", type=int, default=None,
                        help="use only the first N patients (less memory; rates are per example)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--inprocess", action="store_true",
                        help="run every variant in this process (tests; memory is not "
                             "attributable, DataLoader workers use 'spawn')")
    parser.add_argument("--synthetic", default="100,33,256",
                        help="synthetic fallback: patients,slices,stored size")


def data_from_args(args) -> tuple[Any, str]:
    """:func:`load_data` for the options of :func:`add_data_args`: ``(split, label)``."""
    synthetic = tuple(int(x) for x in args.synthetic.split(","))
    return load_data(args.data_dir, patients=args.patients, synthetic=synthetic, seed=0)


def resize_note(stored: int, size: int, where: str) -> str:
    """How examples stored at ``stored`` reach ``size`` (``where``: who resizes)."""
    return f"resized on the fly {stored}->{size} in both {where}" if size != stored else "no resize"


def run_cli(module: str, build_parser, run, argv: list[str] | None) -> dict[str, Any]:
    """Shared ``main`` of the benchmark scripts: parse ``argv``, ``run(args, command=...)``, and
    write the result as JSON when ``--out`` is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = run(args, command=" ".join([f"python -m {module}", *argv]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.harness --worker SPEC_JSON``."""
    import argparse

    ap = argparse.ArgumentParser(description="benchmark worker process (internal)")
    ap.add_argument("--worker", required=True)
    args = ap.parse_args(argv)
    _serve(json.loads(args.worker))


if __name__ == "__main__":
    main()
