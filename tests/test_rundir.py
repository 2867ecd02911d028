"""Tests of unet_jax.rundir: preparing a run folder and reading one back, damaged or incomplete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _fake_run import PATIENTS, make_workdir
from _reference import np_dsc
from unet_jax import report, rundir
from unet_jax.config import Config
from unet_jax.rundir import ConfigMismatchError, prepare_workdir


def test_per_patient_recomputed_when_csv_missing(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run")
    (workdir / "per_patient.csv").unlink()
    run = rundir.load_run(workdir)
    assert run.per_patient_recomputed
    pred = np.load(workdir / "predictions.npz")
    for row, patient in zip(run.per_patient, PATIENTS):
        m = pred["patient"] == patient
        assert row["dsc_lcc"] == pytest.approx(np_dsc(pred["pred"][m], pred["truth"][m]))
    text = report.write_report(workdir).read_text()
    assert "per_patient.csv missing" in text


def test_truncated_metrics_line_is_skipped(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 31, "lo')  # a job killed mid-write
    run = rundir.load_run(workdir)
    assert len(run.train) == 30 and len(run.evals) == 3
    assert any("unreadable" in p for p in run.problems)


def test_different_config_on_existing_workdir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(Config(name="a").to_json())
    with pytest.raises(ConfigMismatchError, match="name"):
        prepare_workdir(Config(name="b"), tmp_path, restart=False)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    prepare_workdir(Config(name="b"), tmp_path, restart=True)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "b"
