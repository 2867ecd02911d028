"""Tests of unet_jax.report and experiments.report on small fabricated workdirs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _reference import np_dsc
from experiments import report as report_cli
from unet_jax import report
from unet_jax.config import Config

SIZE = 64
PATIENTS = ("TCGA_CS_1111_20000101", "TCGA_DU_2222_20000102", "TCGA_EZ_3333_20000103")


# ------------------------------------------------------------------------------------------
# Fabricated workdirs
# ------------------------------------------------------------------------------------------


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _predictions(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three volumes: good (pred shifted 2 px), fair (shifted 6 px, smaller), bad (elsewhere)."""
    images, truths, preds, names, numbers = [], [], [], [], []
    for p, (patient, n) in enumerate(zip(PATIENTS, (5, 6, 7))):
        for s in range(n):
            image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
            image[..., 1] += np.uint8(40)  # FLAIR a bit brighter, still gray
            lesion = 1 <= s <= n - 2
            radius = 2 * min(s, n - 1 - s)
            empty = np.zeros((SIZE, SIZE), bool)
            truth = _disc(30, 30, 4 + radius) if lesion else empty
            if p == 0:
                pred = np.roll(truth, 2, axis=1)
            elif p == 1:
                pred = np.roll(_disc(30, 30, 3 + radius), 6, axis=0) if lesion else empty
            else:
                pred = _disc(10, 50, 5) if s == n - 1 else empty
            images.append(image)
            truths.append(truth)
            preds.append(pred)
            names.append(patient)
            numbers.append(s + 1)
    return {"image": np.stack(images), "truth": np.stack(truths), "pred": np.stack(preds),
            "patient": np.asarray(names), "slice_index": np.asarray(numbers, np.int32)}


