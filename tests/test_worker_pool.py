"""The builder's worker pool (`datasets/lgg_mri_segmentation/worker_pool.py`): never a hang where
spawn cannot re-run the main script, and a worker that dies is an error naming the patient.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _lgg_setup import (
    NAME,
    all_examples,
    assert_same_examples,
)
from datasets import lgg_mri_segmentation as lgg

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# worker processes where the main script cannot be re-run ("spawn" re-runs it): never a hang

_BUILD_SCRIPT = """\
import sys
sys.path.insert(0, {repo!r})
from datasets.lgg_mri_segmentation import build

build({manual!r}, {data_dir!r}, "raw", num_workers=2)
print("built")
"""


def _run_build_script(args: list[str], cwd: Path, stdin: str | None = None):
    """Run Python with ``args`` in ``cwd``; returns (completed process, the warning lines)."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=50,  # a hang fails the test (TimeoutExpired): the build takes a few seconds
    )
    lines = [ln for ln in out.stderr.splitlines() if "reading in this process instead" in ln]
    return out, lines


def _assert_built_in_process(out, lines, data_dir: Path, synthetic_tfds_dir: Path) -> str:
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "built"  # the script ran to its end
    assert "Traceback" not in out.stderr
    (line,) = lines  # one warning, naming the fix
    assert "instead of in 2 worker processes" in line
    assert "`if __name__ == '__main__':`" in line and "num_workers=0" in line
    for split in ("train", "validation"):
        assert_same_examples(
            all_examples(data_dir, "raw", split), all_examples(synthetic_tfds_dir, "raw", split)
        )
    return line


def test_build_from_a_script_on_standard_input_reads_in_process(
    synthetic_manual_dir, synthetic_tfds_dir, tmp_path
):
    # `python - < build.py`: workers cannot re-run '<stdin>'; seen up front, no worker started.
    data_dir = tmp_path / "d"
    script = _BUILD_SCRIPT.format(
        repo=str(REPO), manual=str(synthetic_manual_dir), data_dir=str(data_dir)
    )
    out, lines = _run_build_script(["-"], tmp_path, stdin=script)
    line = _assert_built_in_process(out, lines, data_dir, synthetic_tfds_dir)
    assert "'<stdin>' is not a file" in line


def test_build_from_a_script_without_main_guard_reads_in_process(
    synthetic_manual_dir, synthetic_tfds_dir, tmp_path
):
    # Each worker re-runs the script, which builds again: the workers end, the build goes on here.
    data_dir = tmp_path / "d"
    script = tmp_path / "build_lgg.py"
    script.write_text(
        _BUILD_SCRIPT.format(
            repo=str(REPO), manual=str(synthetic_manual_dir), data_dir=str(data_dir)
        )
    )
    out, lines = _run_build_script([str(script)], tmp_path)
    line = _assert_built_in_process(out, lines, data_dir, synthetic_tfds_dir)
    assert f"re-running the main script {script}, which builds the data set" in line


def _child_with_file_open(parent: int, path: Path) -> int | None:
    """The id of a child process of ``parent`` that has ``path`` open (from /proc), or None."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((proc / "status").read_text().split("PPid:")[1].split()[0])
            if ppid == parent and str(path) in (os.readlink(f) for f in (proc / "fd").iterdir()):
                return int(proc.name)
    return None


@pytest.mark.skipif(
    not hasattr(os, "mkfifo") or not Path("/proc/self/fd").is_dir(),
    reason="needs named pipes and /proc (Linux)",
)
def test_worker_killed_while_reading_is_an_error_naming_the_patient(manual, tmp_path):
    # A slice of a training patient (read by a worker; the one validation patient is read in
    # the command's own process) made a named pipe: the worker reading it blocks there.
    root = manual / "kaggle_3m"
    train, _ = lgg.split_patients(p.name for p in root.iterdir() if p.is_dir())
    pipe = root / train[0] / f"{train[0]}_2.tif"
    pipe.unlink()
    os.mkfifo(pipe)
    child = subprocess.Popen(
        [sys.executable, "-m", "datasets.lgg_mri_segmentation", "--manual_dir", str(manual)]
        + ["--data_dir", str(tmp_path / "d"), "--config", "raw", "--num_workers", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    fd = None
    try:
        deadline = time.monotonic() + 40
        reader = None  # the command's worker process that has the pipe open
        while reader is None:
            assert time.monotonic() < deadline and child.poll() is None, "no worker read the pipe"
            if fd is None:
                with contextlib.suppress(OSError):  # succeeds once a reader has it open
                    fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            if fd is not None:
                reader = _child_with_file_open(child.pid, pipe)
            time.sleep(0.05)
        os.kill(reader, signal.SIGKILL)
        out, err = child.communicate(timeout=40)
    finally:
        if fd:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]  # the end of the traceback: the reason and the fix
    assert "a worker process ended (killed by SIGKILL)" in last, err[-3000:]
    assert f"while reading {train[0]}" in last and "num_workers=0" in last
    assert not list((tmp_path / "d" / NAME / "raw").glob("*"))
