"""`python -m datasets.lgg_mri_segmentation`: worker processes, the zip as manual directory,
Ctrl-C and killed builds (nothing left behind), and Hugging Face's `datasets` installed beside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from _lgg_setup import (
    NAME,
    all_examples,
    assert_same_examples,
    first_patient,
)
from datasets import lgg_mri_segmentation as lgg

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# the command line, worker processes, and HuggingFace's `datasets` next to ours


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_command_line_with_worker_processes(
    tmp_path, synthetic_manual_dir, synthetic_tfds_dir, manual
):
    out = _run(
        [
            "-m",
            "datasets.lgg_mri_segmentation",
            "--manual_dir",
            str(synthetic_manual_dir),
            "--data_dir",
            str(tmp_path / "d"),
            "--config",
            "all",
            "--num_workers",
            "2",
        ],
        REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{NAME}/baseline: train:" in out.stdout and f"{NAME}/raw: train:" in out.stdout
    # Same data as the in-process build.
    for config in ("raw", "baseline"):
        for split in ("train", "validation"):
            assert_same_examples(
                all_examples(tmp_path / "d", config, split),
                all_examples(synthetic_tfds_dir, config, split),
            )
    # An error raised in a worker process reaches the user with the file name.
    folder = first_patient(manual)
    bad = folder / f"{folder.name}_4.tif"
    bad.write_bytes(bad.read_bytes()[:1000])
    out = _run(
        [
            "-m",
            "datasets.lgg_mri_segmentation",
            "--manual_dir",
            str(manual),
            "--data_dir",
            str(tmp_path / "e"),
            "--num_workers",
            "2",
        ],
        REPO,
    )
    assert out.returncode == 2
    assert "cannot read the TIFF" in out.stderr and str(bad) in out.stderr


def test_the_zip_archive_itself_as_manual_dir(layouts, synthetic_tfds_dir, tmp_path, capsys):
    from datasets.lgg_mri_segmentation.__main__ import main

    archive = tmp_path / "archive.zip"  # the name Kaggle's download button gives
    shutil.copy(next(layouts["zip"].glob("*.zip")), archive)
    args = ["--manual_dir", str(archive), "--config", "raw", "--num_workers", "0"]
    assert main([*args, "--data_dir", str(tmp_path / "a")]) == 0
    for split in ("train", "validation"):
        assert_same_examples(
            all_examples(tmp_path / "a", "raw", split),
            all_examples(synthetic_tfds_dir, "raw", split),
        )
    assert lgg.open_source(archive) == lgg.Source("kaggle_3m", str(archive))
    capsys.readouterr()
    # Not the archive, a truncated download, an archive of something else: one line naming it.
    other = tmp_path / "notes.txt"
    other.write_text("x")
    truncated = tmp_path / "partial.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    unrelated = tmp_path / "photos.zip"
    with zipfile.ZipFile(unrelated, "w") as zf:
        zf.writestr("holiday/beach.jpg", b"x")
    for path, what in (
        (other, "not a folder or a zip archive"),
        (truncated, "cannot read the zip archive"),
        (unrelated, "no LGG data found in the zip archive"),
    ):
        args[1] = str(path)
        assert main([*args, "--data_dir", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert str(path) in line and what in line
    assert not is_built_here(tmp_path / "b")


def is_built_here(data_dir: Path) -> bool:
    return any((data_dir / NAME).glob("*/*/dataset_info.json"))


def _blocking_manual(manual: Path) -> Path:
    """Turn one slice of ``manual`` into a named pipe: a build blocks reading it (a reproducible
    point in the middle of a build). Returns the pipe."""
    folder = first_patient(manual)
    pipe = folder / f"{folder.name}_2.tif"
    pipe.unlink()
    os.mkfifo(pipe)
    return pipe


def _start_blocked_build(manual: Path, data_dir: Path, workers: int):
    """The command in a child process (its own process group, as a terminal's foreground job),
    returned once the build blocks on the pipe; and the pipe's write end (kept open: the reader
    waits for data)."""
    pipe = _blocking_manual(manual)
    # A terminal's foreground job takes Ctrl-C; a harness that starts the tests in the
    # background (`cmd &` without job control) ignores SIGINT, and an ignored signal stays
    # ignored in children: with a handler here during the start, the child gets the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child = _popen_build(manual, data_dir, workers)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while True:
        try:  # succeeds once a reader has the pipe open: the build is in the middle
            return child, os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        if child.poll() is not None:
            pytest.fail(f"the build ended first:\n{child.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            pytest.fail("the build never reached the pipe")
        time.sleep(0.05)


def _popen_build(manual: Path, data_dir: Path, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "datasets.lgg_mri_segmentation", "--manual_dir", str(manual)]
        + ["--data_dir", str(data_dir), "--config", "raw", "--num_workers", str(workers)],
        cwd=REPO,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # stacks on SIGABRT, for a hang's report
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_ctrl_c_of_the_command_is_one_line_and_leaves_nothing(manual, tmp_path):
    # Ctrl-C in a terminal signals the whole foreground process group: the command and its
    # worker processes.
    child, fd = _start_blocked_build(manual, tmp_path / "d", workers=2)
    try:
        os.killpg(child.pid, signal.SIGINT)
        try:
            out, err = child.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # report where each process of the build waits
            ps = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,wchan:20,cmd", "-g", str(child.pid)],
                capture_output=True,
                text=True,
            ).stdout
            os.killpg(child.pid, signal.SIGABRT)
            out, err = child.communicate(timeout=60)
            pytest.fail(f"the build did not stop on SIGINT:\n{ps}\n{err[-8000:]}")
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert f"{NAME}/raw" in line and str(tmp_path / "d") in line
    assert not list((tmp_path / "d" / NAME / "raw").glob("*"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_leftovers_of_a_killed_build_are_removed_by_the_next(
    manual, synthetic_manual_dir, synthetic_tfds_dir, tmp_path, capsys
):
    from datasets.lgg_mri_segmentation.__main__ import main

    data_dir = tmp_path / "d"
    child, fd = _start_blocked_build(manual, data_dir, workers=0)
    os.killpg(child.pid, signal.SIGKILL)
    child.communicate(timeout=240)
    os.close(fd)
    leftovers = list((data_dir / NAME / "raw").glob("incomplete.*"))
    assert len(leftovers) == 1 and leftovers[0].is_dir()
    # Look-alikes that are not leftovers of this builder's builds stay.
    others = [
        data_dir / "other_dataset" / "raw" / leftovers[0].name,  # another builder's
        data_dir / NAME / "raw" / "incomplete_notes",  # not TFDS's pattern
    ]
    for other in others:
        other.mkdir(parents=True)
    (data_dir / NAME / "raw" / "incomplete.ABCDEF_1.0.0").write_text("a file, not a build")
    capsys.readouterr()
    args = ["--manual_dir", str(synthetic_manual_dir), "--data_dir", str(data_dir)]
    assert main([*args, "--config", "raw", "--num_workers", "0"]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "interrupted build" in ln]
    assert str(leftovers[0]) in line
    assert not leftovers[0].exists()
    assert all(other.is_dir() for other in others)
    assert (data_dir / NAME / "raw" / "incomplete.ABCDEF_1.0.0").is_file()
    for split in ("train", "validation"):
        assert_same_examples(
            all_examples(data_dir, "raw", split), all_examples(synthetic_tfds_dir, "raw", split)
        )


def _fake_huggingface_datasets(root: Path) -> Path:
    """A stand-in for HuggingFace's `datasets` (a package with relative imports)."""
    pkg = root / "datasets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '__version__ = "9.9.9"\nfrom . import config\nfrom .arrow_dataset import Dataset\n'
        "def load_dataset(name):\n    return Dataset(name)\n"
    )
    (pkg / "config.py").write_text("HF_NAME = 'fake'\n")
    (pkg / "arrow_dataset.py").write_text(
        "from . import config\nclass Dataset:\n    def __init__(self, name):\n"
        "        self.name = name + ':' + config.HF_NAME\n"
    )
    return root


