"""The synthetic kaggle_3m-layout generator: layout, file formats, data.csv, determinism, content."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _reference import read_volume
from unet_jax.synthetic import CSV_HEADER, synthetic_volume, write_synthetic_kaggle3m

REAL_HEADER = (
    "Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,"
    "OncosignCluster,COCCluster,histological_type,neoplasm_histologic_grade,tumor_tissue_site,"
    "laterality,tumor_location,gender,age_at_initial_pathologic,race,ethnicity,death01"
)
REPO = Path(__file__).resolve().parent.parent
FOLDER_RE = re.compile(r"^TCGA_(CS|DU|EZ|FG|HT)_\d{4}_\d{8}$")


def test_layout_files_and_formats(tmp_path):
    root = write_synthetic_kaggle3m(tmp_path, num_patients=3, slices=(4, 7), size=64, seed=1)
    assert root == tmp_path / "kaggle_3m"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == 3
    for folder in folders:
        assert FOLDER_RE.match(folder.name), folder.name
        names = sorted(p.name for p in folder.iterdir())
        n = len(names) // 2
        assert 4 <= n <= 7
        # Slice numbers 1..n, not zero-padded, each with image and mask.
        expected = sorted(
            [f"{folder.name}_{k}.tif" for k in range(1, n + 1)]
            + [f"{folder.name}_{k}_mask.tif" for k in range(1, n + 1)]
        )
        assert names == expected
        images, masks = read_volume(folder)
        assert images.shape == (n, 64, 64, 3) and images.dtype == np.uint8
        assert masks.shape == (n, 64, 64) and masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 255}
        with Image.open(folder / f"{folder.name}_1.tif") as im:
            assert im.format == "TIFF" and im.mode == "RGB"


def test_data_csv_has_real_header_and_missing_fields(tmp_path):
    root = write_synthetic_kaggle3m(tmp_path, num_patients=12, slices=(3, 3), size=32, seed=2)
    text = (root / "data.csv").read_text()
    assert text.splitlines()[0] == REAL_HEADER
    assert ",".join(CSV_HEADER) == REAL_HEADER
    rows = list(csv.DictReader(text.splitlines()))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    # Patient is the folder name without its date, one row per patient.
    assert sorted(r["Patient"] for r in rows) == sorted(f.rsplit("_", 1)[0] for f in folders)
    values = [v for r in rows for k, v in r.items() if k != "Patient"]
    assert "" in values  # some empty fields, as in the real file
    assert all(v == "" or v.isdigit() for v in values)


def test_deterministic_and_seeded(tmp_path):
    a = write_synthetic_kaggle3m(tmp_path / "a", num_patients=2, slices=(3, 5), size=32, seed=7)
    b = write_synthetic_kaggle3m(tmp_path / "b", num_patients=2, slices=(3, 5), size=32, seed=7)
    c = write_synthetic_kaggle3m(tmp_path / "c", num_patients=2, slices=(3, 5), size=32, seed=8)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(a) == files(b)
    assert files(a) != files(c)


def test_phantom_content_is_learnable():
    rng = np.random.default_rng(0)
    for _ in range(4):
        images, masks = synthetic_volume(rng, 20, 96)
        lesion = masks > 0
        assert lesion.any()
        # No lesion in the end slices (the baseline drops them anyway).
        assert not lesion[0].any() and not lesion[-1].any()
        flair = images[..., 1].astype(float)
        brain = images[..., 0] > 40  # inside the head
        background = flair[brain & ~lesion].mean()
        assert flair[lesion].mean() > background + 40  # bright in FLAIR
        # Dark background outside the head: below the baseline's 10 % threshold.
        corner = images[:, :8, :8]
        assert corner.max() < 0.1 * images.max()


def test_archive_layouts(tmp_path):
    unpacked = write_synthetic_kaggle3m(
        tmp_path / "u", num_patients=2, slices=(3, 4), size=32, seed=5, layout="kaggle-zip"
    )
    copy = tmp_path / "u" / "lgg-mri-segmentation" / "kaggle_3m"
    first = {str(p.relative_to(unpacked)): p.read_bytes() for p in unpacked.rglob("*.tif")}
    second = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*.tif")}
    assert first == second and first
    raw = (copy / "data.csv").read_bytes()
    assert b"\r\n" in raw and raw.splitlines()[0].decode() == REAL_HEADER.replace(",", ";")

    archive = write_synthetic_kaggle3m(
        tmp_path / "z", num_patients=2, slices=(3, 4), size=32, seed=5, layout="zip"
    )
    assert archive.suffix == ".zip" and not (tmp_path / "z" / "kaggle_3m").exists()
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for rel, data in first.items():
            assert zf.read(f"kaggle_3m/{rel}") == data
            assert f"lgg-mri-segmentation/kaggle_3m/{rel}" in names


# The child: writes the data set of ARGS into ROOT, stopping in its last patient (it writes
# MARKER and waits to be killed).
_CHILD = """
import time
from pathlib import Path
import unet_jax.synthetic as synthetic