def _per_patient_rows(pred: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for patient in PATIENTS:
        m = pred["patient"] == patient
        p, t = pred["pred"][m], pred["truth"][m]
        rows.append({"patient": patient, "slices": int(m.sum()), "dsc": np_dsc(p, t) * 0.98,
                     "dsc_lcc": np_dsc(p, t), "accuracy": float((p == t).mean()),
                     "precision": 0.9, "recall": 0.8, "true_pixels": int(t.sum()),
                     "pred_pixels": int(p.sum())})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = ["patient", "slices", "dsc", "dsc_lcc", "accuracy", "precision", "recall",
               "true_pixels", "pred_pixels"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _metrics_lines(rng: np.random.Generator, epochs: int = 3, steps_per_epoch: int = 10,
                   with_eval: bool = True, with_summary: bool = True) -> list[dict]:
    lines = []
    best = -1.0
    for e in range(epochs):
        for s in range(steps_per_epoch):
            step = e * steps_per_epoch + s + 1
            lines.append({"type": "train", "step": step, "epoch": step / steps_per_epoch,
                          "loss": float(0.9 * np.exp(-step / 12) + 0.1 + 0.02 * rng.random()),
                          "lr": 3e-4, "images_per_s": float(50 + rng.random())})
        if with_eval:
            dsc = float(0.5 + 0.1 * e + 0.05 * rng.random())
            lines.append({"type": "eval", "step": (e + 1) * steps_per_epoch, "epoch": e + 1,
                          "val_loss": float(0.5 - 0.05 * e), "val_dsc": dsc,
                          "val_dsc_median": dsc + 0.02, "val_dsc_raw": dsc - 0.01,
                          "val_accuracy": 0.99, "best": dsc > best})
            best = max(best, dsc)
    if with_summary:
        lines.append({"type": "summary", "best_val_dsc": best, "wall_s": 12.5})
    return lines


def make_workdir(root: Path, *, seed: int = 0, with_eval: bool = True, config: Config | None = None,
                 dsc_offsets: tuple[float, ...] | None = None,
                 with_predictions: bool = True) -> Path:
    """A run workdir with every file training writes (or fewer, as asked)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps((config or Config(name="test")).to_dict()))
    with open(root / "metrics.jsonl", "w") as f:
        for line in _metrics_lines(rng, with_eval=with_eval, with_summary=with_eval):
            f.write(json.dumps(line) + "\n")
    if with_eval:
        pred = _predictions(rng)
        if with_predictions:
            np.savez(root / "predictions.npz", **pred)
        rows = _per_patient_rows(pred)
        if dsc_offsets is not None:
            for row, off in zip(rows, dsc_offsets):
                row["dsc_lcc"] = min(1.0, row["dsc_lcc"] + off)
        _write_csv(root / "per_patient.csv", rows)
    return root


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    workdir = make_workdir(tmp_path_factory.mktemp("run"))
    return report.write_report(workdir)


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


# ------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------


def test_report_links_every_figure(full_report: Path):
    assert full_report.is_file() and full_report.parent.name == report.REPORT_DIRNAME
    text = full_report.read_text()
    links = _links(text)
    for link in links:
        assert (full_report.parent / link).is_file(), link
    figures = {p.name for p in full_report.parent.iterdir() if p.suffix in (".png", ".gif")}
    assert figures == {"train_loss.png", "validation.png", "per_patient_dsc.png",
                       "per_patient_accuracy.png", "overlay_best.png", "overlay_worst.png",
                       "volume.gif"}
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


def _reference_outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def test_overlay_rgb_colours_exactly_the_outlines():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 200, (SIZE, SIZE)).astype(np.uint8)
    truth = _disc(30, 30, 10) | _disc(0, 0, 5)  # one touching the border
    pred = np.roll(_disc(30, 30, 10), 3, axis=1)
    rgb = report.overlay_rgb(gray, truth, pred)
    t, p = _reference_outline(truth), _reference_outline(pred)
    assert np.array_equal(report.outline(truth), t)
    assert (rgb[t & ~p] == (0, 255, 0)).all()
    assert (rgb[p & ~t] == (255, 0, 0)).all()
    assert (rgb[p & t] == (255, 255, 0)).all()
    rest = ~(t | p)
    assert (rgb[rest] == gray[rest][:, None]).all()


def test_patient_bar_lines_at_mean_and_median(tmp_path: Path):
    values = [0.91, 0.15, 0.77, 0.62, 0.88]
    drawn = report.plot_patient_bars(list("abcde"), values, tmp_path / "bars.png", ylabel="DSC",
                                     title="t")
    assert drawn["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert drawn["median"] == pytest.approx(np.median(values), abs=1e-12)
    assert (tmp_path / "bars.png").is_file()


def test_mean_median_ignores_nan():
    assert report.mean_median([1.0, np.nan, 0.0, 0.5]) == pytest.approx((0.5, 0.5))
    assert all(np.isnan(report.mean_median([np.nan])))


def test_moving_average_matches_direct_computation():
    x = np.random.default_rng(2).random(23)
    got = report.moving_average(x, 5)
    want = [x[max(0, i - 4): i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(got, want)


def test_select_slices_prefers_largest_lesion_or_prediction():
    truth = np.zeros((6, 8, 8), bool)
    pred = np.zeros((6, 8, 8), bool)
    truth[1, :2, :2] = True  # area 4
    truth[3, :3, :3] = True  # area 9
    pred[5, :, :] = True  # area 64
    np.testing.assert_array_equal(report.select_slices(truth, pred, 2), [3, 5])
    np.testing.assert_array_equal(report.select_slices(truth, pred, 5), [1, 3, 5])  # only non-empty
    empty = np.zeros((6, 8, 8), bool)
    np.testing.assert_array_equal(report.select_slices(empty, empty, 2), [2, 3])


def test_per_patient_recomputed_when_csv_missing(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run")
    (workdir / "per_patient.csv").unlink()
    run = report.load_run(workdir)
    assert run.per_patient_recomputed
    pred = np.load(workdir / "predictions.npz")
    for row, patient in zip(run.per_patient, PATIENTS):
        m = pred["patient"] == patient
        assert row["dsc_lcc"] == pytest.approx(np_dsc(pred["pred"][m], pred["truth"][m]))
    text = report.write_report(workdir).read_text()
    assert "per_patient.csv missing" in text


def test_no_eval_lines_gives_clear_message(tmp_path: Path, capsys):
    workdir = make_workdir(tmp_path / "run", with_eval=False)
    path = report.write_report(workdir)
    text = path.read_text()
    assert "no evaluation lines" in text
    assert "predictions.npz missing" in text
    assert (path.parent / "train_loss.png").is_file()
    assert not (path.parent / "validation.png").exists()
    for link in _links(text):
        assert (path.parent / link).is_file()
    assert report_cli.main(["--workdir", str(workdir)]) == 0
    assert "no evaluation lines" in capsys.readouterr().out


def test_truncated_metrics_line_is_skipped(tmp_path: Path):
    workdir = make_workdir(tmp_path / "run")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 31, "lo')  # a job killed mid-write
    run = report.load_run(workdir)
    assert len(run.train) == 30 and len(run.evals) == 3
    assert any("unreadable" in p for p in run.problems)


def test_empty_or_absent_workdir(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError):
        report.write_report(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.write_report(empty).read_text()
    assert "config.json missing" in text and "metrics.jsonl missing" in text
    assert report_cli.main(["--workdir", str(empty)]) == 2
    assert "holds no run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Several runs
# ------------------------------------------------------------------------------------------


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_compare_runs_table_and_figures(tmp_path: Path):
    base = Config(name="base")
    variants = {"run1": base, "batch32": base.replace(batch_size=32),
                "lr1e-3": base.replace(learning_rate=1e-3)}
    dirs = {name: make_workdir(tmp_path / name, seed=i, config=cfg,
                               dsc_offsets=(0.01 * i, -0.02 * i, 0.03 * i))
            for i, (name, cfg) in enumerate(variants.items())}
    report.write_report(dirs["run1"])  # one run with its own report: linked from the table
    path = report.compare_runs(tmp_path, dirs, "ablation")
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
        assert float(cells[columns.index("median DSC")]) == pytest.approx(np.median(values),
                                                                           abs=6e-5)
    assert rows["run1"][columns.index("differs")] == "—"
    assert rows["batch32"][columns.index("differs")] == "batch_size=32"
    assert rows["lr1e-3"][columns.index("differs")] == "learning_rate=0.001"
    assert "[report](../run1/report/report.md)" in rows["run1"][-1]
    for link in _links(text):
        assert (path.parent / link).is_file(), link
    for name in ("comparison_dsc.png", "comparison_curves.png"):
        with Image.open(path.parent / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
    assert "Pooled" not in text  # holdout runs are not pooled


def test_compare_runs_pools_cross_validation_folds(tmp_path: Path):
    base = Config(name="cv", split="fold", num_folds=2)
    dirs = {}
    for i in range(2):
        d = make_workdir(tmp_path / f"fold{i}", seed=i, config=base.replace(fold=i),
                         dsc_offsets=(0.05 * i, 0.0, 0.1 * i))
        # Distinct patients per fold, as in cross-validation.
        rows = report.read_per_patient(d / "per_patient.csv")
        for row in rows:
            row["patient"] = f"{row['patient']}_f{i}"
        _write_csv(d / "per_patient.csv", rows)
        dirs[f"fold{i}"] = d
    (tmp_path / "fold1" / "metrics.jsonl").write_text("")  # a fold without logs yet
    text = report.compare_runs(tmp_path, dirs, "cv").read_text()
    pooled = [r["dsc_lcc"] for d in dirs.values()
              for r in report.read_per_patient(d / "per_patient.csv")]
    m = re.search(r"\*\*(\d+) patients\*\*, mean per-patient DSC \*\*([0-9.]+)\*\*, median "
                  r"\*\*([0-9.]+)\*\*", text)
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
    diffs = report.config_differences({"a": a, "b": {**a, "name": "b", "x": 5},
                                       "c": {**a, "name": "c", "y": 7}, "d": None})
    assert diffs == {"a": {}, "b": {"x": 5}, "c": {"y": 7}, "d": {}}
