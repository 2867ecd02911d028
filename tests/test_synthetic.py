"""The synthetic kaggle_3m-layout generator: layout, file formats, data.csv, determinism, content."""

from __future__ import annotations

import csv
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from _reference import read_volume
from unet_jax.synthetic import CSV_HEADER, synthetic_volume, write_synthetic_kaggle3m

REAL_HEADER = (
    "Patient,RNASeqCluster,MethylationCluster,miRNACluster,CNCluster,RPPACluster,"
    "OncosignCluster,COCCluster,histological_type,neoplasm_histologic_grade,tumor_tissue_site,"
    "laterality,tumor_location,gender,age_at_initial_pathologic,race,ethnicity,death01"
)
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