args = {args!r}
volume, calls = synthetic.synthetic_volume, []

def last_stops(*a, **k):
    calls.append(1)
    if len(calls) == args["num_patients"]:
        Path({marker!r}).write_text("stopped")
        time.sleep(600)
    return volume(*a, **k)

synthetic.synthetic_volume = last_stops
synthetic.write_synthetic_kaggle3m({root!r}, **args)
"""


@pytest.mark.parametrize("layout", ["kaggle_3m", "zip"])
def test_a_killed_write_leaves_the_previous_data_and_is_redone(tmp_path, capsys, layout):
    root = tmp_path / "root"
    args = dict(num_patients=3, slices=(2, 3), size=32, layout=layout)
    previous = write_synthetic_kaggle3m(root, seed=1, **args)
    before = files(root)
    marker = tmp_path / "stopped"
    code = _CHILD.format(args={**args, "seed": 2}, marker=str(marker), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached its last patient"
            time.sleep(0.02)
    finally:
        child.kill()
        child.communicate(timeout=30)
    # Killed in its last patient: what was there is still there, whole; the partial write is
    # aside under a hidden name.
    leftovers = [p for p in root.iterdir() if ".partial-" in p.name]
    assert len(leftovers) == 1
    assert files(root, hidden=False) == before
    assert previous.exists()

    # The next write removes the leftover (saying so) and writes the whole data set.
    again = write_synthetic_kaggle3m(root, seed=2, **args)
    assert "interrupted write" in capsys.readouterr().err
    assert not [p for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    reference = write_synthetic_kaggle3m(tmp_path / "ref", seed=2, **args)
    assert again.name == reference.name
    if layout == "zip":  # the archive's members (its bytes hold the time of writing)
        with zipfile.ZipFile(again) as a, zipfile.ZipFile(reference) as b:
            assert sorted(a.namelist()) == sorted(b.namelist())
            assert all(a.read(name) == b.read(name) for name in b.namelist())
    else:
        assert files(root) == files(tmp_path / "ref")


def files(root: Path, hidden: bool = True) -> dict[str, bytes]:
    """Every file under ``root`` (without those of hidden entries unless ``hidden``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and (hidden or not any(part.startswith(".") for part in rel.parts)):
            out[str(rel)] = p.read_bytes()
    return out


def test_writes_into_one_folder_wait_for_each_other(tmp_path):
    # A write in progress (stopped in its last patient) is never taken for a leftover: a second
    # writer waits for it, then removes what the first left when killed, and writes its data.
    root = tmp_path / "root"
    args = dict(num_patients=2, slices=(2, 2), size=32)
    marker = tmp_path / "stopped"
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD.format(args={**args, "seed": 1}, marker=str(marker), root=str(root)),
        ],
        cwd=REPO,
    )
    log = tmp_path / "second.log"
    second = None
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        code = (
            "from unet_jax.synthetic import write_synthetic_kaggle3m\n"
            f"write_synthetic_kaggle3m({str(root)!r}, seed=3, **{args!r})\n"
        )
        with open(log, "w") as f:
            second = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=f)
        while "waiting for another process" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert [p for p in root.iterdir() if ".partial-" in p.name]  # the first one's, kept
    finally:
        first.kill()
        first.wait(timeout=30)
    assert second.wait(timeout=60) == 0
    assert "interrupted write" in log.read_text()
    reference = write_synthetic_kaggle3m(tmp_path / "ref", seed=3, **args)
    assert files(root / "kaggle_3m") == files(reference)
    assert not [p for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name]
