"""The training tests' data and configuration: blob splits (``unet_jax.synthetic.blob_split``) that
a tiny U-Net learns within a few hundred steps, and that U-Net's Config."""

from unet_jax.config import Config
from unet_jax.data import SplitData
from unet_jax.synthetic import blob_split


def blob_train_val() -> tuple[SplitData, SplitData]:
    """4 training patients ("T00"..) and 2 validation patients ("V00", "V01") of 8 slices of
    32x32, seeds 0 and 1 (the training tests' DSC thresholds were set on exactly this data)."""
    return blob_split(4, 8, 32, 0, "T"), blob_split(2, 8, 32, 1, "V")


def tiny_config(name: str, **fields) -> Config:
    """A 4-feature U-Net on 32x32 inputs, batch 8, lr 3e-3, no report; ``fields`` set the rest."""
    return Config(
        name=name,
        features=4,
        image_size=32,
        batch_size=8,
        learning_rate=3e-3,
        write_report=False,
        **fields,
    )
