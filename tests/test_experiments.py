"""`python -m experiments.run`: the smoke experiment end to end, and its error paths."""

import csv
import re

import numpy as np
import pytest
from PIL import Image

from experiments.run import main
from unet_jax import metrics


@pytest.mark.slow
def test_smoke_runs_end_to_end_and_writes_a_sane_report(smoke_workdir):
    # smoke_workdir (conftest.py): `--exp=smoke` run once, shared with test_predict.py.
    wd = smoke_workdir
    report = wd / "report" / "report.md"
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+\.(?:png|gif|csv))\)", text)
    assert {
        "train_loss.png",
        "validation.png",
        "per_patient_dsc.png",
        "per_patient_accuracy.png",
        "overlay_best.png",
        "overlay_worst.png",
        "volume.gif",
    } <= set(links)
    for link in links:
        path = report.parent / link
        assert path.is_file(), link
        if link.endswith(".png"):
            with Image.open(path) as im:
                assert im.format == "PNG" and im.width >= 300 and im.height >= 200, (link, im.size)
    with Image.open(report.parent / "volume.gif") as gif:
        assert gif.n_frames > 1

    rows = list(csv.DictReader(open(wd / "per_patient.csv")))
    pred = np.load(wd / "predictions.npz")
    patients = sorted(set(pred["patient"].tolist()))
    assert [r["patient"] for r in rows] == patients and len(rows) == 3
    dsc = np.array([float(r["dsc_lcc"]) for r in rows])
    assert ((0 <= dsc) & (dsc <= 1)).all()
    # Beats the trivial all-background predictor, scored the same way (per volume, mean).
    trivial = np.mean(
        [
            metrics.dsc(
                np.zeros_like(pred["truth"][pred["patient"] == p]),
                pred["truth"][pred["patient"] == p],
            )
            for p in patients
        ]
    )
    assert dsc.mean() > trivial + 0.3, (dsc.mean(), trivial)
    assert (wd / "config.json").is_file() and (wd / "checkpoints" / "best").is_dir()


def test_unknown_experiment_and_key_list_the_valid_ones(capsys):
    assert main(["--exp=nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "run1" in err and "smoke" in err
    assert main(["--exp=run1", "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "learning_rate" in err


def test_real_data_experiment_without_data_gives_download_instructions(tmp_path, capsys):
    code = main(
        [
            "--exp=run1",
            "--workdir",
            str(tmp_path / "wd"),
            "--data_dir",
            str(tmp_path / "tfds"),
            "--manual_dir",
            str(tmp_path / "nothing"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "kaggle" in err.lower() and "Traceback" not in err and "--manual_dir" in err


def test_seeds_repeat_every_run_and_only_seeds_of_one_run_on_real_data_pack():
    from experiments.run import groups, parse_args, resolve

    args = parse_args(["--exp=ablation", "--seeds", "0,1", "--set", "pack_runs=true"])
    runs = resolve("ablation", args)
    assert list(runs)[:3] == ["run1/seed0", "run1/seed1", "batch32/seed0"]
    assert len(runs) == 10
    assert runs["lr1e-3/seed1"].seed == 1 and runs["lr1e-3/seed1"].learning_rate == 1e-3
    assert runs["lr1e-3/seed1"].name == "ablation-lr1e-3-seed1"
    # Each arm's two seeds pack; arms differ in more than the seed and stay apart.
    assert groups(runs) == [
        [f"{arm}/seed0", f"{arm}/seed1"]
        for arm in ("run1", "batch32", "lr1e-3", "wd1e-4", "epochs10")
    ]
    # Without pack_runs, or on synthetic data (generated from the seed), nothing packs.
    plain = resolve("ablation", parse_args(["--exp=ablation", "--seeds", "0,1"]))
    assert all(len(g) == 1 for g in groups(plain))
    synth = resolve(
        "smoke", parse_args(["--exp=smoke", "--seeds", "0,1", "--set", "pack_runs=true"])
    )
    assert list(synth) == ["seed0", "seed1"]  # <workdir>/seed0, <workdir>/seed1
    assert all(len(g) == 1 for g in groups(synth))
    for bad in ("0,0", "a,b", ","):
        with pytest.raises(ValueError, match="--seeds"):
            resolve("smoke", parse_args(["--exp=smoke", "--seeds", bad]))
