"""Building a run's data (``experiments.data``): generated data follows the config that uses it,
killed writes are redone, bad data is one error naming the file, the zip archive itself is a
manual directory.

Kills are real: a child process is stopped with SIGKILL at a chosen point of the write (it waits
there, having said so through a marker file). Data is tiny: 2-4 synthetic patients of 3-5 slices,
the ``raw`` config, built in-process (``num_workers=0``) except where worker processes are the
point.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import experiments.data as xdata
from datasets.lgg_mri_segmentation import build
from datasets.lgg_mri_segmentation.make_dummy_data import make_dummy_data
from experiments.data import SYNTHETIC_STAMP, BadDataError, ensure_built, load_run_data
from unet_jax.config import Config
from unet_jax.data import configured_data_dir, is_built, load_data
from unet_jax.synthetic import write_synthetic_kaggle3m

REPO = Path(__file__).resolve().parent.parent
NAME = "lgg_mri_segmentation"


def synthetic_config(**changes) -> Config:
    base = dict(
        source="synthetic",
        synthetic_patients=3,
        synthetic_slices=(3, 4),
        dataset_config="raw",
        split="holdout",
        seed=1,
    )
    return Config(**{**base, **changes})


@pytest.fixture(autouse=True)
def in_process_builds(monkeypatch):
    """Builds without worker processes (the data is a few slices; workers cost seconds)."""
    monkeypatch.setattr(xdata, "build", functools.partial(build, num_workers=0))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_is_the_data_of(config: Config, manual: Path, tmp_path: Path) -> None:
    """``manual/kaggle_3m`` is exactly what the generator writes for ``config``."""
    ref = write_synthetic_kaggle3m(
        tmp_path / "reference",
        num_patients=config.synthetic_patients,
        slices=tuple(config.synthetic_slices),
        seed=config.seed,
    )
    assert tree(manual / "kaggle_3m") == tree(ref)
    shutil.rmtree(tmp_path / "reference")


def hidden_leftovers(*folders: Path) -> list[Path]:
    return [
        p
        for f in folders
        if f.is_dir()
        for p in f.iterdir()
        if ".partial-" in p.name or ".old-" in p.name or p.name.startswith("incomplete.")
    ]


# ------------------------------------------------------------------------------------------------
# generated data follows the config (issue 15, item 2)


def test_synthetic_data_follows_the_config_and_is_reused_unchanged(tmp_path, capsys):
    wd = tmp_path / "wd"
    manual = wd / "synthetic" / "manual"
    config = synthetic_config()
    train, val = load_run_data(config, wd)
    assert len(train.patients) + len(val.patients) == 3
    assert "generating synthetic data" in capsys.readouterr().out
    assert_is_the_data_of(config, manual, tmp_path)
    stamp = json.loads((manual / SYNTHETIC_STAMP).read_text())
    assert stamp["seed"] == 1 and stamp["patients"] == 3 and stamp["slices"] == [3, 4]
    assert stamp["size"] == 256

    # Unchanged (a resume, or --restart with the same config): reused, neither written nor built.
    info = next((wd / "synthetic" / "tfds").rglob("dataset_info.json"))
    before = (info.stat().st_mtime_ns, (manual / SYNTHETIC_STAMP).stat().st_mtime_ns)
    again_train, _ = load_run_data(config, wd)
    assert "generating" not in capsys.readouterr().out
    assert (info.stat().st_mtime_ns, (manual / SYNTHETIC_STAMP).stat().st_mtime_ns) == before
    np.testing.assert_array_equal(again_train.images, train.images)

    # --restart --set synthetic_patients=4 (then seed, then synthetic_slices): fresh data, built
    # again, exactly the generator's output for the new values.
    seen = {tuple(train.patients + val.patients)}
    for changes, patients, examples in (
        ({"synthetic_patients": 4}, 4, None),
        ({"synthetic_patients": 4, "seed": 2}, 4, None),
        ({"synthetic_patients": 4, "seed": 2, "synthetic_slices": (5, 5)}, 4, 20),
    ):
        config = synthetic_config(**changes)
        train, val = load_run_data(config, wd)
        out = capsys.readouterr().out
        assert "other parameters" in out and "generating synthetic data" in out
        assert len(train.patients) + len(val.patients) == patients
        if examples is not None:
            assert train.num_examples + val.num_examples == examples
        assert_is_the_data_of(config, manual, tmp_path)
        seen.add(tuple(train.patients + val.patients))
    assert len(seen) == 3  # a new seed draws other patients; new slices keep them
    assert not hidden_leftovers(wd / "synthetic", wd / "synthetic" / "tfds")


def test_never_replaces_a_manual_folder_it_did_not_write(tmp_path):
    # With --data_dir D, synthetic data goes to D/manual: a folder there without the stamp is
    # someone's data, left alone.
    theirs = tmp_path / "manual" / "kaggle_3m"
    theirs.mkdir(parents=True)
    (theirs / "data.csv").write_text("keep me\n")
    with pytest.raises(BadDataError, match="did not generate") as err:
        ensure_built(synthetic_config(data_dir=str(tmp_path)), None)
    assert str(tmp_path / "manual") in str(err.value) and "\n" not in str(err.value)
    assert (theirs / "data.csv").read_text() == "keep me\n"


# ------------------------------------------------------------------------------------------------
# killed writes are redone (issue 15, items 3 and 11)

# The child: builds the data of CONFIG (in-process), stopping at the chosen point: it writes
# MARKER and waits to be killed.
CHILD = """
import functools, sys, time
from pathlib import Path
import experiments.data as xdata
import unet_jax.synthetic as synthetic
from datasets.lgg_mri_segmentation import build, lgg_mri_segmentation_dataset_builder as b
from unet_jax.config import Config

