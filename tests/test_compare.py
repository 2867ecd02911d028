"""Tests of unet_jax.compare and of experiments.report on a parent of several runs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _fake_run import make_workdir, md_links, write_csv
from experiments import report as report_cli
from unet_jax import compare, report, rundata
from unet_jax.config import Config


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_compare_runs_table_and_figures(tmp_path: Path):
    base = Config(name="base")
    variants = {
        "run1": base,
        "batch32": base.replace(batch_size=32),
        "lr1e-3": base.replace(learning_rate=1e-3),
    }
    dirs = {
        name: make_workdir(
            tmp_path / name, seed=i, config=cfg, dsc_offsets=(0.01 * i, -0.02 * i, 0.03 * i)
        )
        for i, (name, cfg) in enumerate(variants.items())
    }
    report.write_report(dirs["run1"])  # one run with its own report: linked from the table
    path = compare.compare_runs(tmp_path, dirs, "ablation")
    assert path == tmp_path / "report" / "comparison.md"
    text = path.read_text()
    rows = _table_rows(text)
    header = next(line for line in text.splitlines() if line.startswith("| run "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for name, d in dirs.items():
        with open(d / "per_patient.csv") as f:
            values = [float(r["dsc_lcc"]) for r in csv.DictReader(f)]
        cells = rows[name]
        assert float(cells[columns.index("mean DSC")]) == pytest.approx(np.mean(values), abs=6e-5)
        assert float(cells[columns.index("median DSC")]) == pytest.approx(
            np.median(values), abs=6e-5
        )
    assert rows["run1"][columns.index("differs")] == "—"
    assert rows["batch32"][columns.index("differs")] == "batch_size=32"
    assert rows["lr1e-3"][columns.index("differs")] == "learning_rate=0.001"
    assert "[report](../run1/report/report.md)" in rows["run1"][-1]
    for link in md_links(text):
        assert (path.parent / link).is_file(), link
    for name in ("comparison_dsc.png", "comparison_curves.png"):
        with Image.open(path.parent / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
    assert "Pooled" not in text  # holdout runs are not pooled


def test_compare_runs_pools_cross_validation_folds(tmp_path: Path):
    base = Config(name="cv", split="fold", num_folds=2)
    dirs = {}
    for i in range(2):
        d = make_workdir(
            tmp_path / f"fold{i}",
            seed=i,
            config=base.replace(fold=i),
            dsc_offsets=(0.05 * i, 0.0, 0.1 * i),
        )
        # Distinct patients per fold, as in cross-validation.
        rows = rundata.read_per_patient(d / "per_patient.csv")
        for row in rows:
            row["patient"] = f"{row['patient']}_f{i}"
        write_csv(d / "per_patient.csv", rows)
        dirs[f"fold{i}"] = d
    (tmp_path / "fold1" / "metrics.jsonl").write_text("")  # a fold without logs yet
    text = compare.compare_runs(tmp_path, dirs, "cv").read_text()
    pooled = [
        r["dsc_lcc"] for d in dirs.values() for r in rundata.read_per_patient(d / "per_patient.csv")
    ]
    m = re.search(
        r"\*\*(\d+) patients\*\*, mean per-patient DSC \*\*([0-9.]+)\*\*, median "
        r"\*\*([0-9.]+)\*\*",
        text,
    )
    assert m, text
    assert int(m.group(1)) == 6
    assert float(m.group(2)) == pytest.approx(np.mean(pooled), abs=6e-5)
    assert float(m.group(3)) == pytest.approx(np.median(pooled), abs=6e-5)
    assert "fold=1" in _table_rows(text)["fold1"][1]
    assert "fold1: metrics.jsonl has no evaluation lines" in text
    assert (tmp_path / "report" / "pooled_dsc.png").is_file()


def test_cli_on_parent_writes_every_report_and_comparison(tmp_path: Path, capsys):
    parent = tmp_path / "ablation"
    for name in ("lr1e-3", "run1"):
        # Without predictions (fewer figures, a faster test).
        make_workdir(parent / name, config=Config(name=name), with_predictions=False)
    assert report_cli.main(["--workdir", str(parent)]) == 0
    out = capsys.readouterr().out
    assert (parent / "run1" / "report" / "report.md").is_file()
    assert (parent / "lr1e-3" / "report" / "report.md").is_file()
    text = (parent / "report" / "comparison.md").read_text()
    assert str(parent / "report" / "comparison.md") in out
    # Names match the registered ablation: its order (run1 first) and its title.
    assert text.startswith("# ablation:")
    assert text.index("| run1 |") < text.index("| lr1e-3 |")


def test_config_differences_against_most_common_value():
    a = {"name": "a", "x": 1, "y": 2}
    diffs = compare.config_differences(
        {"a": a, "b": {**a, "name": "b", "x": 5}, "c": {**a, "name": "c", "y": 7}, "d": None}
    )
    assert diffs == {"a": {}, "b": {"x": 5}, "c": {"y": 7}, "d": {}}


def test_compare_runs_shows_the_seed_spread_of_repeated_settings(tmp_path: Path):
    # Two settings x two seeds (experiments.run --seeds): the spread section has one row per
    # setting with the mean and sample sd (numpy, ddof=1) of the seeds' mean DSC; runs that
    # differ in more than the seed are never grouped.
    base = Config(name="base")
    variants = {
        "run1/seed0": base.replace(seed=0),
        "run1/seed1": base.replace(seed=1),
        "lr1e-3/seed0": base.replace(learning_rate=1e-3, seed=0),
        "lr1e-3/seed1": base.replace(learning_rate=1e-3, seed=1),
        "odd/seed0": base.replace(seed=0),
        "odd/seed1": base.replace(seed=1, batch_size=32),
    }
    dirs = {
        name: make_workdir(tmp_path / name, seed=i, config=cfg, dsc_offsets=(0.02 * i, 0, 0))
        for i, (name, cfg) in enumerate(variants.items())
    }
    text = compare.compare_runs(tmp_path, dirs, "ablation").read_text()
    assert "## Seeds: spread of each setting" in text
    section = text.split("## Seeds")[1].split("\n## ")[0]
    rows = {k: v for k, v in _table_rows(section).items() if k != "setting"}  # header row
    assert set(rows) == {"run1", "lr1e-3"}
    for setting in ("run1", "lr1e-3"):
        means = []
        for seed in (0, 1):
            with open(dirs[f"{setting}/seed{seed}"] / "per_patient.csv") as f:
                means.append(np.mean([float(r["dsc_lcc"]) for r in csv.DictReader(f)]))
        cells = rows[setting]
        assert cells[1] == "2"
        assert float(cells[2]) == pytest.approx(np.mean(means), abs=6e-5)
        assert float(cells[3]) == pytest.approx(np.std(means, ddof=1), abs=6e-5)
    assert compare.seed_groups({"a": rundata.load_run(dirs["run1/seed0"])}) == {}


def test_compare_runs_shows_hd95_beside_dsc_and_tolerates_old_runs(tmp_path: Path):
    # A run of the current format beside one from before HD95 was computed: the first has its
    # HD95 and AVD from per_patient.csv, the old one n/a, and the comparison still renders.
    base = Config(name="base", split="fold", num_folds=2)
    dirs = {
        "new": make_workdir(tmp_path / "new", seed=0, config=base.replace(fold=0)),
        "old": make_workdir(tmp_path / "old", seed=1, config=base.replace(fold=1), old_format=True),
    }
    rows = rundata.read_per_patient(dirs["old"] / "per_patient.csv")
    for row in rows:
        row["patient"] += "_old"  # distinct patients, as folds have
    write_csv(dirs["old"] / "per_patient.csv", rows, old_format=True)
    text = compare.compare_runs(tmp_path, dirs, "mixed").read_text()
    table = _table_rows(text)
    header = next(line for line in text.splitlines() if line.startswith("| run "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.index("mean HD95") == columns.index("min DSC") + 1
    with open(dirs["new"] / "per_patient.csv") as f:
        new_rows = list(csv.DictReader(f))
    hd95 = [float(r["hd95_lcc"]) for r in new_rows]
    avd = [float(r["avd_lcc"]) for r in new_rows]
    cells = table["new"]
    assert float(cells[columns.index("mean HD95")]) == pytest.approx(np.mean(hd95), abs=6e-5)
    assert float(cells[columns.index("median HD95")]) == pytest.approx(np.median(hd95), abs=6e-5)
    assert float(cells[columns.index("mean AVD")]) == pytest.approx(np.mean(avd), abs=6e-5)
    for column in ("mean HD95", "median HD95", "mean AVD"):
        assert table["old"][columns.index(column)] == "n/a"
    assert float(table["old"][columns.index("mean DSC")]) > 0
    m = re.search(
        r"HD95 after LCC \(voxels\): mean \*\*([0-9.]+)\*\*, median \*\*([0-9.]+)\*\* over the "
        r"(\d+) of (\d+) patients",
        text,
    )
    assert m, text
    assert float(m.group(1)) == pytest.approx(np.mean(hd95), abs=6e-5)
    assert (int(m.group(3)), int(m.group(4))) == (3, 6)


def test_run_summary_falls_back_to_the_logged_hd95(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run", with_predictions=False)
    (workdir / "per_patient.csv").unlink()
    s = compare.run_summary(rundata.load_run(workdir, predictions=False))
    best = rundata.load_run(workdir, predictions=False).best_eval()
    assert s["mean_hd95"] == best["val_hd95"] and s["median_hd95"] == best["val_hd95_median"]
    assert s["hd95_defined"] == 3 and s["mean_avd"] == best["val_avd"]
    old = make_workdir(tmp_path / "old", with_predictions=False, old_format=True)
    s = compare.run_summary(rundata.load_run(old, predictions=False))
    assert s["mean_hd95"] is None and s["mean_avd"] is None and s["hd95_defined"] is None


def test_the_seeds_of_a_single_run_experiment_are_one_setting(tmp_path: Path):
    # `experiments.run --exp=cpu_quick --seeds 0,1,2` names its runs seed0, seed1, seed2 (no
    # "<setting>/"): they repeat one setting, shown under the comparison's title.
    base = Config(name="cpu_quick")
    dirs = {
        f"seed{s}": make_workdir(
            tmp_path / f"seed{s}", seed=s, config=base.replace(seed=s), dsc_offsets=(0.02 * s, 0, 0)
        )
        for s in (0, 1, 2)
    }
    runs = {n: rundata.load_run(d) for n, d in dirs.items()}
    assert compare.seed_groups(runs, single="cpu_quick") == {"cpu_quick": list(dirs)}
    assert compare.seed_setting("run1/seed-3") == "run1"
    assert compare.seed_setting("fold2") == "fold2"
    text = compare.compare_runs(tmp_path, dirs, "cpu_quick").read_text()
    section = text.split("## Seeds: spread of each setting")[1].split("\n## ")[0]
    rows = {k: v for k, v in _table_rows(section).items() if k != "setting"}
    means = []
    for d in dirs.values():
        with open(d / "per_patient.csv") as f:
            means.append(np.mean([float(r["dsc_lcc"]) for r in csv.DictReader(f)]))
    assert list(rows) == ["cpu_quick"] and rows["cpu_quick"][1] == "3"
    assert float(rows["cpu_quick"][2]) == pytest.approx(np.mean(means), abs=6e-5)
    assert float(rows["cpu_quick"][3]) == pytest.approx(np.std(means, ddof=1), abs=6e-5)
