"""A quick run on the real data that fits a 2-core CPU: half resolution, half width, 7 epochs.

Command: ``python -m experiments.run --exp=cpu_quick``

Real LGG data with the baseline's preprocessing and its 10 validation patients, resized on
device to 128x128; U-Net with 16 initial features (~1.9M parameters); batch 16;
weight decay 1e-4; lr 1e-3 with a cosine schedule after half an epoch of warm-up; 7 epochs; Dice loss;
lesion-weighted sampling; the baseline's augmentation (0.05 / 15 / 0.5).

Cost estimate: ~1.5 GFLOP forward per 128x128 image at 16 features (24 GFLOP at 256 and 32
features, / 4 for the width, / 4 for the pixels), ~4.5 GFLOP per training image, ~15 TFLOP per
epoch of 3,336 slices (1,456 steps of batch 16 in all).

Expected (target): validation mean per-patient DSC >= 0.80 in under 30 minutes of training on
2 CPU cores (the report's run 1 reached 0.8093 at full size after 7 x 40 minutes).

Measured: 2026-11-26, this project's 2-core Intel Xeon VM, CPU only, jax 0.10.2,
``python -m experiments.run --exp=cpu_quick --data_dir D``: best validation mean per-patient DSC
**0.9006** after LCC (median 0.915; 0.860 without LCC), reached at epoch 6; per epoch 0.403, 0.666,
0.878, 0.894, 0.806, 0.901, 0.900. Throughput on the idle machine 15 images/s (1.07 s/step), i.e.
~26 minutes of training for the 1,456 steps; the measured wall time was 40 minutes because other
jobs shared the 2 cores for most of the run. Per patient (DSC after LCC): CS_4944 0.894, CS_6667
0.929, CS_6668 0.926 (the report's worst, DSC 0 there), DU_5851 0.928, DU_6404 0.910, DU_6408
0.918, DU_7014 0.911, HT_7616 0.762, HT_7692 0.916, HT_7879 0.913.
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
