"""The PyTorch baseline's (brain-segmentation-pytorch) default recipe, unchanged.

Command: ``python -m experiments.run --exp=baseline``

Reproduces: U-Net with 32 initial features, Adam lr 1e-4 constant, no weight decay, batch 16,
100 epochs, Dice loss (smooth 1, over the whole batch), lesion-weighted sampling, augmentation
scale 0.05 / angle 15 / flip 0.5, image size 256, baseline preprocessing, the baseline's 10
validation patients (holdout split); the best checkpoint by mean per-patient DSC after LCC is kept.

Expected: the baseline publishes mean DSC 0.91 (median 0.92) on these 10 patients (selected on
the same cases, so optimistic); the project's goal is >= 0.91 here.

Measured: the DSC is not measured yet (2026-11-26): at 256x256 one epoch takes over an hour on the
2-core CPU, and the one GPU measurement so far could not receive the real data (its
transfer limit). Time, measured there on synthetic data of the same size with this recipe
(``python -m benchmarks.full_epoch --exp baseline --epochs 5``, one NVIDIA H200): 2.8 s per
training epoch in float32 (1.6 s with ``--set dtype=bfloat16``); with bfloat16 each evaluation
and checkpoint adds 1.4 s, and the 100 epochs project to 5.5 minutes (float32: about 7.5, taking
the same evaluation cost) where the report's CPU needed 40 minutes per epoch.
"""

from __future__ import annotations

from unet_jax.config import Config


def get_config() -> Config:
    """The baseline's default configuration: :class:`Config`'s defaults are the baseline's own
    (batch 16, 100 epochs, Adam lr 1e-4, no weight decay, weighted sampling, augmentation
    0.05 / 15 / 0.5, Dice loss, 32 features, 256x256, baseline preprocessing, holdout split)."""
    return Config(name="baseline")
