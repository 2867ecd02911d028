"""The baseline's training loop (brain-segmentation-pytorch), written for this project; timed.

Naive mode is the loop as the report ran it: batch from the DataLoader (per-example scikit-image
augmentation and lesion-weighted sampling in :mod:`.data`), copy to the device, forward, the
baseline's Dice loss on sigmoid outputs, backward, Adam step, and ``loss.item()`` every step (which
also synchronises the device, as the baseline's loss logging does).

``--tuned`` adds the usual PyTorch speed-ups so the comparison is also against a tuned PyTorch:
channels_last memory format, autocast mixed precision (bf16 on CPU; bf16 on CUDA where supported,
else fp16 with a GradScaler), two DataLoader workers, pinned host memory and cuDNN autotuning
(CUDA), and no ``loss.item()`` per step (the losses are fetched once at the end, so the host can
queue the next step's kernels while the device still runs the last one).

CLI (synthetic volumes unless the caller builds a loader from real data)::

    python -m benchmarks.torch_baseline.train --steps 5 --batch-size 4 --image-size 64 --features 8
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks.torch_baseline.data import (
    BaselineDataset,
    make_loader,
    synthetic_volumes,
    transforms,
)
from benchmarks.torch_baseline.unet import UNet


def dice_loss(y_pred: torch.Tensor, y_true: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The baseline's Dice loss: ``1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth)``.

    Sums run over the whole batch as one vector (first output channel), not per example.
    ``y_pred`` are probabilities (sigmoid outputs).
    """
    if y_pred.shape != y_true.shape:
        raise ValueError(f"shapes differ: {tuple(y_pred.shape)} vs {tuple(y_true.shape)}")
    p = y_pred[:, 0].reshape(-1)
    y = y_true[:, 0].reshape(-1)
    intersection = (p * y).sum()
    return 1.0 - (2.0 * intersection + smooth) / (p.sum() + y.sum() + smooth)


def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchSetup(NamedTuple):
    """What :func:`tuned_setup` returns."""

    model: torch.nn.Module | None
    loader_kwargs: dict[str, Any]  # for make_loader
    train_kwargs: dict[str, Any]  # for train_epoch


