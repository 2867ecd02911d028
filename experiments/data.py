"""Make sure the TFDS data set a run reads is built: the one place that calls the builder.

``unet_jax.data`` only reads a built data set; this module builds it first when needed, so that
dependencies point one way (``experiments`` -> ``datasets`` -> ``unet_jax``):

* ``source="lgg"``: nothing to do if the data set is built in the configured ``data_dir``;
  otherwise the Kaggle download is looked for in ``config.manual_dir`` and then in TFDS's
  manual-dir convention ``<data_dir>/downloads/manual``, and built once. With neither,
  :class:`unet_jax.data.DataNotFoundError` carries the download instructions.
* ``source="synthetic"``: the project's seeded phantom data in the kaggle_3m layout, written
  beside the data directory (``.../manual``) and taken through the same build (the no-download
  demo).
"""

from __future__ import annotations

from pathlib import Path

from datasets.lgg_mri_segmentation import build
from unet_jax.config import Config
from unet_jax.data import DATASET, configured_data_dir, is_built, load_data, not_built_error
from unet_jax.input_pipeline import SplitData


def manual_dir_candidates(config: Config, data_dir: Path) -> list[Path]:
    """Where the Kaggle download is looked for, in order."""
    out = [Path(config.manual_dir).expanduser()] if config.manual_dir else []
    out.append(data_dir / "downloads" / "manual")
    return out


def ensure_built(config: Config, workdir: str | Path) -> Path:
    """Build the TFDS data set ``config`` needs unless it exists; return its ``data_dir``.

    Raises:
      unet_jax.data.DataNotFoundError: real data neither built nor downloaded.
      datasets.lgg_mri_segmentation.LGGDataError: the download is not the LGG data as expected.
    """
    data_dir = configured_data_dir(config, workdir)
    if is_built(data_dir, config.dataset_config):
        return data_dir
    if config.source == "synthetic":
        from unet_jax.synthetic import write_synthetic_kaggle3m

        manual = data_dir.parent / "manual"
        if not (manual / "kaggle_3m").is_dir():
            write_synthetic_kaggle3m(
                manual,
                num_patients=config.synthetic_patients,
                slices=tuple(config.synthetic_slices),
                seed=config.seed,
            )
        build(manual, data_dir, config.dataset_config)
        return data_dir
    tried = manual_dir_candidates(config, data_dir)
    for manual in tried:
        if manual.exists() and any(manual.iterdir()):
            print(
                f"building {DATASET}/{config.dataset_config} from {manual} into {data_dir} "
                "(once; later runs reuse it)"
            )
            build(manual, data_dir, config.dataset_config)
            return data_dir
    raise not_built_error(data_dir, config.dataset_config, tried)


def load_run_data(config: Config, workdir: str | Path) -> tuple[SplitData, SplitData]:
    """A run's ``(train, validation)``: :func:`ensure_built`, then ``unet_jax.data.load_data``."""
    return load_data(config, ensure_built(config, workdir))
