"""Ablation: from run 1 towards run 2 one factor at a time.

Command: ``python -m experiments.run --exp=ablation`` (one sub-workdir per sub-run; the
comparison is ``<workdir>/report/comparison.md``).

The report changed four hyperparameters at once between run 1 (DSC 0.8093) and run 2 (0.7925)
and could not tell which change hurt. Sub-runs, each differing from run 1 in exactly one field
(besides ``name``):

* ``run1``      — run 1 itself (batch 16, 7 epochs, lr 3e-4, weight decay 0);
* ``batch32``   — batch size 32 (same epochs, so half as many optimiser steps);
* ``lr1e-3``    — learning rate 1e-3;
* ``wd1e-4``    — weight decay 1e-4;
* ``epochs10``  — 10 epochs.

Expected: no prior measurement; the report's two end points are 0.8093 (run 1) and 0.7925
(run 2). Differences between sub-runs of a few 0.01 are within seed-to-seed noise on 10
validation patients; repeat with other ``seed`` values before calling a factor harmful.

Measured: not run yet (2026-11-26): at 256x256 one epoch takes over an hour on a
2-core CPU, and it has not run on a GPU yet; the number belongs here once it is run.
"""

from __future__ import annotations

from experiments.configs import run1
from unet_jax.config import Config

#: Sub-run name -> the one field changed from run 1 (the values of run 2).
FACTORS: dict[str, dict[str, object]] = {
    "batch32": {"batch_size": 32},
    "lr1e-3": {"learning_rate": 1e-3},
    "wd1e-4": {"weight_decay": 1e-4},
    "epochs10": {"epochs": 10},
}


def get_config() -> Config:
    """The shared base: run 1."""
    return run1.get_config().replace(name="ablation")


def get_configs() -> dict[str, Config]:
    """``run1`` followed by the one-factor variants, in that order."""
    base = run1.get_config()
    runs = {"run1": base.replace(name="ablation-run1")}
    for name, change in FACTORS.items():
        runs[name] = base.replace(name=f"ablation-{name}", **change)
    return runs