config = Config(**{config!r})
marker = Path({marker!r})

def stop_here():
    marker.write_text("stopped")
    time.sleep(600)

if {where!r} == "last patient":
    volume, calls = synthetic.synthetic_volume, []
    def last_stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == config.synthetic_patients:
            stop_here()
        return volume(*args, **kwargs)
    synthetic.synthetic_volume = last_stops
elif {where!r} == "swap":  # between renaming the old data aside and the new data in
    rename = Path.rename
    def stops_after_first(self, target):
        out = rename(self, target)
        if Path(target).name.startswith(".manual.old-"):
            stop_here()
        return out
    Path.rename = stops_after_first
else:  # during the TFDS build, in its incomplete.* folder
    def stops(self, dl_manager):
        stop_here()
    b.Builder._split_generators = stops
xdata.build = functools.partial(build, num_workers=0)
xdata.ensure_built(config, {workdir!r})
print("not killed")
"""


def run_and_kill(tmp_path: Path, config: Config, workdir: Path, where: str) -> None:
    """Run the child until it stops at ``where``, then SIGKILL it."""
    marker = tmp_path / f"stopped-{where.replace(' ', '_')}"
    code = CHILD.format(
        config={k: v for k, v in config.to_dict().items() if k != "name"},
        marker=str(marker),
        where=where,
        workdir=str(workdir),
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended first:\n{child.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "where, before",
    [
        ("last patient", None),  # first write killed in its last patient
        ("last patient", {"synthetic_patients": 2}),  # a regeneration (changed config) killed
        ("swap", {"synthetic_patients": 2}),  # killed between the two renames of the swap
        ("build", None),  # data written, TFDS build killed
    ],
)
def test_killed_write_is_redone_complete_at_the_next_run(tmp_path, capfd, where, before):
    wd = tmp_path / "wd"
    root = wd / "synthetic"
    manual = root / "manual"
    config = synthetic_config()
    if before is not None:
        ensure_built(synthetic_config(**before), wd)
    run_and_kill(tmp_path, config, wd, where)

    # Nothing usable as this config's data is in place: no partial kaggle_3m, at most the
    # previous (complete, stamped) data, or no build.
    stamp = manual / SYNTHETIC_STAMP
    if where == "build":
        assert json.loads(stamp.read_text())["patients"] == 3
        assert not is_built(root / "tfds", "raw")
        assert list((root / "tfds" / NAME / "raw").glob("incomplete.*"))
    elif before is not None and where != "swap":
        assert json.loads(stamp.read_text())["patients"] == 2  # the old data, untouched
        assert_is_the_data_of(synthetic_config(**before), manual, tmp_path)
    else:
        assert not manual.exists()
    assert hidden_leftovers(root, root / "tfds", root / "tfds" / NAME / "raw")
    capfd.readouterr()

    # The next run (with or without --restart: the same call) redoes it, complete and correct.
    train, val = load_run_data(config, wd)
    err = capfd.readouterr().err
    assert len(train.patients) + len(val.patients) == 3
    assert_is_the_data_of(config, manual, tmp_path)
    ref = tmp_path / "ref"
    build(manual, ref, "raw", num_workers=0)
    ref_train, ref_val = load_data(config, ref)
    np.testing.assert_array_equal(train.images, ref_train.images)
    np.testing.assert_array_equal(val.masks, ref_val.masks)
    # The leftovers are gone, each with a line saying so.
    assert not hidden_leftovers(root, root / "tfds", root / "tfds" / NAME / "raw")
    expected = "interrupted build" if where == "build" else "interrupted write"
    assert expected in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# bad data: one error naming the file (issue 15, item 6); the zip itself (item 7)


@pytest.fixture()
def broken_manual(synthetic_manual_dir, tmp_path) -> Path:
    """The dummy data with one truncated .tif."""
    manual = tmp_path / "manual"
    shutil.copytree(synthetic_manual_dir, manual)
    folder = sorted(p for p in (manual / "kaggle_3m").iterdir() if p.is_dir())[1]
    bad = folder / f"{folder.name}_3.tif"
    bad.write_bytes(bad.read_bytes()[:1000])
    return bad


def test_bad_data_from_worker_processes_is_one_error_naming_the_file(
    broken_manual, tmp_path, monkeypatch
):
    # With worker processes (the default), the error arrives chained to the worker's traceback.
    monkeypatch.setattr(xdata, "build", functools.partial(build, num_workers=2))
    manual = broken_manual.parent.parent.parent
    config = Config(dataset_config="raw", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(BadDataError) as err:
        load_run_data(config, tmp_path / "wd")
    message = str(err.value)
    assert str(broken_manual) in message and "cannot read the TIFF" in message
    assert "\n" not in message
    # One exception: nothing chained to it for a traceback to show.
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_run_prints_bad_data_as_one_line(broken_manual, tmp_path, capsys):
    from experiments.run import main

    manual = broken_manual.parent.parent.parent
    code = main(
        [
            "--exp=cpu_quick",
            "--workdir",
            str(tmp_path / "wd"),
            "--manual_dir",
            str(manual),
            "--data_dir",
            str(tmp_path / "tfds"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(broken_manual) in lines[0]


@pytest.fixture(scope="module")
def zip_download(tmp_path_factory) -> Path:
    """The dummy data as the downloaded archive (one zip file)."""
    folder = make_dummy_data(tmp_path_factory.mktemp("zip"), layout="zip")
    (archive,) = folder.glob("*.zip")
    return archive


def test_the_zip_archive_itself_as_manual_dir(zip_download, synthetic_tfds_dir, tmp_path):
    archive = tmp_path / "archive.zip"  # the name Kaggle's download button gives
    shutil.copy(zip_download, archive)
    config = Config(dataset_config="raw", data_dir=str(tmp_path / "tfds"), manual_dir=str(archive))
    train, val = load_run_data(config, tmp_path / "wd")
    ref_train, ref_val = load_data(config, synthetic_tfds_dir)
    assert train.patients == ref_train.patients and val.patients == ref_val.patients
    np.testing.assert_array_equal(train.images, ref_train.images)
    np.testing.assert_array_equal(val.masks, ref_val.masks)
    assert configured_data_dir(config) == tmp_path / "tfds"

    # A file that is not the archive, and a truncated download: one line naming it.
    other = tmp_path / "notes.txt"
    other.write_text("x")
    truncated = tmp_path / "partial.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    for path, what in ((other, "not a folder or a zip archive"), (truncated, "cannot read")):
        bad = Config(dataset_config="raw", data_dir=str(tmp_path / "t2"), manual_dir=str(path))
        with pytest.raises(BadDataError) as err:
            ensure_built(bad, tmp_path / "wd")
        assert str(path) in str(err.value) and what in str(err.value)
        assert "\n" not in str(err.value)


def test_tfds_progress_bars_only_on_a_terminal(tmp_path, capfd, monkeypatch):
    # Issue: with output to a file, TFDS's progress bars left carriage returns and ESC[A cursor
    # moves in it. A build with stderr not a terminal (pytest's capture) draws none; on a
    # terminal TFDS's bars stay on; TFDS's switch is set back after each build.
    from tensorflow_datasets.core.utils import tqdm_utils

    seen = []
    inner = xdata.build

    def spy(*args, **kwargs):
        seen.append(tqdm_utils._active)
        return inner(*args, **kwargs)

    monkeypatch.setattr(xdata, "build", spy)
    ensure_built(synthetic_config(), tmp_path / "file")
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b" not in err and "examples/s" not in err, err
    monkeypatch.setattr(xdata, "_is_terminal", lambda stream: True)
    ensure_built(synthetic_config(), tmp_path / "terminal")
    assert seen == [False, True] and tqdm_utils._active is True
