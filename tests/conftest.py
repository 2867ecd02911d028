"""Shared fixtures: the real LGG data (skipped cleanly where absent) and built TFDS data sets.

Real data lives at ``<repo>/../shared/lgg`` on the project's machines and in CI; a user's machine
has none, and every test that needs it skips with a message saying so.

Fixtures (session-scoped, built once and shared by every test file):

- ``shared_lgg``: path of ``../shared/lgg`` (skips without it).
- ``real_manual_dir``: ``restore.py`` output (all 110 patients as .tif) in a temporary folder; the
  manual directory to build from (it holds ``kaggle_3m/``).
- ``real_tfds_dir``: TFDS data directory holding both configs (``raw``, ``baseline``) built from
  ``real_manual_dir``; read with ``tfds.data_source("lgg_mri_segmentation/<config>",
  data_dir=real_tfds_dir, split=...)``.
- ``synthetic_manual_dir`` / ``synthetic_tfds_dir``: the same for the builder's dummy data (a small
  synthetic data set: 5 patients of 5 to 8 slices of 256x256, from ``unet_jax.synthetic``; 4
  patients in ``train``, 1 in ``validation``); both configs built.
- ``smoke_workdir``: the workdir of the smoke experiment (``python -m experiments.run
  --exp=smoke``, full size: a few minutes on 2 CPU cores), run once for test_experiments.py and
  test_predict.py; read it, do not write into it.

More session fixtures come from the plugins named in ``pytest_plugins``: ``_lgg_setup.py`` (the
builder's dummy data in the users' layouts) and ``_predict_setup.py`` (predict's inputs and tiny
checkpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Fixtures shared by several test files (see the docstring).
pytest_plugins = ["_lgg_setup", "_predict_setup"]

REPO = Path(__file__).resolve().parent.parent
SHARED_LGG = REPO.parent / "shared" / "lgg"

# This repository's `datasets` package must win over HuggingFace's `datasets` if that is
# installed (bare `pytest` does not put the repository root first on sys.path).
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))


# One persistent compilation cache for the whole session, never the user's: runs of equal shapes
# (in this process and in the subprocesses, which inherit the variable) compile once.
os.environ["UNET_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="unet_jax_test_xla_")


def pytest_configure(config: pytest.Config) -> None:
    from unet_jax import compile_cache

    compile_cache.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(os.environ["UNET_JAX_COMPILE_CACHE"], ignore_errors=True)


def real_data_path() -> Path | None:
    """``<repo>/../shared/lgg`` if it holds the real data (its restore.py), else None."""
    return SHARED_LGG if (SHARED_LGG / "restore.py").is_file() else None


def require_real_data() -> Path:
    """The real data's folder, or skip the calling test with a clear message."""
    path = real_data_path()
    if path is None:
        pytest.skip(
            f"real LGG data not found at {SHARED_LGG} (only on the project's machines and CI)"
        )
    return path


@pytest.fixture(scope="session")
def shared_lgg() -> Path:
    """Path of the real data (``../shared/lgg``); skips where absent."""
    return require_real_data()


@pytest.fixture(scope="session")
def real_manual_dir(shared_lgg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 110 patients restored as .tif (``DIR/kaggle_3m``): a manual directory."""
    dest = tmp_path_factory.mktemp("lgg_real_manual")
    subprocess.run(
        [sys.executable, str(shared_lgg / "restore.py"), str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


def _build_both_configs(manual_dir: Path, data_dir: Path, num_workers: int) -> Path:
    """Build the ``raw`` and ``baseline`` configs of ``manual_dir`` into ``data_dir``."""
    from datasets.lgg_mri_segmentation import build

    for config in ("raw", "baseline"):
        build(manual_dir, data_dir, config, num_workers=num_workers)
    return data_dir


@pytest.fixture(scope="session")
def real_tfds_dir(real_manual_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TFDS data dir with both configs of the real data built (2 worker processes)."""
    return _build_both_configs(real_manual_dir, tmp_path_factory.mktemp("lgg_real_tfds"), 2)


@pytest.fixture(scope="session")
def synthetic_manual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's dummy data in the kaggle_3m layout (``DIR/kaggle_3m``); do not modify it."""
    from datasets.lgg_mri_segmentation.make_dummy_data import make_dummy_data

    return make_dummy_data(tmp_path_factory.mktemp("lgg_synthetic_manual"))


@pytest.fixture(scope="session")
def synthetic_tfds_dir(
    synthetic_manual_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """TFDS data dir with both configs of the synthetic data set built (in-process)."""
    return _build_both_configs(
        synthetic_manual_dir, tmp_path_factory.mktemp("lgg_synthetic_tfds"), 0
    )


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke experiment's workdir (report, per_patient.csv, predictions.npz, checkpoints, and
    its synthetic data under ``synthetic/manual/kaggle_3m``); do not write into it."""
    from experiments.run import main

    wd = tmp_path_factory.mktemp("smoke")
    assert main(["--exp=smoke", "--workdir", str(wd)]) == 0
    return wd
