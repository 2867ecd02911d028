"""The baseline's (brain-segmentation-pytorch) training data path, written for this project.

What the baseline does, kept as it is (including what makes it slow):

- a ``torch.utils.data.Dataset`` over preprocessed volumes held in memory, one
  ``(volume (Z, H, W, 3) float standardised, mask (Z, H, W, 1) in {0, 1})`` pair per patient;
- ``len(dataset)`` is the total number of slices, so an epoch has as many examples as slices;
- with ``random_sampling`` each ``__getitem__`` ignores its index: it draws a patient uniformly with
  NumPy's global generator, then a slice of that patient with probability proportional to the
  slice's lesion area plus 10% of the patient's mean lesion area (:func:`slice_weights`);
- per example, on the CPU, scikit-image augmentation in three separate resampling passes
  (:class:`Scale`: ``rescale`` then centre-crop / zero-pad back; :class:`Rotate`: ``rotate`` about
  the centre with zero fill; :class:`HorizontalFlip`), each drawing its parameter from NumPy's
  global generator;
- HWC -> CHW float32 tensors, batched by a ``DataLoader(shuffle=True, drop_last=True)`` whose
  worker processes seed NumPy with ``42 + worker_id`` (:func:`worker_init`).

The deterministic cores :func:`scale_pair`, :func:`rotate_pair` and :func:`flip_pair` take the
parameter explicitly so tests can compare them with :mod:`unet_jax.augment` under the same
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from skimage.transform import rescale, rotate
from torch.utils.data import DataLoader, Dataset

Sample = tuple[np.ndarray, np.ndarray]
Volume = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- transforms


def scale_pair(image: np.ndarray, mask: np.ndarray, s: float) -> Sample:
    """Zoom by ``s`` about the centre, keeping the size: rescale, then zero-pad or centre-crop.

    Images use ``rescale``'s default order 1, masks order 0; no anti-aliasing, constant (zero)
    mode, range preserved — the baseline's arguments. When the rescaled size differs from the
    original by an odd number of pixels the extra pixel is padded after / cropped after, as the
    baseline does (``floor`` before, ``ceil`` after; crop start ``(new - old) // 2``).
    """
    height, width = image.shape[:2]
    image = rescale(
        image, (s, s), channel_axis=-1, preserve_range=True, mode="constant", anti_aliasing=False
    )
    mask = rescale(
        mask,
        (s, s),
        order=0,
        channel_axis=-1,
        preserve_range=True,
        mode="constant",
        anti_aliasing=False,
    )
    if s < 1.0:
        dh = (height - image.shape[0]) / 2.0
        dw = (width - image.shape[1]) / 2.0
        pad = (
            (int(np.floor(dh)), int(np.ceil(dh))),
            (int(np.floor(dw)), int(np.ceil(dw))),
            (0, 0),
        )
        image = np.pad(image, pad, mode="constant", constant_values=0)
        mask = np.pad(mask, pad, mode="constant", constant_values=0)
    else:
        y0 = (image.shape[0] - height) // 2
        x0 = (image.shape[1] - width) // 2
        image = image[y0 : y0 + height, x0 : x0 + width, ...]
        mask = mask[y0 : y0 + height, x0 : x0 + width, ...]
    return image, mask


def rotate_pair(image: np.ndarray, mask: np.ndarray, angle: float) -> Sample:
    """Rotate by ``angle`` degrees (counter-clockwise) about the centre, zero fill, same size.

    Images bilinear (``rotate``'s default order 1), masks nearest neighbour.
    """
    image = rotate(image, angle, resize=False, preserve_range=True, mode="constant")
    mask = rotate(mask, angle, resize=False, order=0, preserve_range=True, mode="constant")
    return image, mask


def flip_pair(image: np.ndarray, mask: np.ndarray) -> Sample:
    """Mirror left-right (copies, as the baseline makes them, so tensors get contiguous memory)."""
    return np.fliplr(image).copy(), np.fliplr(mask).copy()


class Scale:
    """Random zoom with factor ~ U[1 - scale, 1 + scale] (NumPy global generator)."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, sample: Sample) -> Sample:
        s = np.random.uniform(low=1.0 - self.scale, high=1.0 + self.scale)
        return scale_pair(*sample, s)


class Rotate:
    """Random rotation with angle ~ U[-angle, angle] degrees (NumPy global generator)."""

    def __init__(self, angle: float):
        self.angle = angle

    def __call__(self, sample: Sample) -> Sample:
        a = np.random.uniform(low=-self.angle, high=self.angle)
        return rotate_pair(*sample, a)


class HorizontalFlip:
    """Left-right flip with probability ``flip_prob`` (the baseline's test: skip if rand() > p)."""

    def __init__(self, flip_prob: float):
        self.flip_prob = flip_prob

    def __call__(self, sample: Sample) -> Sample:
        if np.random.rand() > self.flip_prob:
            return sample
        return flip_pair(*sample)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


def transforms(
    scale: float | None = None, angle: float | None = None, flip_prob: float | None = None
) -> Compose:
    """The baseline's augmentation: Scale, then Rotate, then HorizontalFlip (each only if given)."""
    ts: list[Callable[[Sample], Sample]] = []
    if scale is not None:
        ts.append(Scale(scale))
    if angle is not None:
        ts.append(Rotate(angle))
    if flip_prob is not None:
        ts.append(HorizontalFlip(flip_prob))
    return Compose(ts)


# ----------------------------------------------------------------------------- dataset


def slice_weights(mask_volume: np.ndarray) -> np.ndarray:
    """Sampling probability of each slice of one patient: ``(s + 0.1 * mean(s)) / (1.1 * sum(s))``.

    ``s`` is the per-slice mask sum, so the weights sum to 1; a slice without lesion keeps a
    small chance. For a volume without any lesion the baseline's formula is 0/0 (NaN, and NumPy
    then refuses to sample); here such a volume falls back to uniform weights instead.
    """
    s = mask_volume.reshape(mask_volume.shape[0], -1).sum(axis=1).astype(np.float64)
    total = s.sum()
    if total <= 0:
        return np.full(len(s), 1.0 / len(s))
    return (s + total * 0.1 / len(s)) / (total * 1.1)


class BaselineDataset(Dataset):
    """The baseline's training/validation dataset over in-memory volumes.

    Args:
      volumes: one ``(image (Z, H, W, C) float, mask (Z, H, W, 1) in {0, 1})`` pair per patient.
      transform: callable on ``(image, mask)`` HWC arrays, e.g. :func:`transforms`; None for none.
      random_sampling: draw (patient, slice) at random per item (training) instead of using the
        index (validation).

    Items are ``(image (C, H, W) float32 tensor, mask (1, H, W) float32 tensor)``.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        transform: Callable[[Sample], Sample] | None = None,
        random_sampling: bool = True,
    ):
        self.volumes = list(volumes)
        self.transform = transform
        self.random_sampling = random_sampling
        self.patient_slice_index = [
            (p, z) for p, (v, _) in enumerate(self.volumes) for z in range(v.shape[0])
        ]
        self.slice_weights = [slice_weights(m) for _, m in self.volumes]

    def __len__(self) -> int:
        return len(self.patient_slice_index)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        patient, z = self.patient_slice_index[idx]
        if self.random_sampling:
            patient = np.random.randint(len(self.volumes))
            z = np.random.choice(
                range(self.volumes[patient][0].shape[0]), p=self.slice_weights[patient]
            )
        volume, mask_volume = self.volumes[patient]
        image, mask = volume[z], mask_volume[z]
        if self.transform is not None:
            image, mask = self.transform((image, mask))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32))
        mask = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1), np.float32))
        return image, mask


def worker_init(worker_id: int) -> None:
    """Seed NumPy's global generator in each DataLoader worker (the baseline's ``42 + id``)."""
    np.random.seed(42 + worker_id)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    *,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """The baseline's training loader: shuffled, incomplete last batch dropped.

    ``multiprocessing_context`` (e.g. ``"spawn"``) is for callers that already run JAX in the same
    process: the default on Linux forks workers, which is unsafe once JAX has started its threads.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=worker_init,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
        multiprocessing_context=multiprocessing_context if workers > 0 else None,
    )


