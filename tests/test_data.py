"""Reading a run's splits from the built data set (``unet_jax.data``) and building it first
(``experiments.data``).

References are independent of ``load_data``: the patient folders of the dummy data, the splits
of ``unet_jax.lgg`` applied to them, and the stored examples read with TFDS directly. Uses the
built dummy data of conftest.py (``synthetic_tfds_dir``: 5 patients, both configs).
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.data import ensure_built, load_run_data
from unet_jax import lgg
from unet_jax.config import Config, ConfigError
from unet_jax.data import (
    DataNotFoundError,
    configured_data_dir,
    default_data_dir,
    is_built,
    load_data,
)

REPO = Path(__file__).resolve().parent.parent


def folders(manual_dir: Path) -> list[str]:
    return sorted(p.name for p in (manual_dir / "kaggle_3m").iterdir() if p.is_dir())


def stored(data_dir: Path, config: str) -> dict[tuple[str, int], np.ndarray]:
    """Every stored image by (patient, slice), read with TFDS."""
    out = {}
    for split in ("train", "validation"):
        source = tfds.data_source(
            f"lgg_mri_segmentation/{config}", data_dir=str(data_dir), split=split
        )
        for i in range(len(source)):
            ex = source[i]
            out[ex["patient_id"].decode(), int(ex["slice_index"])] = ex["image"]
    return out


def assert_matches_stored(split, reference: dict[tuple[str, int], np.ndarray]) -> None:
    for row in range(split.num_examples):
        key = (split.patients[split.volume[row]], int(split.slice_index[row]))
        np.testing.assert_array_equal(split.images[row], reference[key], err_msg=str(key))


def test_holdout_is_the_baseline_split_of_the_patients(synthetic_tfds_dir, synthetic_manual_dir):
    train, val = load_data(Config(dataset_config="raw"), synthetic_tfds_dir)
    ref_train, ref_val = lgg.split_patients(folders(synthetic_manual_dir))
    assert list(train.patients) == ref_train and list(val.patients) == ref_val
    reference = stored(synthetic_tfds_dir, "raw")
    assert train.num_examples + val.num_examples == len(reference)
    assert_matches_stored(train, reference)
    assert_matches_stored(val, reference)


def test_folds_are_patient_folds_over_all_patients(synthetic_tfds_dir, synthetic_manual_dir):
    everyone = folders(synthetic_manual_dir)
    reference = stored(synthetic_tfds_dir, "baseline")
    validated = []
    for fold, (ref_train, ref_val) in enumerate(lgg.patient_folds(everyone, k=3)):
        config = Config(split="fold", num_folds=3, fold=fold)
        train, val = load_data(config, synthetic_tfds_dir)
        assert list(train.patients) == ref_train and list(val.patients) == ref_val
        assert not set(train.patients) & set(val.patients)
        assert sorted(train.patients + val.patients) == everyone
        assert train.num_examples + val.num_examples == len(reference)
        assert_matches_stored(val, reference)
        validated += val.patients
    assert sorted(validated) == everyone  # each patient validated exactly once


@pytest.mark.parametrize(
    "changes,named",
    [({"split": "fold", "fold": 3, "num_folds": 3}, "'fold' = 3"), ({"split": "kfold"}, "split")],
)
def test_bad_split_or_fold_is_refused_before_any_data_is_read(changes, named):
    with pytest.raises(ConfigError, match=named):
        dataclasses.replace(Config(), **changes)


def test_not_built_names_the_folder_and_the_download(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_data(Config(), tmp_path / "tfds")
    message = str(info.value)
    assert str(tmp_path / "tfds" / "lgg_mri_segmentation" / "baseline") in message
    assert "kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation" in message
    # An interrupted build (no prepared version folder) is not a built data set.
    (tmp_path / "tfds" / "lgg_mri_segmentation" / "baseline" / "incomplete.X_1.0.0").mkdir(
        parents=True
    )
    assert not is_built(tmp_path / "tfds", "baseline")


def test_configured_data_dir(tmp_path):
    assert configured_data_dir(Config()) == default_data_dir()
    assert configured_data_dir(Config(data_dir=str(tmp_path))) == tmp_path
    synthetic = Config(source="synthetic")
    assert configured_data_dir(synthetic, tmp_path) == tmp_path / "synthetic" / "tfds"
    assert configured_data_dir(Config(source="synthetic", data_dir=str(tmp_path))) == (
        tmp_path / "tfds"
    )
    with pytest.raises(ValueError, match="workdir"):
        configured_data_dir(synthetic)
    with pytest.raises(ConfigError, match="'source' = 'mnist'"):
        Config(source="mnist")


def test_ensure_built_builds_once_from_the_manual_dir(
    tmp_path, synthetic_manual_dir, synthetic_tfds_dir
):
    config = Config(
        dataset_config="raw", data_dir=str(tmp_path / "tfds"), manual_dir=str(synthetic_manual_dir)
    )
    assert ensure_built(config, tmp_path / "wd") == tmp_path / "tfds"
    info = next((tmp_path / "tfds").rglob("dataset_info.json"))
    before = info.stat().st_mtime_ns
    train, val = load_run_data(config, tmp_path / "wd")  # reuses the build
    assert info.stat().st_mtime_ns == before
    ref_train, ref_val = load_data(config, synthetic_tfds_dir)
    assert train.patients == ref_train.patients and val.patients == ref_val.patients
    np.testing.assert_array_equal(train.images, ref_train.images)
    # Neither built nor downloaded: the places looked in are named.
    empty = Config(data_dir=str(tmp_path / "none"), manual_dir=str(tmp_path / "nothing"))
    with pytest.raises(DataNotFoundError, match="no Kaggle download was found") as err:
        ensure_built(empty, tmp_path / "wd")
    assert str(tmp_path / "nothing") in str(err.value)


def test_reads_without_the_builder(synthetic_tfds_dir):
    # A fresh process: load_data neither imports nor needs the builder in datasets/.
    code = (
        "import sys\n"
        "from unet_jax.config import Config\n"
        "from unet_jax.data import load_data\n"
        f"train, val = load_data(Config(), {str(synthetic_tfds_dir)!r})\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'datasets']\n"
        "print(train.num_examples, val.num_examples)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    train, val = load_data(Config(), synthetic_tfds_dir)
    assert out.stdout.split() == [str(train.num_examples), str(val.num_examples)]


def test_core_imports_nothing_outside_it():
    # Dependencies point one way: datasets/, experiments/ and benchmarks/ use unet_jax, never
    # the reverse.
    outside = {"datasets", "experiments", "benchmarks"}
    found = []
    for path in sorted((REPO / "unet_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in outside]
    assert not found
