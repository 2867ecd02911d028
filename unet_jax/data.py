"""Where a run's data comes from: find or build the TFDS data set, then load its splits.

* ``source="lgg"``: the real data. The built TFDS data set is looked for in ``data_dir``
  (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); if it is not built yet, the Kaggle
  download is looked for in ``manual_dir`` and then in TFDS's manual-dir convention
  ``<data_dir>/downloads/manual``, and built once. With neither, :class:`DataNotFoundError`
  carries the download instructions.
* ``source="synthetic"``: the project's seeded phantom data in the kaggle_3m layout, written
  into the workdir and taken through the same TFDS build (the no-download demo).

Splits: ``holdout`` gives the baseline's train/validation patients; ``fold`` gives fold
``config.fold`` of ``config.num_folds`` deterministic patient-level folds over all patients.
"""

from __future__ import annotations

import os
from pathlib import Path

from unet_jax.config import Config
from unet_jax.input_pipeline import SplitData, concat, load_split, select_patients

DATASET = "lgg_mri_segmentation"


class DataNotFoundError(FileNotFoundError):
    """Neither a built data set nor the Kaggle download was found; the message says what to do."""


def _lgg():
    # Imported lazily: registers the TFDS builder (and keeps `import unet_jax` light).
    import datasets.lgg_mri_segmentation as lgg
    return lgg


def default_data_dir() -> Path:
    """TFDS's default data directory."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets")).expanduser()


def is_built(data_dir: Path, dataset_config: str) -> bool:
    """Whether ``lgg_mri_segmentation/<config>`` is prepared under ``data_dir``."""
    root = Path(data_dir) / DATASET / dataset_config
    return any(p.joinpath("dataset_info.json").is_file() for p in root.glob("*")) if root.is_dir() else False


def manual_dir_candidates(config: Config, data_dir: Path) -> list[Path]:
    """Where the Kaggle download is looked for, in order."""
    out = [Path(config.manual_dir).expanduser()] if config.manual_dir else []
    out.append(data_dir / "downloads" / "manual")
    return out


def ensure_built(config: Config, workdir: str | Path) -> Path:
    """Make sure the TFDS data set the config needs exists; return its ``data_dir``."""
    lgg = _lgg()
    if config.source == "synthetic":
        from unet_jax.synthetic import write_synthetic_kaggle3m

        base = Path(config.data_dir).expanduser() if config.data_dir else Path(workdir) / "synthetic"
        data_dir = base / "tfds"
        if not is_built(data_dir, config.dataset_config):
            manual = base / "manual"
            if not (manual / "kaggle_3m").is_dir():
                write_synthetic_kaggle3m(manual, num_patients=config.synthetic_patients,
                                         slices=tuple(config.synthetic_slices), seed=config.seed)
            lgg.build(manual, data_dir, config.dataset_config)
        return data_dir
    if config.source != "lgg":
        raise ValueError(f"unknown data source {config.source!r}; valid: lgg, synthetic")
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
    if is_built(data_dir, config.dataset_config):
        return data_dir
    tried = manual_dir_candidates(config, data_dir)
    for manual in tried:
        if manual.exists() and any(manual.iterdir()):
            print(f"building {DATASET}/{config.dataset_config} from {manual} into {data_dir} "
                  "(once; later runs reuse it)")
            lgg.build(manual, data_dir, config.dataset_config)
            return data_dir
    raise DataNotFoundError(
        f"The LGG data set is not built in {data_dir / DATASET / config.dataset_config} and no "
        f"Kaggle download was found in: {', '.join(str(p) for p in tried)}.\n\n"
        f"{lgg.MANUAL_DOWNLOAD_INSTRUCTIONS}\n"
        "Then pass --manual_dir DIR (or put it in <data_dir>/downloads/manual), or run "
        "`python -m experiments.run --exp=smoke` for the built-in demo on synthetic data.")


def load_data(config: Config, workdir: str | Path) -> tuple[SplitData, SplitData]:
    """``(train, validation)`` splits for ``config`` (building the data set if needed)."""
    data_dir = ensure_built(config, workdir)
    name = f"{DATASET}/{config.dataset_config}"
    train = load_split(name, "train", str(data_dir))
    val = load_split(name, "validation", str(data_dir))
    if config.split == "holdout":
        return train, val
    if config.split == "fold":
        if not 0 <= config.fold < config.num_folds:
            raise ValueError(f"fold {config.fold} is not in 0..{config.num_folds - 1}")
        everyone = concat(train, val)
        train_ids, val_ids = _lgg().patient_folds(everyone.patients, k=config.num_folds)[config.fold]
        return select_patients(everyone, train_ids), select_patients(everyone, val_ids)
    raise ValueError(f"unknown split {config.split!r}; valid: holdout, fold")
