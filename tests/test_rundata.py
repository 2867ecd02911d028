"""Tests of unet_jax.rundata: reading a run folder back, damaged or incomplete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _fake_run import PATIENTS, make_workdir
from _reference import np_dsc
from unet_jax import report, rundata


def test_per_patient_recomputed_when_csv_missing(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run")
    (workdir / "per_patient.csv").unlink()
    run = rundata.load_run(workdir)
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
    run = rundata.load_run(workdir)
    assert len(run.train) == 30 and len(run.evals) == 3
    assert any("unreadable" in p for p in run.problems)
