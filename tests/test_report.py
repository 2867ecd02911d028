"""Tests of unet_jax.report and experiments.report on one small fabricated run workdir."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _fake_run import PATIENTS, make_workdir, md_links
from experiments import report as report_cli
from unet_jax import report, rundata, rundir
from unet_jax.config import Config


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    workdir = make_workdir(tmp_path_factory.mktemp("run"))
    return report.write_report(workdir)


def test_report_links_every_figure(full_report: Path):
    assert full_report.is_file() and full_report.parent.name == rundir.REPORT_DIRNAME
    text = full_report.read_text()
    links = md_links(text)
    for link in links:
        assert (full_report.parent / link).is_file(), link
    figures = {p.name for p in full_report.parent.iterdir() if p.suffix in (".png", ".gif")}
    assert figures == {
        "train_loss.png",
        "validation.png",
        "per_patient_dsc.png",
        "per_patient_hd95.png",
        "per_patient_accuracy.png",
        "overlay_best.png",
        "overlay_worst.png",
        "volume.gif",
    }
    assert figures <= set(links)
    assert "per_patient.csv" in links
    # The config table lists every field.
    for field in Config().to_dict():
        assert f"| {field} |" in text, field
    assert "Missing or skipped" not in text


def test_figures_decode_as_png(full_report: Path):
    for path in full_report.parent.glob("*.png"):
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width > 200 and im.height > 150, (path.name, im.size)


def test_gif_has_one_frame_per_slice(full_report: Path):
    with Image.open(full_report.parent / "volume.gif") as im:
        assert im.format == "GIF"
        assert im.n_frames > 1
        # The default subject is the patient closest to the median DSC: the second (6 slices).
        assert im.n_frames == 6


def test_best_and_worst_overlay_patients(full_report: Path):
    text = full_report.read_text()
    assert f"best validation patient ({PATIENTS[0]})" in text
    assert f"worst validation patient ({PATIENTS[2]})" in text


def _colour_count(path: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return int(np.all(rgb == np.asarray(colour, np.uint8), axis=-1).sum())


def test_overlay_figures_have_red_and_green_outlines(full_report: Path):
    best = full_report.parent / "overlay_best.png"
    assert _colour_count(best, (255, 0, 0)) > 20  # prediction outline
    assert _colour_count(best, (0, 255, 0)) > 20  # ground-truth outline
    worst = full_report.parent / "overlay_worst.png"
    assert _colour_count(worst, (255, 0, 0)) > 20  # the false positive
    assert _colour_count(worst, (0, 255, 0)) > 20  # the missed lesion


def test_no_eval_lines_gives_clear_message(tmp_path: Path, capsys):
    workdir = make_workdir(tmp_path / "run", with_eval=False)
    path = report.write_report(workdir)
    text = path.read_text()
    assert "no evaluation lines" in text
    assert "predictions.npz missing" in text
    assert (path.parent / "train_loss.png").is_file()
    assert not (path.parent / "validation.png").exists()
    for link in md_links(text):
        assert (path.parent / link).is_file()
    assert report_cli.main(["--workdir", str(workdir)]) == 0
    assert "no evaluation lines" in capsys.readouterr().out


def test_empty_or_absent_workdir(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError):
        report.write_report(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.write_report(empty).read_text()
    assert "config.json missing" in text and "metrics.jsonl missing" in text
    assert report_cli.main(["--workdir", str(empty)]) == 2
    assert "holds no run" in capsys.readouterr().err


def _md_table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with ``first_column``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_per_patient_table_shows_hd95_beside_dsc(full_report: Path):
    text = full_report.read_text()
    table = _md_table(text, "patient")
    with open(full_report.parent / "per_patient.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(table[0])[:7] == [
        "patient",
        "slices",
        "dsc",
        "dsc_lcc",
        "hd95_lcc",
        "avd_lcc",
        "ravd_lcc",
    ]
    for got, want in zip(table, csv_rows):
        assert got["patient"] == want["patient"]
        assert float(got["hd95_lcc"]) == pytest.approx(float(want["hd95_lcc"]), abs=6e-5)
        assert int(got["avd_lcc"]) == int(want["avd_lcc"])
    assert "`hd95_lcc`: symmetric 95th-percentile Hausdorff distance" in text
    assert "voxel units" in text
    summary = {r["quantity"]: r["value"] for r in _md_table(text, "quantity")}
    hd95 = [float(r["hd95_lcc"]) for r in csv_rows]
    key = next(k for k in summary if k.startswith("per_patient.csv: patients with HD95"))
    defined, mean, median = summary[key].split(" / ")
    assert defined == "3 of 3"
    assert float(mean) == pytest.approx(np.mean(hd95), abs=6e-5)
    assert float(median) == pytest.approx(np.median(hd95), abs=6e-5)
    best = next(k for k in summary if k.startswith("best: mean / median per-patient HD95"))
    assert "undefined for 0 patient(s)" in best


def test_undefined_hd95_is_shown_as_na_and_left_out_of_the_mean(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run", with_predictions=False)
    rows = rundata.read_per_patient(workdir / "per_patient.csv")
    rows[1]["hd95_lcc"] = math.nan  # e.g. the LCC prediction was empty
    rundir.write_per_patient_csv(rows, workdir / "per_patient.csv")
    text = report.write_report(workdir).read_text()
    table = {r["patient"]: r for r in _md_table(text, "patient")}
    assert table[PATIENTS[1]]["hd95_lcc"] == "n/a"
    summary = {r["quantity"]: r["value"] for r in _md_table(text, "quantity")}
    key = next(k for k in summary if k.startswith("per_patient.csv: patients with HD95"))
    defined, mean, _ = summary[key].split(" / ")
    assert defined == "2 of 3"
    assert float(mean) == pytest.approx(
        np.mean([rows[0]["hd95_lcc"], rows[2]["hd95_lcc"]]), abs=6e-5
    )
    assert (workdir / "report" / "per_patient_hd95.png").is_file()


def test_old_run_without_distance_columns_still_renders(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run", old_format=True)
    header = (workdir / "per_patient.csv").read_text().splitlines()[0]
    assert "hd95" not in header  # the format of runs from before HD95
    path = report.write_report(workdir)
    text = path.read_text()
    table = _md_table(text, "patient")
    assert len(table) == 3 and float(table[0]["dsc_lcc"]) > 0
    assert not any(c in table[0] for c in ("hd95_lcc", "avd_lcc", "ravd_lcc"))
    assert "HD95" not in text and "Hausdorff" not in text
    assert not (path.parent / "per_patient_hd95.png").exists()
    assert (path.parent / "per_patient_dsc.png").is_file()
    for link in md_links(text):
        assert (path.parent / link).is_file()
