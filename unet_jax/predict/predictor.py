"""The batching predictor of ``unet_jax.predict``: a loaded model with its preprocessing.

A predictor holds one model or several (an ensemble: the folds of ``cv5``, several seeds) that
preprocess alike; the probabilities it thresholds are the members' mean, each with test-time
augmentation when asked (:mod:`unet_jax.tta`, the implementation evaluation uses). They are
resized bilinearly back to each slice's own geometry and thresholded there.

Flax, the model and the input pipeline are imported when a :class:`Predictor` is made, not with
this module, so that the command line answers ``--help`` or a bad input without them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from unet_jax import metrics, preprocess
from unet_jax.lgg import SLICE_SIZE
from unet_jax.predict.inputs import LoadedVolume, PredictError

__all__ = [
    "ENSEMBLE_FIELDS",
    "VolumePrediction",
    "Predictor",
    "load_checkpoint",
    "load_checkpoints",
    "check_ensemble",
]

#: Config fields the checkpoints of an ensemble must agree on: what the model input is made of
#: (preprocessing, its size, channels) and what its output is.
ENSEMBLE_FIELDS = ("dataset_config", "image_size", "in_channels", "out_channels")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class _Prepared:
    """A volume in model-input form, waiting for (and then holding) its predictions."""

    loaded: LoadedVolume
    images: np.ndarray  # (Z, S, S', 3) uint8 at the stored resolution
    masks: np.ndarray  # (Z, S, S', 1) uint8 in {0, 1}
    mean: np.ndarray  # (3,) float32
    std: np.ndarray  # (3,) float32
    geometry: preprocess.VolumeGeometry | None  # None: nothing left to predict (empty masks)
    prob: np.ndarray | None = None  # (Z, s, s) float32 at the model's resolution
    pred: np.ndarray | None = None  # (Z, S, S') bool at the stored resolution (the evaluation's)
    done: int = 0

    @property
    def num_model_slices(self) -> int:
        return int(self.images.shape[0])

    @property
    def complete(self) -> bool:
        return self.done == self.num_model_slices


@dataclasses.dataclass
class VolumePrediction:
    """The result for one volume.

    Attributes:
      loaded: the input volume.
      mask: (N, H, W) bool, the output masks in the input geometry (after LCC unless disabled).
      processed: (N,) bool, slices that went through the model.
      metrics: the volume's numbers (see ``unet_jax.predict.export.CSV_FIELDS``); metric keys
        only with ground truth.
      probabilities: (Z, s, s) float32, the probabilities of the processed slices at the model's
        resolution (the mean over the TTA flips and the ensemble), before they are mapped back;
        None when no slice was processed.
      geometry: where the processed slices come from (None when none was).
    """

    loaded: LoadedVolume
    mask: np.ndarray
    processed: np.ndarray
    metrics: dict[str, Any]
    probabilities: np.ndarray | None = None
    geometry: preprocess.VolumeGeometry | None = None


class Predictor:
    """Loaded models with their preprocessing, predicting volumes in jitted, padded batches.

    ``model`` is one model or a sequence of them (an ensemble, whose probabilities are averaged;
    they share ``config``'s preprocessing: see :func:`load_checkpoints`). With ``tta`` each
    member's probabilities are the mean over :data:`unet_jax.tta.TTA_FLIPS`.

    A slice's mask is its probabilities resized bilinearly to the slice's own geometry
    (:func:`preprocess.restore_prediction` with ``method="linear"``), then ``>= threshold``.
    The ``*_model`` metrics are the training evaluation's, computed as it does
    (``unet_jax.evaluate.make_predict_step``): against the stored masks, the probabilities
    resized bilinearly to the stored size on the device and thresholded there (one model
    without TTA whose input is the stored size: ``logits >= logit(threshold)``).

    Batches are filled across volumes in order; a last, partial batch is padded to the next
    power of two (at most ``batch_size``), so at most ``log2(batch_size) + 1`` programs compile.
    """

    def __init__(
        self,
        model,
        config,
        *,
        threshold: float | None = None,
        lcc: bool = True,
        batch_size: int = 16,
        tta: bool = False,
    ):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from unet_jax import tta as tta_module
        from unet_jax.input_pipeline import AugmentSpec, prepare_batch

        members = list(model) if isinstance(model, Sequence) else [model]
        if not members:
            raise PredictError("no model to predict with")
        self.config = config
        self.tta = bool(tta)
        self.num_models = len(members)
        self.threshold = float(config.threshold if threshold is None else threshold)
        try:
            logit_threshold = metrics.logit_threshold(self.threshold)  # the evaluation's rule
        except ValueError as e:
            raise PredictError(str(e)) from None
        if batch_size < 1:
            raise PredictError(f"batch size must be at least 1, got {batch_size}")
        if config.dataset_config not in preprocess.MODES:
            raise PredictError(
                f"the checkpoint's dataset_config {config.dataset_config!r} is not "
                "one predict knows (baseline, raw)"
            )
        if config.in_channels != 3 or config.out_channels != 1:
            raise PredictError(
                f"the checkpoint's model has {config.in_channels} input and "
                f"{config.out_channels} output channels; predict needs 3 and 1"
            )
        if config.image_size < 16 or config.image_size % 16:
            raise PredictError(
                f"the checkpoint's image_size {config.image_size} is not a positive multiple "
                "of 16 (the U-Net halves it four times)"
            )
        self.lcc = lcc
        self.batch_size = int(batch_size)
        self.size = int(config.image_size)
        aug = AugmentSpec(0.0, 0.0, 0.0, self.size)
        graphdefs, states = zip(*(nnx.split(m) for m in members))
        self._states = jax.device_put(tuple(states))
        plain = self.num_models == 1 and not self.tta
        prob_threshold = np.float32(self.threshold)

        def step(states, images, masks, mean, std):
            # Exactly the evaluation's batch preparation: normalise, resize on device.
            x, _ = prepare_batch(images, masks, mean, std, jax.random.key(0), aug, train=False)
            apply_fns = [
                (lambda v, g=g, s=s: nnx.merge(g, s)(v)) for g, s in zip(graphdefs, states)
            ]
            stored = images.shape[1:3]
            if plain and x.shape[1:3] == stored:
                # The evaluation's rule: the logits thresholded (exactly sigmoid >= t).
                logits = apply_fns[0](x)
                prob = tta_module.probabilities(lambda _: logits, x)
                pred = logits[..., 0] >= logit_threshold
            else:
                prob = tta_module.average_probabilities(apply_fns, x, self.tta)
                pred = preprocess.resize_probabilities(prob, stored)[..., 0] >= prob_threshold
            return prob[..., 0].astype(jnp.float32), pred

        self._step = jax.jit(step)
        self.device = str(jax.devices()[0])

    # -- preprocessing ---------------------------------------------------------------------
    def prepare(self, loaded: LoadedVolume) -> tuple[_Prepared, list[str]]:
        """The volume as the model's training data stored it (:func:`preprocess.prepare_volume`
        with the checkpoint's data-set config); notices for what differs from training."""
        n = loaded.images.shape[0]
        notices = []
        mode = self.config.dataset_config
        # The baseline's rule would leave nothing of a volume of fewer than 3 slices.
        drop_ends = n >= 3
        if mode == "baseline" and not drop_ends:
            notices.append(
                f"{loaded.spec.name}: {n} slice(s): preprocessed without dropping "
                "the first and last slice (the baseline drops them)"
            )
        try:
            volume = preprocess.prepare_volume(
                loaded.images, loaded.truth.astype(np.uint8), mode, drop_ends=drop_ends
            )
        except ValueError as e:  # all zeros after the baseline's threshold
            notices.append(f"{loaded.spec.name}: {e}; its masks are empty")
            empty = np.zeros((0, SLICE_SIZE, SLICE_SIZE, 3), np.uint8)
            return _Prepared(
                loaded, empty, empty[..., :1], np.zeros(3, np.float32), np.ones(3, np.float32), None
            ), notices
        return _Prepared(
            loaded,
            volume.image,
            volume.mask[..., None],
            volume.channel_mean,
            self._safe_std(volume.channel_std, loaded, notices),
            volume.geometry,
        ), notices

    @staticmethod
    def _safe_std(std: np.ndarray, loaded: LoadedVolume, notices: list[str]) -> np.ndarray:
        # A constant channel has std 0: standardising would divide by zero. Its standardised
        # value is then 0 everywhere (x - mean = 0), as with std 1.
        bad = ~(np.isfinite(std) & (std > 0))
        if bad.any():
            notices.append(
                f"{loaded.spec.name}: channel(s) {np.flatnonzero(bad).tolist()} are "
                "constant over the volume; standardised with std 1"
            )
            std = np.where(bad, np.float32(1), std).astype(np.float32)
        return std

    # -- the model ---------------------------------------------------------------------------
    def _run(self, chunks: list[tuple[_Prepared, int, int]], pad_to: int) -> None:
        """Predict the rows ``[start, stop)`` of each chunk as one batch padded to ``pad_to``."""
        import jax

        images = np.concatenate([p.images[a:b] for p, a, b in chunks])
        masks = np.concatenate([p.masks[a:b] for p, a, b in chunks])
        mean = np.concatenate([np.broadcast_to(p.mean, (b - a, 3)) for p, a, b in chunks])
        std = np.concatenate([np.broadcast_to(p.std, (b - a, 3)) for p, a, b in chunks])
        rows = images.shape[0]
        if pad_to > rows:
            extra = pad_to - rows
            images = np.concatenate([images, np.zeros((extra,) + images.shape[1:], np.uint8)])
            masks = np.concatenate([masks, np.zeros((extra,) + masks.shape[1:], np.uint8)])
            mean = np.concatenate([mean, np.zeros((extra, 3), np.float32)])
            std = np.concatenate([std, np.ones((extra, 3), np.float32)])
        prob, pred = jax.device_get(self._step(self._states, images, masks, mean, std))
        row = 0
        for p, a, b in chunks:
            if p.pred is None:
                p.prob = np.zeros((p.num_model_slices,) + prob.shape[1:], np.float32)
                p.pred = np.zeros((p.num_model_slices,) + pred.shape[1:], bool)
            p.prob[a:b] = prob[row : row + b - a]
            p.pred[a:b] = pred[row : row + b - a]
            p.done += b - a
            row += b - a

    def _padded(self, rows: int) -> int:
        """Rows a partial batch is padded to: the next power of two, at most ``batch_size``."""
        return min(self.batch_size, _next_pow2(rows))

    def predict_volumes(
        self,
        volumes: Iterable[LoadedVolume],
        on_progress: Callable[[int], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> Iterator[VolumePrediction]:
        """Predict each volume; yields the results in the input order as they complete.

        ``on_progress(n)`` is called with the number of slices finished (processed or not).
        """
        pending: collections.deque[_Prepared] = collections.deque()
        buffer: list[tuple[_Prepared, int, int]] = []
        buffered = 0
        progress = on_progress or (lambda n: None)
        notice = on_notice or (lambda s: None)

        def run(rows: int, pad_to: int) -> None:
            nonlocal buffered
            chunks, taken = [], 0
            while taken < rows:
                p, a, b = buffer[0]
                take = min(b - a, rows - taken)
                chunks.append((p, a, a + take))
                taken += take
                if a + take == b:
                    buffer.pop(0)
                else:
                    buffer[0] = (p, a + take, b)
            buffered -= rows
            self._run(chunks, pad_to)
            progress(rows)

        def finished() -> Iterator[VolumePrediction]:
            while pending and pending[0].complete:
                yield self._finish(pending.popleft(), progress)

        for prepared, notes in self._prepared(volumes):
            for s in notes:
                notice(s)
            # One batch holds one input shape (the baseline's are all SLICE_SIZE square).
            if buffer and buffer[0][0].images.shape[1:] != prepared.images.shape[1:]:
                run(buffered, self._padded(buffered))
            pending.append(prepared)
            if prepared.num_model_slices:
                buffer.append((prepared, 0, prepared.num_model_slices))
                buffered += prepared.num_model_slices
            while buffered >= self.batch_size:
                run(self.batch_size, self.batch_size)
            yield from finished()
        if buffered:
            run(buffered, self._padded(buffered))
        yield from finished()
        assert not pending

    def _prepared(self, volumes: Iterable[LoadedVolume]) -> Iterator[tuple[_Prepared, list[str]]]:
        """``prepare`` each volume, the next one in a worker thread while the current one is
        on the device (reading and preprocessing are NumPy/Pillow work that releases the GIL,
        and JAX dispatches the batches asynchronously)."""
        from concurrent.futures import ThreadPoolExecutor

        it = iter(volumes)

        def work() -> tuple[_Prepared, list[str]] | None:
            loaded = next(it, None)  # one worker: the iterator is never entered concurrently
            return None if loaded is None else self.prepare(loaded)

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(work)
            while (item := future.result()) is not None:
                future = pool.submit(work)
                yield item

    # -- back to the input geometry ------------------------------------------------------------
    def _finish(self, p: _Prepared, progress: Callable[[int], None]) -> VolumePrediction:
        loaded = p.loaded
        n, h, w = loaded.images.shape[:3]
        processed = np.zeros(n, bool)
        if p.geometry is None:
            mask = np.zeros((n, h, w), bool)
        else:
            # The model saw the stored slices resized to its image_size: its probabilities are
            # resized bilinearly back to each slice's own geometry, then thresholded there.
            restored = preprocess.restore_prediction(p.prob, p.geometry, method="linear")
            mask = np.asarray(restored) >= np.float32(self.threshold)
            processed[p.geometry.z_range[0] : p.geometry.z_range[1]] = True
        mask = np.asarray(mask, bool)
        if self.lcc:
            mask = metrics.largest_connected_component(mask)
        lesion = int(mask.sum())
        m: dict[str, Any] = {
            "slices": n,
            "processed": int(processed.sum()),
            "lesion_pixels": lesion,
            "lesion_fraction": lesion / (n * h * w),
        }
        if loaded.has_truth.all():
            c = metrics.counted_metrics(mask, loaded.truth)
            m["true_pixels"] = int(c["true_pixels"])
            m["dsc"], m["accuracy"] = c["dsc"], c["accuracy"]
            if p.num_model_slices:
                # What metrics.volume_metrics gives the evaluation (without its surface metrics).
                stored_truth = p.masks[..., 0] > 0
                counted = metrics.counted_metrics(p.pred, stored_truth)
                m["dsc_model"], m["accuracy_model"] = counted["dsc"], counted["accuracy"]
                m["dsc_model_lcc"] = metrics.dsc(
                    metrics.largest_connected_component(p.pred), stored_truth
                )
        progress(n - p.num_model_slices)
        return VolumePrediction(loaded, mask, processed, m, p.prob, p.geometry)


def check_finite(path: str | os.PathLike, model, meta: dict[str, Any]) -> None:
    """Refuse a model whose parameters or BatchNorm statistics hold NaN or inf: it predicts
    NaN logits, which threshold to empty masks without any error."""
    from unet_jax.model import model_to_pure, named_leaves

    bad = [
        name
        for name, leaf in named_leaves(model_to_pure(model)).items()
        if not np.isfinite(np.asarray(leaf, dtype=np.float32)).all()
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        step = meta.get("step")
        raise PredictError(
            f"{path}: the checkpoint{'' if step is None else f' of step {step}'} holds NaN or "
            f"inf in {', '.join(bad[:3])}{more}; it would predict empty masks (use another "
            "checkpoint, e.g. an earlier --step)"
        )


def load_checkpoint(path: str | os.PathLike, step: int | None = None):
    """``(model, config, meta)`` from a training workdir or a converted checkpoint, with errors
    as :class:`PredictError`: a missing or foreign checkpoint, one whose config does not match
    its stored arrays (:func:`unet_jax.checkpoint.load_model` checks), or one whose parameters
    hold NaN or inf."""
    from unet_jax.checkpoint import CheckpointError, load_model

    try:
        model, config, meta = load_model(path, step)
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    except Exception as e:  # Orbax / config errors: a directory that is not a compatible checkpoint
        reason = " ".join(str(e).split())
        raise PredictError(
            f"{path}: cannot load a unet_jax checkpoint from it ({type(e).__name__}: {reason})"
        ) from None
    check_finite(path, model, meta)
    return model, config, meta


def _label(path: str | os.PathLike, step: int | None) -> str:
    return str(path) if step is None else f"{path} (step {step})"


def check_ensemble(members: Sequence[tuple[str, Any]], threshold: float | None = None) -> None:
    """Refuse an ensemble whose members (``(label, config)``) would not see the same inputs or
    give the same kind of output: they must agree on :data:`ENSEMBLE_FIELDS`, and on
    ``threshold`` unless one is given (the ensemble's own)."""
    first_label, first = members[0]
    for label, config in members[1:]:
        differ = [
            f"{f} {getattr(first, f)!r} vs {getattr(config, f)!r}"
            for f in ENSEMBLE_FIELDS
            if getattr(first, f) != getattr(config, f)
        ]
        if differ:
            raise PredictError(
                f"checkpoints {first_label} and {label} do not preprocess alike "
                f"({', '.join(differ)}); the checkpoints of an ensemble must agree on "
                f"{', '.join(ENSEMBLE_FIELDS)}"
            )
        if threshold is None and config.threshold != first.threshold:
            raise PredictError(
                f"checkpoints {first_label} and {label} differ in threshold "
                f"({first.threshold} vs {config.threshold}); give --threshold to choose the "
                "ensemble's"
            )


def load_checkpoints(
    paths: Sequence[str | os.PathLike],
    steps: Sequence[int | None] | None = None,
    threshold: float | None = None,
):
    """``(models, config, metas)`` of an ensemble (one checkpoint or several; ``steps``: one per
    path, None for a workdir's best), checked with :func:`check_ensemble` as each is loaded, so
    a mismatch is reported before the rest are read. ``config`` is the first checkpoint's: the
    members agree on what it says of the inputs, and on its threshold unless ``threshold`` is
    given."""
    if not paths:
        raise PredictError("no checkpoint given")
    steps = list(steps) if steps is not None else [None] * len(paths)
    if len(steps) != len(paths):
        raise PredictError(f"{len(steps)} steps given for {len(paths)} checkpoints")
    models, configs, metas, labels = [], [], [], []
    for path, step in zip(paths, steps):
        model, config, meta = load_checkpoint(path, step)
        labels.append(_label(path, step))
        models.append(model)
        configs.append(config)
        metas.append(meta)
        check_ensemble(list(zip(labels, configs)), threshold)
    return models, configs[0], metas
