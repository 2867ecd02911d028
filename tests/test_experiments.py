"""`python -m experiments.run`: the smoke experiment end to end, and its error paths."""

import csv
import json
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


def _fake_training(monkeypatch):
    """experiments.run's training replaced by fabricated run folders (tests/_fake_run.py): the
    command's own work (configs, lines, comparison) without training."""
    from pathlib import Path

    import experiments.run as run_cli
    import unet_jax.train
    from _fake_run import make_workdir

    def train_runs(configs, workdirs, **_):
        for config, workdir in zip(configs, workdirs):
            offset = 0.02 * config.seed
            make_workdir(
                Path(workdir), seed=config.seed, config=config, dsc_offsets=(offset, 0.0, offset)
            )

    monkeypatch.setattr(unet_jax.train, "train_runs", train_runs)
    monkeypatch.setattr(run_cli, "_write_report", lambda config, workdir: None)


def test_seeds_of_a_single_run_experiment_get_the_seed_spread_table(tmp_path, monkeypatch, capsys):
    # Issue: `--exp=cpu_quick --seeds 0,1` wrote a comparison without the promised "seeds:
    # spread" section (its runs are named seed0, seed1: no "<setting>/seed<N>"). Each run is
    # announced in one line naming what differs from the experiment's config (not 45 lines of
    # JSON; the whole config is in config.json).
    _fake_training(monkeypatch)
    assert main(["--exp=cpu_quick", "--seeds", "0,1", "--workdir", str(tmp_path)]) == 0
    text = (tmp_path / "report" / "comparison.md").read_text()
    assert "## Seeds: spread of each setting" in text
    section = text.split("## Seeds")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| cpu_quick |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    means = []
    for s in (0, 1):
        with open(tmp_path / f"seed{s}" / "per_patient.csv") as f:
            means.append(np.mean([float(r["dsc_lcc"]) for r in csv.DictReader(f)]))
    assert cells[1] == "2"
    assert float(cells[2]) == pytest.approx(np.mean(means), abs=6e-5)
    assert float(cells[3]) == pytest.approx(np.std(means, ddof=1), abs=6e-5)
    out = capsys.readouterr().out.splitlines()
    announced = [line for line in out if line.startswith("=== ")]
    assert announced == [
        f"=== cpu_quick/seed{s} -> {tmp_path / f'seed{s}'}: the cpu_quick config with "
        f"seed={s} (all fields: {tmp_path / f'seed{s}' / 'config.json'})"
        for s in (0, 1)
    ]
    assert not any(line.lstrip().startswith(("{", '"')) for line in out)  # no JSON


def test_config_line_names_the_overrides_of_a_sub_run(tmp_path):
    from experiments.run import config_line, parse_args, resolve

    args = parse_args(["--exp=ablation", "--only", "lr1e-3", "--set", "epochs=2", "--seeds", "3"])
    ((name, config),) = resolve("ablation", args).items()
    line = config_line("ablation", name, config, tmp_path / name, multi=True)
    assert line == (
        f"=== ablation/lr1e-3/seed3 -> {tmp_path / name}: the ablation/lr1e-3 config with "
        f"epochs=2, seed=3 (all fields: {tmp_path / name / 'config.json'})"
    )
    config = resolve("smoke", parse_args(["--exp=smoke"]))["smoke"]
    assert config_line("smoke", "smoke", config, tmp_path, multi=False) == (
        f"=== smoke -> {tmp_path}: the smoke config unchanged (all fields: "
        f"{tmp_path / 'config.json'})"
    )


