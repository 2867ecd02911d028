"""Small in-memory data for fast tests (no TFDS): bright blobs on noisy backgrounds."""

import numpy as np

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
