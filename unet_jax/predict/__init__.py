"""Segment new MRI slices with a trained (or converted) checkpoint: ``python -m unet_jax.predict``.

- :mod:`~unet_jax.predict.inputs`: the ``--input`` paths as volumes, read by the checked slice
  reader the data-set builder uses;
- :mod:`~unet_jax.predict.predictor`: the model with the checkpoint's preprocessing, predicting
  volumes in jitted, padded batches;
- :mod:`~unet_jax.predict.export`: masks, overlays, ``predictions.csv`` and ``predict.json``;
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
from unet_jax.predict.predictor import Predictor, VolumePrediction, load_checkpoint
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
    "Predictor",
    "predict",
    "main",
]
