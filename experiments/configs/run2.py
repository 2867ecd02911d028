"""Run 2 of the earlier PyTorch report: run 1 with batch 32, 10 epochs, lr 1e-3, weight decay 1e-4.

Command: ``python -m experiments.run --exp=run2``

Reproduces: batch 32, 10 epochs, Adam lr 1e-3, weight decay 1e-4, image size 256, the same
augmentation as run 1 (scale 0.05, angle 15, flip 0.5), Dice loss, lesion-weighted sampling,
baseline preprocessing, holdout split, constant learning rate.

Expected: validation mean per-patient DSC about 0.79 (the report measured **0.7925**; training
loss plateaued near 0.17). Four factors changed at once from run 1; ``ablation`` separates them.

Measured: not run yet (2026-11-26): at 256x256 one epoch takes over an hour on a
2-core CPU, and it has not run on a GPU yet; the number belongs here once it is run.
"""

from __future__ import annotations

from experiments.configs import run1
from unet_jax.config import Config


def get_config() -> Config:
    """The run-2 configuration."""
    return run1.get_config().replace(
        name="run2", batch_size=32, epochs=10, learning_rate=1e-3, weight_decay=1e-4
    )