# ----------------------------------------------------------------------------- building volumes


def volumes_from_slices(
    images: np.ndarray,
    masks: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    channel_mean: np.ndarray | None = None,
    channel_std: np.ndarray | None = None,
) -> list[Volume]:
    """Group per-slice arrays into the baseline's per-patient volumes.

    Args:
      images: (N, H, W, C) slices. uint8 (the TFDS ``image`` feature) are normalised as
        ``(image / 255 - channel_mean) / channel_std``; float images are taken as already
        standardised.
      masks: (N, H, W) or (N, H, W, 1), nonzero = lesion.
      patient_ids: (N,) patient of each slice; slices of a patient keep their order, patients
        come in order of first appearance.
      channel_mean, channel_std: (N, C) per-slice (i.e. per-volume) statistics, needed for uint8.

    Returns:
      ``[(volume float32 (Z, H, W, C), mask float32 (Z, H, W, 1) in {0, 1}), ...]``
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    if masks.ndim == 3:
        masks = masks[..., None]
    ids = np.asarray(patient_ids)
    if images.dtype == np.uint8:
        if channel_mean is None or channel_std is None:
            raise ValueError("uint8 images need channel_mean and channel_std")
        mean = np.asarray(channel_mean, np.float32)[:, None, None, :]
        std = np.asarray(channel_std, np.float32)[:, None, None, :]
        images = (images.astype(np.float32) / 255.0 - mean) / std
    images = images.astype(np.float32, copy=False)
    masks = (masks > 0).astype(np.float32)
    _, first = np.unique(ids, return_index=True)
    volumes = []
    for start in sorted(first):
        sel = ids == ids[start]
        volumes.append((images[sel], masks[sel]))
    return volumes


def synthetic_volumes(
    num_patients: int = 4,
    slices: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> list[Volume]:
    """Stand-in volumes for timing: :func:`unet_jax.synthetic.disc_volume` (noisy discs, disc
    lesions in the middle slices, so every patient's slice weights are defined), standardised per
    volume as the baseline's preprocessing does."""
    from unet_jax.preprocess import channel_stats_uint8
    from unet_jax.synthetic import disc_volume

    rng = np.random.default_rng(seed)
    volumes = []
    for _ in range(num_patients):
        images, masks = disc_volume(rng, slices, image_size)
        mean, std = channel_stats_uint8(images)
        volumes += volumes_from_slices(
            images,
            masks,
            np.zeros(slices, np.int32),
            np.repeat(mean[None], slices, axis=0),
            np.repeat(std[None], slices, axis=0),
        )
    return volumes
