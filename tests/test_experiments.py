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


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_from_what_was_safe(tmp_path):
    # A real failed write: after epoch 1 (step 4, checkpointed) the worker limits the size of
    # the files it may write (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC), so saving
    # step 8's checkpoint fails inside Orbax's threads. Expected: exit 1, stderr exactly one
    # line naming the failed write and the safe checkpoint (no Orbax/asyncio tracebacks), and
    # once space is back the same command resumes from step 4 and finishes.
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parent / "_full_disk_worker.py"
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    wd = tmp_path / "run"
    full = subprocess.run(
        [sys.executable, str(worker), str(wd), "1", "20000"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert full.returncode == 1, full.stderr[-3000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1, full.stderr[-3000:]
    assert lines[0].startswith("error: writing ") and "File too large" in lines[0]
    assert f"Safe: step 4 in {wd / 'checkpoints' / 'latest'}" in lines[0]
    again = subprocess.run(
        [sys.executable, str(worker), str(wd)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "at step 4" in again.stdout
    assert sorted(p.name for p in (wd / "checkpoints" / "latest").iterdir()) == ["12", "8"]


def test_run_folder_problems_are_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys):
    # A config.json that is not JSON, and a workdir another run holds (a real second process
    # holding the lock): one `error:` line naming the file or folder, exit 2, no traceback.
    import subprocess
    import sys

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text("{not json")
    assert main(["--exp=smoke", "--workdir", str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.json" in err[0]
    assert sorted(p.name for p in wd.iterdir()) == [".lock", "config.json"]

    held = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from unet_jax.rundir import lock_workdir; "
         "lock = lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(held)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["--exp=smoke", "--workdir", str(held)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(held) in err[0] and str(holder.pid) in err[0]
        assert not (held / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_known_failures_map_to_one_line_and_an_exit_code(tmp_path):
    import errno

    from experiments.run import failure
    from unet_jax.checkpoint import CheckpointError
    from unet_jax.train import DivergedError

    (tmp_path / "checkpoints" / "latest" / "12").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest" / "8.orbax-checkpoint-tmp").mkdir()
    try:  # a full disk deep in a chain, as Orbax wraps it
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        message, code = failure(e, [tmp_path])
    assert code == 1 and f"writing {tmp_path / 'x'} failed: No space left on device" in message
    assert f"Safe: step 12 in {tmp_path / 'checkpoints' / 'latest'}" in message
    assert failure(CheckpointError("damaged\nfolder"), [tmp_path]) == ("damaged folder", 2)
    assert failure(DivergedError("diverged"), [tmp_path]) == ("diverged", 1)
    assert failure(ZeroDivisionError("a bug"), [tmp_path]) is None  # keeps its traceback