def test_empty_seeds_are_refused_in_one_line(tmp_path, capsys):
    # Issue: `--seeds ""` was ignored (one seed-42 run, exit 0), unlike other bad seeds.
    assert main(["--exp=smoke", "--seeds", "", "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --seeds") and "''" in err[0]
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_output_to_a_file_gets_a_line_per_epoch_and_no_terminal_noise(tmp_path):
    # Issue: `python -m experiments.run --exp=smoke > log 2>&1` logged the config (~45 lines of
    # JSON), TFDS's progress bars (carriage returns, ESC[A), nothing per epoch, and a `done:`
    # DSC with 17 digits. A small smoke run with stdout and stderr to a pipe (not a terminal).
    import subprocess
    import sys
    from pathlib import Path

    wd = tmp_path / "smoke"
    sets = {"epochs": "3", "image_size": "64", "features": "4", "synthetic_patients": "6",
            "synthetic_slices": "8,10", "num_folds": "3", "write_report": "false"}  # fmt: skip
    command = [sys.executable, "-m", "experiments.run", "--exp=smoke", "--workdir", str(wd)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:]
    assert "\r" not in out and "\x1b" not in out, out  # no progress bar's redraws
    assert "WARNING:absl" not in out
    lines = out.splitlines()
    config_lines = [line for line in lines if line.startswith("=== smoke")]
    assert config_lines == [
        f"=== smoke -> {wd}: the smoke config with synthetic_patients=6, synthetic_slices=[8, "
        "10], image_size=64, num_folds=3, features=4, epochs=3, write_report=false (all fields: "
        f"{wd / 'config.json'})"
    ]
    assert not any(line.lstrip().startswith(("{", '"')) for line in lines)
    epoch = re.compile(
        r"smoke: epoch (\d)/3, step (\d+)/(\d+): train loss (\d\.\d{4}), val DSC (\d\.\d{4}), "
        r"best (\d\.\d{4})( \(this epoch\))?, (\d+\.\d) images/s, elapsed \d:\d\d:\d\d, "
        r"ETA (\d:\d\d:\d\d|\?)"
    )
    found = [m for m in map(epoch.fullmatch, lines) if m]
    evals = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert [int(m[1]) for m in found] == [r["epoch"] for r in evals] == [1, 2, 3]
    best = 0.0
    for m, record in zip(found, evals):
        assert int(m[2]) == record["step"] and int(m[3]) == evals[-1]["step"]
        assert m[5] == f"{record['val_dsc']:.4f}"
        best = max(best, record["val_dsc"])
        assert m[6] == f"{best:.4f}" and bool(m[7]) == record["best"]
    assert lines.index(found[-1][0]) < next(
        i for i, ln in enumerate(lines) if ln.startswith("done:")
    )
    last = re.search(r"^done: smoke: 9 steps, best validation DSC (\S+), last (\S+) — ", out, re.M)
    assert last, out
    assert last[1] == str(round(best, 4)) and last[2] == str(round(evals[-1]["val_dsc"], 4))


@pytest.mark.slow
def test_a_run_resumes_after_its_data_moved_and_a_real_change_is_still_refused(
    tmp_path, monkeypatch, capsys
):
    # A user moves the data folder of an interrupted run and resumes it with the new --data_dir
    # (and another log_every_steps): where the data lies and what is logged are execution-only
    # (unet_jax.config.execution_fields), so the run resumes from its checkpoint rather than
    # being refused, and config.json shows the settings it now uses. Tiny synthetic data, 3
    # epochs, stopped (SIGTERM, as a scheduler sends) once epoch 1 is evaluated.
    import os
    import shutil
    import signal

    import unet_jax.train
    from unet_jax.checkpoint import latest_step

    wd, old, new = tmp_path / "run", tmp_path / "data", tmp_path / "moved" / "data"
    sets = {"epochs": "3", "image_size": "32", "features": "4", "batch_size": "2",
            "synthetic_patients": "6", "synthetic_slices": "4,5", "num_folds": "3",
            "write_report": "false", "log_every_steps": "1"}  # fmt: skip
    command = ["--exp=smoke", "--workdir", str(wd)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    train_runs = unet_jax.train.train_runs

    def stopped_after_epoch_1(*args, **kwargs):
        def stop(epoch, _):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        return train_runs(*args, on_epoch_end=stop, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(unet_jax.train, "train_runs", stopped_after_epoch_1)
        assert main([*command, "--data_dir", str(old)]) == 130
    log = (wd / "metrics.jsonl").read_bytes()
    first = [json.loads(line) for line in log.splitlines()]
    per_epoch = next(r["step"] for r in first if r["type"] == "eval")  # epoch 1's evaluation
    stopped, total = latest_step(wd), 3 * per_epoch
    assert per_epoch > 2 and per_epoch <= stopped < total, (per_epoch, stopped)
    assert [r["step"] for r in first if r["type"] == "train"] == list(range(1, stopped + 1))
    capsys.readouterr()

    new.parent.mkdir()
    shutil.move(old, new)
    # Another learning rate is a different run: still refused, before anything is written.
    assert main([*command, "--data_dir", str(new), "--set", "learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "--restart" in err and "data_dir" not in err
    assert (wd / "metrics.jsonl").read_bytes() == log

    resumed = [*command, "--data_dir", str(new), "--set", "log_every_steps=2"]
    assert main(resumed) == 0
    out = capsys.readouterr().out
    assert f"resuming {wd} at step {stopped}" in out, out
    assert "generating synthetic data" not in out and not old.exists()  # the moved data read
    after = (wd / "metrics.jsonl").read_bytes()
    assert after.startswith(log)  # the earlier lines kept, none logged twice
    records = [json.loads(line) for line in after.splitlines()]
    train = [r["step"] for r in records if r["type"] == "train"]
    # From the resume on, every 2nd step of an epoch and its last (log_every_steps=2).
    expected, start = list(range(1, stopped + 1)), stopped
    while start < total:
        end = (start // per_epoch + 1) * per_epoch
        expected += [*range(start + 2, end, 2), end]
        start = end
    assert train == expected, (per_epoch, stopped)
    evals = [r["step"] for r in records if r["type"] == "eval"]
    assert evals == [per_epoch, 2 * per_epoch, total]
    assert records[-1]["type"] == "summary" and records[-1]["step"] == total
    saved = json.loads((wd / "config.json").read_text())
    assert saved["data_dir"] == str(new) and saved["log_every_steps"] == 2
