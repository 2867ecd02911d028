"""experiments/gpu_session.sh end to end at toy size on synthetic data (CPU), so it cannot rot."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from unet_jax.synthetic import write_synthetic_kaggle3m

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "gpu_session.sh"


def _run(tmp_path: Path, manual: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "MANUAL_DIR": str(manual),
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "none"),
        "JAX_PLATFORMS": "cpu",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def manual(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_session_data")
    # 10 patients: the holdout keeps 2 for validation, each of 5 folds validates on 2.
    write_synthetic_kaggle3m(root, num_patients=10, slices=(5, 7), seed=3)
    return root


@pytest.mark.slow
def test_toy_session_runs_every_experiment_and_packs_its_records(tmp_path, manual):
    proc = _run(tmp_path, manual, TOY="1")
    log = (tmp_path / "out" / "session.log").read_text()
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-2000:]
    for name in ("build", "run1", "run2", "ablation", "baseline", "cv5"):
        assert f"end {name}: rc 0" in log, (name, log[-3000:])
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == [
        "ablation.tar.gz",
        "baseline.tar.gz",
        "cv5.tar.gz",
        "env.txt",
        "run1.tar.gz",
        "run2.tar.gz",
        "session.log",
    ]
    assert len(out) <= 8  # what a lease sends back
    with tarfile.open(tmp_path / "out" / "run1.tar.gz") as tar:
        names = set(tar.getnames())
    assert {
        "run1/config.json",
        "run1/metrics.jsonl",
        "run1/per_patient.csv",
        "run1/report/report.md",
    } <= names
    assert not any("checkpoints" in n or n.endswith(".npz") for n in names)
    with tarfile.open(tmp_path / "out" / "cv5.tar.gz") as tar:
        names = set(tar.getnames())
    # The toy run keeps one fold: its records and the comparison report are there.
    assert {
        "cv5/fold0/per_patient.csv",
        "cv5/fold0/report/report.md",
        "cv5/report/comparison.md",
    } <= names
    assert "given; not the travel bundle" in log


def test_a_step_past_the_deadline_is_skipped_and_said(tmp_path, manual):
    proc = _run(tmp_path, manual, DEADLINE="1", STEPS="run1")
    log = (tmp_path / "out" / "session.log").read_text()
    assert proc.returncode == 1
    assert "skip build: the deadline (1 s) is reached" in log
    assert "the data set did not build: stop" in log
    assert not (tmp_path / "out" / "run1.tar.gz").exists()
