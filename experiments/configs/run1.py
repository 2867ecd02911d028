"""Run 1 of the earlier PyTorch report (its Table 1), on the baseline's 10 validation patients.

Command: ``python -m experiments.run --exp=run1``

Reproduces: batch 16, 7 epochs, Adam lr 3e-4, no weight decay, image size 256, augmentation
scale 0.05 / angle 15 / horizontal flip 0.5, Dice loss, the baseline's lesion-weighted sampling,
baseline preprocessing (``dataset_config="baseline"``), holdout split, constant learning rate.

Expected: validation mean per-patient DSC about 0.81 (the report measured **0.8093**; training
loss plateaued near 0.12 after ~800 steps). The report's epochs took ~40 min each on its machine.

Measured: not run yet (2026-11-26): at 256x256 one epoch takes over an hour on a
2-core CPU, and it has not run on a GPU yet; the number belongs here once it is run.
"""

from __future__ import annotations

from unet_jax.config import Config


def get_config() -> Config:
    """The run-1 configuration: the baseline's defaults with 7 epochs at lr 3e-4."""
    return Config(name="run1", epochs=7, learning_rate=3e-4)
