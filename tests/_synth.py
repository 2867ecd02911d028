"""Small in-memory data for fast tests (no TFDS): bright blobs on noisy backgrounds; and the
tiny training configuration the training tests use with it."""

import numpy as np

from unet_jax.config import Config
from unet_jax.input_pipeline import SplitData


def blob_split(num_patients=3, slices=6, size=32, seed=0, prefix="P") -> SplitData:
    """A SplitData whose lesion is a bright disc in FLAIR (channel 1) on some slices."""
    rng = np.random.RandomState(seed)
    images, masks, volume, slice_index = [], [], [], []
    yy, xx = np.mgrid[:size, :size]
    for p in range(num_patients):
        cy, cx = rng.randint(size // 4, 3 * size // 4, 2)
        for s in range(slices):
            img = rng.randint(20, 90, (size, size, 3)).astype(np.uint8)
            m = np.zeros((size, size), np.uint8)
            if 0 < s < slices - 1:
                r = size / 8 + s % 3
                m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8)
                img[..., 1] = np.where(m > 0, 220, img[..., 1])
            images.append(img)
            masks.append(m[..., None])
            volume.append(p)
            slice_index.append(s + 1)
    images = np.stack(images)
    volume = np.array(volume, np.int32)
    mean = np.stack([(images[volume == p] / 255.0).mean((0, 1, 2)) for p in range(num_patients)])
    std = np.stack([(images[volume == p] / 255.0).std((0, 1, 2)) for p in range(num_patients)])
    return SplitData(images, np.stack(masks), volume, np.array(slice_index, np.int32),
                     mean.astype(np.float32), std.astype(np.float32),
                     tuple(f"{prefix}{p:02d}" for p in range(num_patients)))


def blob_train_val() -> tuple[SplitData, SplitData]:
    """The training tests' data: 4 training patients ("T00"..) and 2 validation patients
    ("V00", "V01") of 8 slices of 32x32, seeds 0 and 1."""
    return blob_split(4, 8, 32, 0, "T"), blob_split(2, 8, 32, 1, "V")


def tiny_config(name: str, **fields) -> Config:
    """A 4-feature U-Net on 32x32 inputs, batch 8, lr 3e-3, no report; ``fields`` set the rest."""
    return Config(name=name, features=4, image_size=32, batch_size=8, learning_rate=3e-3,
                  write_report=False, **fields)
