"""Segment new MRI slices with a trained (or converted) checkpoint: ``python -m unet_jax.predict``.

- :mod:`~unet_jax.predict.inputs`: the ``--input`` paths as volumes, read by the checked slice
  reader the data-set builder uses;
- :mod:`~unet_jax.predict.predictor`: the model (or an ensemble of models that preprocess
  alike) with the checkpoint's preprocessing, predicting volumes in jitted, padded batches, with
  test-time augmentation when asked;
- :mod:`~unet_jax.predict.export`: masks, overlays, NIfTI volumes, ``predictions.csv`` and
  ``predict.json``;
- :mod:`~unet_jax.predict.run`: :func:`predict`, all of it into a new folder;
- :mod:`~unet_jax.predict.cli`: the command line (its ``--help`` says what it does).
"""

from unet_jax.predict.cli import main
from unet_jax.predict.export import CSV_FIELDS
from unet_jax.predict.inputs import (
    IMAGE_EXTENSIONS,
    LoadedVolume,
    PredictError,
    SliceFile,
    VolumeSpec,
    check_volume,
    discover,
    read_volume,
)
from unet_jax.predict.predictor import (
    ENSEMBLE_FIELDS,
    Predictor,
    VolumePrediction,
    check_ensemble,
    load_checkpoint,
    load_checkpoints,
)
from unet_jax.predict.run import PredictSummary, predict

__all__ = [
    "CSV_FIELDS",
    "IMAGE_EXTENSIONS",
    "PredictError",
    "SliceFile",
    "VolumeSpec",
    "VolumePrediction",
    "PredictSummary",
    "LoadedVolume",
    "discover",
    "check_volume",
    "read_volume",
    "load_checkpoint",
    "load_checkpoints",
    "check_ensemble",
    "ENSEMBLE_FIELDS",
    "Predictor",
    "predict",
    "main",
]
