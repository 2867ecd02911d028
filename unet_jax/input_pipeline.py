"""Device-resident input pipeline: load a split once, then sample, normalise and augment on device.

The baseline spends its time in per-example CPU work (scikit-image resampling in the data
loader) and host-to-device copies. Here a split (LGG at 256x256 is ~0.75 GB as uint8) becomes
device arrays once; each step's batch is gathered, normalised, augmented (and resized when the
model's input size differs from the stored 256) inside the jitted train step, from a PRNG key.

Design:

* :class:`unet_jax.data.SplitData` (the reader's) holds a split on the host (numpy), in
  (patient, slice) order.
* :class:`ResidentData` puts it on the device mesh, **replicated**: every device holds the
  whole set and gathers only its own shard of each batch (the indices and the batch are
  sharded over the ``data`` axis), so a step needs no communication and no host round trip.
* Sampling is a pure function of ``(key, step)`` computed with global shapes, so the batches
  are identical on 1 or N devices (``jax_threefry_partitionable`` makes random bits independent
  of sharding). ``shuffle``: epoch ``e`` is the permutation ``permutation(fold_in(key, e), N)``,
  cut into ``N // batch`` batches (drop last, as the baseline's loader). ``weighted``: the
  baseline's sampler — a patient uniformly, then a slice with probability proportional to
  (lesion area + 10% of the patient's mean lesion area) — which is the same as drawing slice
  ``i`` of patient ``p`` with probability ``q_i / P`` in one draw over all slices.
* Normalisation is the baseline's per-volume channel standardisation, ``(x/255 - mean) / std``,
  applied *before* augmentation as the baseline does (its zero fill is zero in standardised
  units).
* :class:`StreamingData` serves training data over the device-memory budget: the host computes
  the same indices with the same sampler, grain reads those records from a random-access source
  (training passes :class:`HostRecords`: the split's host arrays, one record per slice) with
  several threads, a thread pool reads the next steps ahead, and the same pure
  :func:`prepare_batch`, jitted on its own, normalises, resizes and augments them with the same
  keys. The examples and augmentation draws are :class:`ResidentData`'s for the same seed; the
  values agree up to float rounding (the preparation is compiled apart from the train step).
  Validation is always resident (:func:`validation_data`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unet_jax import augment
from unet_jax.data import SplitData

DATA_AXIS = "data"


# ----------------------------------------------------------------------------- host data


class HostRecords:
    """A split's examples as TFDS-like record dicts, by random access: the source of
    :class:`StreamingData` when training streams a split held in host memory.

    Record ``i`` is example ``i`` with the keys of the built data set's examples (``image``,
    ``mask``, ``patient_id``, ``slice_index``, ``channel_mean``, ``channel_std``), so
    :func:`unet_jax.data.split_from_records` of the records gives the split back.
    """

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_examples

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = self.split.volume[i]
        return {
            "image": self.split.images[i],
            "mask": self.split.masks[i],
            "patient_id": self.split.patients[v],
            "slice_index": self.split.slice_index[i],
            "channel_mean": self.split.mean[v],
            "channel_std": self.split.std[v],
        }


def slice_probabilities(data: SplitData) -> np.ndarray:
    """The baseline's sampling probability of every slice (sums to 1).

    Within patient p with lesion areas ``a``: ``q = (a + 0.1 * mean(a)) / (1.1 * sum(a))``; the
    patient is drawn uniformly, so slice i has probability ``q_i / P``. A patient without any
    lesion (where the baseline's formula is 0/0) gets uniform slice weights.
    """
    area = data.masks.reshape(data.num_examples, -1).astype(np.float64).sum(1)
    probs = np.zeros(data.num_examples, np.float64)
    num_p = len(data.patients)
    for v in range(num_p):
        rows = data.volume_slices(v)
        if rows.size == 0:
            raise ValueError(f"patient {data.patients[v]} has no slices")
        a = area[rows]
        total = a.sum()
        q = (
            np.full(rows.size, 1.0 / rows.size)
            if total == 0
            else (a + total * 0.1 / a.size) / (total * 1.1)
        )
        probs[rows] = q / num_p
    return probs


# ----------------------------------------------------------------------------- mesh


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with the ``data`` axis."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static description of how batches are drawn (hashable: a jit static argument)."""

    num_examples: int
    batch_size: int
    sampling: str = "weighted"  # or "shuffle"

    def __post_init__(self):
        if self.sampling not in ("weighted", "shuffle"):
            raise ValueError(f"sampling must be 'weighted' or 'shuffle', got {self.sampling!r}")
        if self.sampling == "shuffle" and self.batch_size > self.num_examples:
            raise ValueError(
                f"batch size {self.batch_size} exceeds the {self.num_examples} examples "
                "(an epoch of shuffled batches would be empty)"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: as many examples as slices, last partial batch dropped (>= 1)."""
        return max(1, self.num_examples // self.batch_size)


def sample_indices(
    spec: SamplerSpec, key: jax.Array, step: jax.Array, log_probs: jax.Array | None
) -> jax.Array:
    """Global indices of the examples of ``step`` (pure, same result on any number of devices)."""
    if spec.sampling == "shuffle":
        epoch = step // spec.steps_per_epoch
        within = step % spec.steps_per_epoch
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), spec.num_examples)
        return jax.lax.dynamic_slice_in_dim(perm, within * spec.batch_size, spec.batch_size)
    step_key = jax.random.fold_in(key, step)
    return jax.random.categorical(step_key, log_probs, shape=(spec.batch_size,)).astype(jnp.int32)


# ----------------------------------------------------------------------------- device data


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Augmentation ranges and output size (hashable: a jit static argument)."""

    scale: float = 0.05
    angle: float = 15.0
    flip: float = 0.5
    image_size: int | None = None  # None: keep the stored size


def resize_batch(images: jax.Array, masks: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Resize a batch to ``size x size``: antialiased linear for images; masks by linear
    interpolation thresholded at 0.5, so they stay binary without nearest-neighbour aliasing."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images, masks
    images = jax.image.resize(images, (n, size, size, c), "linear", antialias=True)
    m = jax.image.resize(
        masks.astype(jnp.float32), (n, size, size, masks.shape[-1]), "linear", antialias=True
    )
    return images, (m >= 0.5).astype(masks.dtype)


def normalize(images_u8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """The baseline's per-volume channel standardisation of gathered slices."""
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - mean[:, None, None, :]) / std[:, None, None, :]


def prepare_batch(
    images_u8: jax.Array,
    masks: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    key: jax.Array,
    aug: AugmentSpec,
    train: bool,
) -> tuple[jax.Array, jax.Array]:
    """Normalise, resize and (training) augment gathered examples. Pure; runs inside jit."""
    x = normalize(images_u8, mean, std)
    y = masks.astype(jnp.float32)
    if aug.image_size is not None:
        x, y = resize_batch(x, y, aug.image_size)
    if train:
        x, y = augment.augment_batch(key, x, y, aug.scale, aug.angle, aug.flip)
    return x, y


class ResidentData:
    """A split held on the device mesh (replicated), with pure batch functions.

    The device arrays are in :attr:`arrays` (a dict pytree). Pass them as an *argument* of any
    jitted function that calls :meth:`train_batch` / :meth:`eval_batch` (``arrays=...``), so
    they are not baked into the compiled program as constants; called eagerly the methods use
    :attr:`arrays` themselves. Batches come back sharded over the ``data`` axis.
    """

    def __init__(
        self,
        data: SplitData,
        mesh: Mesh,
        batch_size: int,
        sampling: str = "weighted",
        aug: AugmentSpec = AugmentSpec(),
    ):
        if batch_size % mesh.size:
            raise ValueError(
                f"global batch {batch_size} is not divisible by the {mesh.size} devices"
            )
        self.data = data
        self.mesh = mesh
        self.aug = aug
        self.spec = SamplerSpec(data.num_examples, batch_size, sampling)
        with np.errstate(divide="ignore"):
            log_probs = np.log(slice_probabilities(data)).astype(np.float32)
        self.arrays = jax.device_put(
            {
                "images": data.images,
                "masks": data.masks,
                "volume": data.volume,
                "mean": data.mean,
                "std": data.std,
                "log_probs": log_probs,
            },
            replicated(mesh),
        )

    @property
    def num_eval_batches(self) -> int:
        return math.ceil(self.data.num_examples / self.spec.batch_size)

    def _gather(self, arrays: dict, idx: jax.Array) -> tuple[jax.Array, ...]:
        # Indices sharded over `data`: each device gathers its own rows from its full replica.
        idx = jax.lax.with_sharding_constraint(idx, batch_sharded(self.mesh))
        vol = arrays["volume"][idx]
        return arrays["images"][idx], arrays["masks"][idx], arrays["mean"][vol], arrays["std"][vol]

    def indices(
        self, key: jax.Array, step: int | jax.Array, arrays: dict | None = None
    ) -> jax.Array:
        """Global example indices of training step ``step`` (``key``: the sampling key)."""
        arrays = self.arrays if arrays is None else arrays
        return sample_indices(self.spec, key, jnp.asarray(step), arrays["log_probs"])

    def train_batch(
        self, key: jax.Array, step: int | jax.Array, arrays: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Augmented, normalised training batch of ``step`` (sampling and augmentation keys are
        both derived from ``key`` and ``step``)."""
        arrays = self.arrays if arrays is None else arrays
        sample_key, aug_key = jax.random.split(key)
        idx = self.indices(sample_key, step, arrays)
        images, masks, mean, std = self._gather(arrays, idx)
        return prepare_batch(
            images, masks, mean, std, jax.random.fold_in(aug_key, step), self.aug, train=True
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    def _eval_indices(self, b: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        bs = self.spec.batch_size
        pos = jnp.asarray(b) * bs + jnp.arange(bs)
        valid = pos < self.data.num_examples
        return jnp.where(valid, pos, 0).astype(jnp.int32), valid

    def eval_masks(self, b: int | jax.Array, arrays: dict | None = None) -> jax.Array:
        """The masks of :meth:`eval_batch` ``b`` at the stored size (float, N x H x W x 1)."""
        arrays = self.arrays if arrays is None else arrays
        idx, _ = self._eval_indices(b)
        return self._gather(arrays, idx)[1].astype(jnp.float32)

    def sampled_batch(
        self, key: jax.Array, i: int | jax.Array, arrays: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Batch ``i`` drawn by the training sampler from ``key``, prepared without
        augmentation (at the model's size): the validation loss's batches."""
        arrays = self.arrays if arrays is None else arrays
        images, masks, mean, std = self._gather(arrays, self.indices(key, i, arrays))
        return prepare_batch(images, masks, mean, std, key, self.aug, train=False)

    def eval_batch(
        self, b: int | jax.Array, arrays: dict | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Batch ``b`` of all slices in order, padded at the end; returns (images, masks, valid)."""
        arrays = self.arrays if arrays is None else arrays
        idx, valid = self._eval_indices(b)
        images, masks, mean, std = self._gather(arrays, idx)
        x, y = prepare_batch(images, masks, mean, std, jax.random.key(0), self.aug, train=False)
        return x, y, jax.lax.with_sharding_constraint(valid, batch_sharded(self.mesh))


def validation_data(
    split: SplitData, mesh: Mesh, batch_size: int, sampling: str, image_size: int | None
) -> ResidentData:
    """The validation split on the mesh as evaluation reads it: every slice in order
    (:meth:`ResidentData.eval_batch`), never augmented, resized to ``image_size`` (None: kept at
    the stored size); ``sampling`` draws the validation loss's batches
    (:meth:`ResidentData.sampled_batch`)."""
    return ResidentData(split, mesh, batch_size, sampling, AugmentSpec(0, 0, 0, image_size))


class StreamingData:
    """:class:`ResidentData`'s training batches (same examples, same augmentation draws), read
    from a random-access source with grain instead of from device memory.

    For data sets larger than the device-memory budget: the host computes each step's indices
    with the same pure sampler, grain reads those records (``source[i]`` -> dict with ``image``,
    ``mask``, ``channel_mean``, ``channel_std``) with ``num_threads`` threads, and the batch is
    put on the mesh sharded over ``data`` and prepared by :func:`prepare_batch`, jitted here on
    its own (so values match the resident path's up to float rounding). :meth:`iterate` reads
    the next ``prefetch`` steps ahead on a thread pool. Training only: no evaluation batches.
    """

    def __init__(
        self,
        source: Any,
        index: SplitData,
        mesh: Mesh,
        batch_size: int,
        sampling: str = "weighted",
        aug: AugmentSpec = AugmentSpec(),
        rows: np.ndarray | None = None,
        num_threads: int = 8,
        prefetch: int = 2,
    ):
        """``index`` is a SplitData used for its metadata (masks for the sampling weights);
        ``rows[i]`` is the source record of example ``i`` (default: identity)."""
        self.source = source
        self.mesh = mesh
        self.aug = aug
        self.spec = SamplerSpec(index.num_examples, batch_size, sampling)
        self.rows = np.arange(index.num_examples) if rows is None else np.asarray(rows)
        with np.errstate(divide="ignore"):
            self.log_probs = jnp.asarray(np.log(slice_probabilities(index)).astype(np.float32))
        self.num_threads = num_threads
        self.prefetch = prefetch
        self._indices = jax.jit(partial(sample_indices, self.spec))
        self._prepare = jax.jit(
            partial(prepare_batch, aug=aug, train=True), out_shardings=batch_sharded(mesh)
        )

    def indices(self, key: jax.Array, step: int) -> jax.Array:
        return self._indices(key, jnp.asarray(step), self.log_probs)

    def _read(self, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        import grain

        ds = grain.MapDataset.source([int(self.rows[i]) for i in idx]).map(lambda r: self.source[r])
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=len(idx))
        )
        recs = list(it)
        images = np.stack([np.asarray(r["image"], np.uint8) for r in recs])
        masks = np.stack(
            [np.asarray(r["mask"], np.uint8).reshape(images.shape[1:3] + (1,)) for r in recs]
        )
        mean = np.stack([np.asarray(r["channel_mean"], np.float32) for r in recs])
        std = np.stack([np.asarray(r["channel_std"], np.float32) for r in recs])
        return images, masks, mean, std

    def train_batch(self, key: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
        sample_key, aug_key = jax.random.split(key)
        idx = np.asarray(self.indices(sample_key, step))
        shard = batch_sharded(self.mesh)
        arrays = [jax.device_put(a, shard) for a in self._read(idx)]
        return self._prepare(*arrays, jax.random.fold_in(aug_key, step))

    def iterate(
        self, key: jax.Array, start: int, stop: int
    ) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Batches of steps ``start..stop-1``, the next one read while the current one is used."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, self.prefetch)) as pool:
            pending = [
                pool.submit(self.train_batch, key, s)
                for s in range(start, min(stop, start + self.prefetch))
            ]
            for s in range(start, stop):
                batch = pending.pop(0).result()
                nxt = s + self.prefetch
                if nxt < stop:
                    pending.append(pool.submit(self.train_batch, key, nxt))
                yield batch


def fits_on_device(data: SplitData, budget_gb: float | None) -> bool:
    """Whether the resident path is used: no budget given, or the arrays fit in it."""
    return budget_gb is None or data.nbytes() <= budget_gb * 2**30
