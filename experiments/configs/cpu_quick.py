"""A quick run on the real data that fits a 2-core CPU: half resolution, half width, 12 epochs.

Command: ``python -m experiments.run --exp=cpu_quick``

Real LGG data with the baseline's preprocessing and its 10 validation patients, resized on
device to 128x128; U-Net with 16 initial features (~1.9M parameters); batch 16;
weight decay 1e-4; lr 1e-3 with a cosine schedule after one warm-up epoch; 12 epochs; Dice loss;
lesion-weighted sampling; the baseline's augmentation (0.05 / 15 / 0.5).

Cost estimate: ~1.5 GFLOP forward per 128x128 image at 16 features (24 GFLOP at 256 and 32
features, / 4 for the width, / 4 for the pixels), ~4.5 GFLOP per training image, ~15 TFLOP per
epoch of 3,336 slices: 12 epochs in 30 minutes need ~100 GFLOP/s sustained on 2 cores, so
``epochs`` (or ``features``) may have to come down after the first timing.

Expected (target): validation mean per-patient DSC >= 0.80 in under 30 minutes of training on
2 CPU cores (the report's run 1 reached 0.8093 at full size after 7 x 40 minutes).

Measured: (to be filled)
"""

from __future__ import annotations

from unet_jax.config import Config


def get_config() -> Config:
    """The CPU quick-run configuration."""
    return Config(
        name="cpu_quick",
        source="lgg",
        dataset_config="baseline",
        image_size=128,
        split="holdout",
        sampling="weighted",
        aug_scale=0.05,
        aug_angle=15.0,
        aug_flip=0.5,
        features=16,
        batch_size=16,
        epochs=7,
        learning_rate=1e-3,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.5,
        final_lr_fraction=0.0,
        loss="dice",
    )
