"""Run 1 of the student's report (its Table 1), on the baseline's 10 validation patients.

Command: ``python -m experiments.run --exp=run1``

Reproduces: batch 16, 7 epochs, Adam lr 3e-4, no weight decay, image size 256, augmentation
scale 0.05 / angle 15 / horizontal flip 0.5, Dice loss, the baseline's lesion-weighted sampling,
baseline preprocessing (``dataset_config="baseline"``), holdout split, constant learning rate.

Expected: validation mean per-patient DSC about 0.81 (the report measured **0.8093**; training
loss plateaued near 0.12 after ~800 steps). The report's epochs took ~40 min each on its machine.

Measured: (to be filled)
"""

from __future__ import annotations

from unet_jax.config import Config


def get_config() -> Config:
    """The run-1 configuration."""
    return Config(
        name="run1",
        dataset_config="baseline",
        source="lgg",
        image_size=256,
        split="holdout",
        sampling="weighted",
        aug_scale=0.05,
        aug_angle=15.0,
        aug_flip=0.5,
        batch_size=16,
        epochs=7,
        learning_rate=3e-4,
        weight_decay=0.0,
        schedule="constant",
        loss="dice",
    )