def test_works_next_to_huggingface_datasets(tmp_path):
    site = _fake_huggingface_datasets(tmp_path / "site")
    env = {"PYTHONPATH": str(site)}
    code = (
        "import datasets.lgg_mri_segmentation as lgg, datasets\n"
        "assert lgg.Builder.name == 'lgg_mri_segmentation'\n"
        "from datasets import load_dataset\n"
        "import datasets.arrow_dataset\n"
        "print(load_dataset('x').name, datasets.__version__)\n"
    )
    # Run from the project's root (as the documented command): ours first on sys.path.
    out = _run(["-c", code], REPO, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["x:fake", "9.9.9"]
    # Elsewhere, HuggingFace's package wins `import datasets`; ours is still found through the
    # project's editable install (when the project is installed that way).
    probe = _run(["-c", "import datasets; print(datasets.__file__)"], tmp_path)
    if probe.returncode != 0 or not probe.stdout.strip().startswith(str(REPO)):
        pytest.skip("the project is not installed in editable mode here")
    code = (
        "import datasets\nassert datasets.__version__ == '9.9.9'\n"
        "import datasets.lgg_mri_segmentation as lgg\nprint(lgg.__file__)\n"
    )
    out = _run(["-c", code], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith(str(REPO / "datasets" / "lgg_mri_segmentation"))
