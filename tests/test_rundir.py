"""Tests of unet_jax.rundir: preparing, locking and logging a run folder, damaged or incomplete."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _checks import assert_one_line
from _fake_run import make_workdir
from unet_jax import rundata, rundir
from unet_jax.config import Config
from unet_jax.rundir import (
    ConfigMismatchError,
    RunFolderError,
    WorkdirLockedError,
    lock_workdir,
    prepare_workdir,
)

REPO = Path(__file__).resolve().parent.parent


def test_different_config_on_existing_workdir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(Config(name="a").to_json())
    with pytest.raises(ConfigMismatchError, match="name"):
        prepare_workdir(Config(name="b"), tmp_path, restart=False)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    prepare_workdir(Config(name="b"), tmp_path, restart=True)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "b"


@pytest.mark.parametrize(
    "text, what",
    [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")],
)
def test_damaged_config_json_is_refused_in_one_line(tmp_path, text, what):
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(text)
    with pytest.raises(RunFolderError) as e:
        prepare_workdir(Config(name="a"), tmp_path, restart=False)
    assert_one_line(e.value, str(cfg_file), what, "--restart")
    # --restart replaces it, whatever it holds.
    prepare_workdir(Config(name="a"), tmp_path, restart=True)
    assert json.loads(cfg_file.read_text())["name"] == "a"


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
    for attempt in (
        lambda: prepare_workdir(Config(name="a"), workdir, restart=False),
        lambda: lock_workdir(workdir),
    ):
        with pytest.raises(RunFolderError) as e:
            attempt()
        assert_one_line(e.value, f"cannot create the workdir {workdir}", "--workdir")


def test_read_only_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    cfg = Config(name="test")
    workdir = make_workdir(tmp_path / "run", config=cfg)
    before = sorted(p.name for p in workdir.iterdir())
    if os.geteuid() == 0:
        # Root writes into a chmod-ed folder: fail the write probe as a read-only mount does.
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    else:
        workdir.chmod(0o555)
    try:
        for attempt in (
            lambda: prepare_workdir(cfg, workdir, restart=True),  # would delete the run
            lambda: prepare_workdir(Config(name="other"), workdir, restart=False),
            lambda: lock_workdir(workdir),
        ):
            with pytest.raises(RunFolderError) as e:
                attempt()
            assert_one_line(e.value, f"the workdir {workdir} is not writable")
    finally:
        workdir.chmod(0o755)
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_torn_last_log_line_is_cut_off_on_resume(tmp_path, capsys):
    cfg = Config(name="test")
    workdir = make_workdir(tmp_path / "run", config=cfg)
    log = workdir / "metrics.jsonl"
    good = log.read_bytes()
    with open(log, "ab") as f:
        f.write(b'{"type": "train", "step": 31, "lo')  # a run killed mid-write
    prepare_workdir(cfg, workdir, restart=False)
    assert log.read_bytes() == good
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and f"{log}: cut off a torn last line (line 35" in notice
    assert not any("unreadable" in p for p in rundata.load_run(workdir).problems)

    # A complete last line without its newline only gets the newline (the next line is apart).
    log.write_bytes(good[:-1])
    prepare_workdir(cfg, workdir, restart=False)
    assert log.read_bytes() == good and capsys.readouterr().err == ""
    # Not on process > 0 of a multi-host run (it writes nothing).
    log.write_bytes(good + b"{")
    prepare_workdir(cfg, workdir, restart=False, write_config=False)
    assert log.read_bytes() == good + b"{"


def test_damaged_log_line_before_the_last_is_refused(tmp_path):
    cfg = Config(name="test")
    workdir = make_workdir(tmp_path / "run", config=cfg)
    log = workdir / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[4] = '{"type": "train", "st\n'
    log.write_text("".join(lines))
    with pytest.raises(RunFolderError) as e:
        prepare_workdir(cfg, workdir, restart=False)
    assert_one_line(e.value, f"{log}, line 5: not a JSON object", "--restart")
    run_log = rundir.RunLog(workdir, enabled=True)
    for attempt in (lambda: run_log.truncate_after(10), lambda: run_log.has("eval", 10)):
        with pytest.raises(RunFolderError, match="line 5"):
            attempt()
    run_log.close()
    # Reports still read around it.
    assert any("unreadable" in p for p in rundata.load_run(workdir).problems)


def test_log_truncation_for_resume_and_for_a_start_without_checkpoint(tmp_path):
    workdir = make_workdir(tmp_path / "run")  # 3 epochs of 10 steps, evaluated, a summary
    log = rundir.RunLog(workdir, enabled=True)
    log.truncate_after(20)  # resume from step 20: what was logged after it goes
    train, evals, summary, _ = rundata.read_metrics(log.path)
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in evals] == [10, 20]
    assert log.has("eval", 20) and not log.has("eval", 30)
    # A run killed before its first checkpoint starts over from step 0: its lines all go.
    log.truncate_after(0)
    assert log.path.read_text() == "" and not log.has("eval", 10)
    log.write({"type": "train", "step": 1, "loss": 0.5})
    assert [r["step"] for r in rundata.read_metrics(log.path)[0]] == [1]
    log.close()
    assert not (workdir / "metrics.tmp").exists()


_HOLDER = """
import sys
from unet_jax import rundir
lock = rundir.lock_workdir(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # hold the lock until killed
"""


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        with pytest.raises(WorkdirLockedError) as e:
            lock_workdir(workdir)
        assert_one_line(e.value, str(workdir), f"pid {holder.pid} on ", "--workdir")
        assert isinstance(e.value, RunFolderError)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.communicate()
    # The OS dropped the dead process's lock: no stale lock.
    with lock_workdir(workdir) as lock:
        assert lock.held
        assert (workdir / ".lock").read_text().split()[0] == str(os.getpid())
    assert not lock.held and (workdir / ".lock").read_text() == ""


def _locked_elsewhere(path: Path) -> bool:
    """Whether a lock on ``path`` is held (another open file, as another process would)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_lock_nests_within_a_process_and_can_be_disabled(tmp_path):
    lock_file = tmp_path / ".lock"
    outer = lock_workdir(tmp_path)
    with lock_workdir(tmp_path) as inner:  # a packed run resuming its runs one by one
        assert inner.held
    assert outer.held and _locked_elsewhere(lock_file)
    outer.release()
    outer.release()  # idempotent
    assert not _locked_elsewhere(lock_file)

    # The other processes of a multi-host run hold nothing.
    disabled = lock_workdir(tmp_path / "other", enabled=False)
    assert not disabled.held and not (tmp_path / "other").exists()
    disabled.release()


def test_a_resume_takes_changed_execution_fields_and_refuses_the_rest(tmp_path):
    # Where the data lies and how a run executes, logs or reports are execution-only
    # (unet_jax.config.execution_fields): a resume with them changed goes on, and config.json
    # then shows the settings the run now uses; any other change is refused.
    cfg = Config(name="run", data_dir=str(tmp_path / "data"))
    workdir = make_workdir(tmp_path / "run", config=cfg)
    log = (workdir / "metrics.jsonl").read_bytes()
    changed = cfg.replace(
        data_dir=str(tmp_path / "moved"),
        manual_dir=str(tmp_path / "download"),
        epoch_loop="host",
        log_every_steps=1,
        write_report=False,
        keep_latest=5,
        pack_runs=True,
        pack_mode="unroll",
    )
    prepare_workdir(changed, workdir, restart=False)
    assert Config.from_dict(json.loads((workdir / "config.json").read_text())) == changed
    assert (workdir / "metrics.jsonl").read_bytes() == log  # resumed, nothing deleted
    for key, value in [("learning_rate", 1e-3), ("epochs", 7), ("seed", 1), ("threshold", 0.4)]:
        with pytest.raises(ConfigMismatchError) as e:
            prepare_workdir(changed.replace(**{key: value}), workdir, restart=False)
        assert_one_line(e.value, f"differs in: ['{key}']", "--restart")
    assert Config.from_dict(json.loads((workdir / "config.json").read_text())) == changed
