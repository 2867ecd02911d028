"""A quick run on the real data that fits a 2-core CPU: half resolution, half width, 7 epochs.

Command: ``python -m experiments.run --exp=cpu_quick``

Real LGG data with the baseline's preprocessing and its 10 validation patients, resized on
device to 128x128; U-Net with 16 initial features (~1.9M parameters); batch 16;
weight decay 1e-4; lr 1e-3 with a cosine schedule after half an epoch of warm-up; 7 epochs; Dice loss;
lesion-weighted sampling; the baseline's augmentation (0.05 / 15 / 0.5).

Cost estimate: ~1.5 GFLOP forward per 128x128 image at 16 features (24 GFLOP at 256 and 32
features, / 4 for the width, / 4 for the pixels), ~4.5 GFLOP per training image, ~15 TFLOP per
epoch of 3,336 slices (1,456 steps of batch 16 in all).

Expected: validation mean per-patient DSC about 0.90 (the goal: 0.90 within 10 minutes end to
end on a 2-core CPU; the report's run 1 reached 0.8093 at full size after 7 x 40 minutes).

Measured: 2026-12-05, a 2-core Intel Xeon VM, CPU only, Python 3.12 / jax 0.12.0.1,
``python -m experiments.run --exp=cpu_quick --manual_dir M --data_dir D`` (lossless data),
evaluated at the stored 256x256 (probabilities resized bilinearly, then thresholded): best
validation mean per-patient DSC **0.8966** after LCC at epoch 6 (median 0.910; HD95 mean 1.69,
median 1.21 voxels); per epoch 0.582, 0.767, 0.868, 0.803, 0.896, 0.897, 0.896. With TTA 0.8992.
26 min 44 s end to end including the data-set build (the cores were partly shared with other
work). Its best checkpoint is the packaged model ``lgg-cpu-quick-128`` (``unet_jax/weights``).
Earlier measurements (jax 0.10.2: 0.8975 in 26-32 min; an AMD EPYC with jax 0.12: 0.8964 in
13 min 25 s): ``benchmarks/RESULTS.md``.
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
