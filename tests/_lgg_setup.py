"""What the data-set builder's tests share: the dummy data in the archive layouts users have,
a private copy to break (fixtures, registered by conftest.py) and helpers reading a built data
set back."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from datasets.lgg_mri_segmentation import LGGDataError, build
from datasets.lgg_mri_segmentation.make_dummy_data import make_dummy_data

NAME = "lgg_mri_segmentation"


# ------------------------------------------------------------------------------------------------
# helpers


def all_examples(data_dir: Path, config: str, split: str) -> list[dict]:
    source = tfds.data_source(f"{NAME}/{config}", data_dir=str(data_dir), split=split)
    return [source[i] for i in range(len(source))]


def assert_same_examples(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def baseline_holdout(folders: list[str]) -> list[str]:
    """Exactly the baseline's call, on the global random state (restored afterwards)."""
    state = random.getstate()
    try:
        random.seed(42)
        return random.sample(sorted(folders), k=10)
    finally:
        random.setstate(state)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The dummy data as users may have it besides conftest's ``synthetic_manual_dir`` (the bare
    kaggle_3m folder): manual directories of the archive layouts (do not modify them)."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        "unpacked": make_dummy_data(base / "unpacked", layout="kaggle-zip"),
        "zip": make_dummy_data(base / "zip", layout="zip"),
    }


@pytest.fixture()
def manual(synthetic_manual_dir, tmp_path) -> Path:
    """A private copy of the dummy data to break."""
    dest = tmp_path / "manual"
    shutil.copytree(synthetic_manual_dir, dest)
    return dest


def first_patient(manual: Path) -> Path:
    return sorted(p for p in (manual / "kaggle_3m").iterdir() if p.is_dir())[0]


def build_raises(manual: Path, tmp_path: Path, match: str) -> LGGDataError:
    with pytest.raises(LGGDataError, match=match) as info:
        build(manual, tmp_path / "tfds", "raw", num_workers=0)
    return info.value
