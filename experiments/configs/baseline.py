"""The PyTorch baseline's (brain-segmentation-pytorch) default recipe, unchanged.

Command: ``python -m experiments.run --exp=baseline``

Reproduces: U-Net with 32 initial features, Adam lr 1e-4 constant, no weight decay, batch 16,
100 epochs, Dice loss (smooth 1, over the whole batch), lesion-weighted sampling, augmentation
scale 0.05 / angle 15 / flip 0.5, image size 256, baseline preprocessing, the baseline's 10
validation patients (holdout split); the best checkpoint by mean per-patient DSC after LCC is kept.

Expected: the baseline publishes mean DSC 0.91 (median 0.92) on these 10 patients (selected on
the same cases, so optimistic); the project's goal is >= 0.91 here.

Measured: (to be filled)
"""

from __future__ import annotations

from unet_jax.config import Config


def get_config() -> Config:
    """The baseline's default configuration."""
    return Config(
        name="baseline",
        dataset_config="baseline",
        source="lgg",
        image_size=256,
        split="holdout",
        sampling="weighted",
        aug_scale=0.05,
        aug_angle=15.0,
        aug_flip=0.5,
        features=32,
        batch_size=16,
        epochs=100,
        learning_rate=1e-4,
        weight_decay=0.0,
        schedule="constant",
        loss="dice",
    )