def tuned_setup(
    device: torch.device | str, tuned: bool, model: torch.nn.Module | None = None
) -> TorchSetup:
    """The baseline's settings (``tuned=False``) or tuned PyTorch's, in one place.

    Tuned: cuDNN autotuning (CUDA; a process-wide switch, set here), the model in channels_last,
    pinned host memory (CUDA), and ``train_epoch`` with autocast, channels_last inputs and no
    per-step loss sync. ``model`` (optional) is moved to ``device``.
    """
    device = torch.device(device)
    if tuned and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    if model is not None:
        model = model.to(device)
        if tuned:
            model = model.to(memory_format=torch.channels_last)
    return TorchSetup(
        model,
        {"pin_memory": tuned and device.type == "cuda"},
        {"amp": tuned, "channels_last": tuned, "sync_every_step": not tuned},
    )


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    max_steps: int | None = None,
    amp: bool = False,
    channels_last: bool = False,
    log: Callable[[str], None] | None = None,
    sync_every_step: bool = True,
) -> dict:
    """Run one pass over ``loader`` (at most ``max_steps`` batches) and time it.

    The model must already be on ``device`` (and in channels_last format if ``channels_last``);
    it returns logits, so the loop applies ``torch.sigmoid`` to get the baseline's outputs.

    Returns a dict with per-step lists ``data_wait_s`` (time blocked on the loader, including
    starting its workers for the first step), ``step_s`` (host-to-device copy, forward, loss,
    backward, optimiser step, ``loss.item()``; without ``sync_every_step`` the step is only queued
    on an accelerator and the final synchronisation is counted in ``wall_s`` alone), ``loss``;
    totals ``data_wait_total_s``,
    ``step_total_s``, ``wall_s``; ``steps``, ``examples``, ``examples_per_s`` (over the whole
    wall time) and ``examples_per_s_after_first`` (excluding the first step's warm-up), and
    ``final_loss``.
    """
    device = torch.device(device)
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None
    non_blocking = device.type == "cuda"

    data_wait: list[float] = []
    step_time: list[float] = []
    losses: list[float] = []
    batch_sizes: list[int] = []
    _sync(device)
    t_start = time.perf_counter()
    t_prev = t_start
    iterator = iter(loader)
    while max_steps is None or len(step_time) < max_steps:
        try:
            x, y_true = next(iterator)
        except StopIteration:
            break
        t_data = time.perf_counter()
        x = x.to(device, memory_format=memory_format, non_blocking=non_blocking)
        y_true = y_true.to(device, non_blocking=non_blocking)
        optimizer.zero_grad()
        ctx = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp
            else contextlib.nullcontext()
        )
        with ctx:
            logits = model(x)
        # The loss in float32: sums over a whole batch of pixels lose precision in half types.
        loss = dice_loss(torch.sigmoid(logits.float()), y_true)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(loss.item() if sync_every_step else loss.detach())
        t_end = time.perf_counter()
        data_wait.append(t_data - t_prev)
        step_time.append(t_end - t_data)
        batch_sizes.append(int(x.shape[0]))
        if log is not None and sync_every_step:
            log(
                f"step {len(step_time):4d}  loss {losses[-1]:.4f}  "
                f"data {1e3 * data_wait[-1]:8.1f} ms  step {1e3 * step_time[-1]:8.1f} ms"
            )
        t_prev = t_end
    if not sync_every_step:
        losses = [float(v) for v in torch.stack(losses).cpu()] if losses else []  # one sync
        t_prev = time.perf_counter()
    wall = t_prev - t_start
    examples = sum(batch_sizes)
    after_first = sum(data_wait[1:]) + sum(step_time[1:])
    return {
        "steps": len(step_time),
        "examples": examples,
        "data_wait_s": data_wait,
        "step_s": step_time,
        "loss": losses,
        "data_wait_total_s": sum(data_wait),
        "step_total_s": sum(step_time),
        "wall_s": wall,
        "examples_per_s": examples / wall if wall > 0 else math.nan,
        "examples_per_s_after_first": (
            sum(batch_sizes[1:]) / after_first
            if len(step_time) > 1 and after_first > 0
            else math.nan
        ),
        "final_loss": losses[-1] if losses else math.nan,
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training steps to time")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--features", type=int, default=32, help="U-Net init_features")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default 0; 2 with --tuned)"
    )
    p.add_argument("--tuned", action="store_true", help="channels_last + AMP + workers + pinning")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aug-scale", type=float, default=0.05)
    p.add_argument("--aug-angle", type=float, default=15.0)
    p.add_argument("--flip-prob", type=float, default=0.5)
    p.add_argument("--patients", type=int, default=4, help="synthetic patients")
    p.add_argument("--slices", type=int, default=None, help="synthetic slices per patient")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Time the baseline's loop on synthetic volumes; prints per-step timings and a summary."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers if args.workers is not None else (2 if args.tuned else 0)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    # Enough slices that an epoch covers the requested steps (drop_last).
    slices = args.slices or max(4, math.ceil(args.steps * args.batch_size / args.patients))
    volumes = synthetic_volumes(args.patients, slices, args.image_size, seed=args.seed)
    dataset = BaselineDataset(
        volumes, transform=transforms(args.aug_scale, args.aug_angle, args.flip_prob)
    )
    model, loader_kwargs, train_kwargs = tuned_setup(
        device, args.tuned, UNet(in_channels=3, out_channels=1, init_features=args.features)
    )
    loader = make_loader(dataset, args.batch_size, workers, **loader_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"device={device} batch={args.batch_size} image={args.image_size} "
        f"features={args.features} workers={workers} tuned={args.tuned} "
        f"threads={torch.get_num_threads()}"
    )
    result = train_epoch(
        model,
        loader,
        optimizer,
        device,
        max_steps=args.steps,
        log=print,
        **train_kwargs,
    )
    print(
        f"steps {result['steps']}  examples/s {result['examples_per_s']:.2f} "
        f"(after first step {result['examples_per_s_after_first']:.2f})  "
        f"data wait {result['data_wait_total_s']:.2f} s  step {result['step_total_s']:.2f} s  "
        f"final loss {result['final_loss']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
