"""The ``lgg_mri_segmentation`` TFDS dataset: inputs, features, splits, bad input, real data
(the command line: test_lgg_dataset_command.py; its worker processes: test_worker_pool.py).

Synthetic tests use the builder's dummy data (``make_dummy_data``: 5 patients of 5-8 slices) or the
session fixtures of conftest.py. Real-data tests (``real_data``) build from ``restore.py`` output
and compare with the .tif files and with an independent scikit-image implementation of the
baseline's preprocessing (``skimage_baseline`` in tests/_reference.py).
"""

from __future__ import annotations

import csv
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from _lgg_setup import (
    NAME,
    all_examples,
    assert_same_examples,
    baseline_holdout,
    build_raises,
    first_patient,
)
from _reference import read_image, read_volume, skimage_baseline
from datasets import lgg_mri_segmentation as lgg
from datasets.lgg_mri_segmentation import LGGDataError, LGGDataWarning, build

# ------------------------------------------------------------------------------------------------
# inputs as users have them


def test_zip_unpacked_archive_and_bare_folder_give_identical_datasets(
    layouts, synthetic_manual_dir, synthetic_tfds_dir, tmp_path
):
    # synthetic_tfds_dir is the dummy data built from a bare kaggle_3m folder (given as its
    # parent, synthetic_manual_dir): the reference.
    inputs = {
        "kaggle_3m itself": synthetic_manual_dir / "kaggle_3m",
        "unpacked": layouts["unpacked"],
        "zip": layouts["zip"],
    }
    # The archive's second copy alone (';'-separated, CRLF data.csv).
    semi = tmp_path / "semicolon"
    shutil.copytree(layouts["unpacked"] / "lgg-mri-segmentation", semi / "lgg-mri-segmentation")
    inputs["semicolon copy"] = semi
    assert (semi / "lgg-mri-segmentation" / "kaggle_3m" / "data.csv").read_bytes().count(b";") > 10

    for i, (what, manual) in enumerate(inputs.items()):
        configs = ("raw", "baseline") if what == "zip" else ("raw",)
        for config in configs:
            build(manual, tmp_path / f"tfds{i}", config, num_workers=0)
            for split in ("train", "validation"):
                assert_same_examples(
                    all_examples(tmp_path / f"tfds{i}", config, split),
                    all_examples(synthetic_tfds_dir, config, split),
                )
    # The unpacked archive holds every slice twice: each is counted once.
    n_files = len(list((synthetic_manual_dir / "kaggle_3m").rglob("*_mask.tif")))
    n_examples = sum(
        len(all_examples(synthetic_tfds_dir, "raw", s)) for s in ("train", "validation")
    )
    assert n_examples == n_files > 0


def test_find_kaggle_root(layouts, synthetic_manual_dir):
    bare = synthetic_manual_dir / "kaggle_3m"
    assert lgg.find_kaggle_root(synthetic_manual_dir) == bare
    assert lgg.find_kaggle_root(bare) == bare
    assert lgg.find_kaggle_root(layouts["unpacked"]) == layouts["unpacked"] / "kaggle_3m"
    root = lgg.find_kaggle_root(layouts["zip"])
    assert isinstance(root, zipfile.Path) and root.at == "kaggle_3m/"
    assert Path(root.root.filename) == layouts["zip"] / "lgg-mri-segmentation.zip"


def test_data_csv_both_spellings_read_the_same(layouts):
    comma = lgg.read_data_csv(layouts["unpacked"] / "kaggle_3m")
    semicolon = lgg.read_data_csv(layouts["unpacked"] / "lgg-mri-segmentation" / "kaggle_3m")
    assert comma == semicolon and len(comma) == 5
    # Independent parse of the comma file: empty -> MISSING (-1), else the integer.
    with open(layouts["unpacked"] / "kaggle_3m" / "data.csv", newline="") as f:
        for row in csv.DictReader(f):
            fields = comma[row.pop("Patient")]
            assert fields == {k: (int(v) if v else -1) for k, v in row.items()}


# ------------------------------------------------------------------------------------------------
# features, order, splits


def test_features_and_order(synthetic_tfds_dir, synthetic_manual_dir):
    root = synthetic_manual_dir / "kaggle_3m"
    table = lgg.read_data_csv(root)
    builder = tfds.builder(f"{NAME}/raw", data_dir=str(synthetic_tfds_dir))
    index = builder.info.metadata["patients"]
    seen = []
    for split in ("train", "validation"):
        examples = all_examples(synthetic_tfds_dir, "raw", split)
        keys = [(ex["patient_id"], ex["slice_index"]) for ex in examples]
        assert keys == sorted(keys)  # (patient_id, slice_index) order
        for pid, start, count in index[split]:
            assert all(ex["patient_id"] == pid.encode() for ex in examples[start : start + count])
        for ex in examples:
            assert isinstance(ex["patient_id"], bytes)  # tfds Text decodes to bytes
            pid = ex["patient_id"].decode()
            assert ex["image"].shape == (256, 256, 3) and ex["image"].dtype == np.uint8
            assert ex["mask"].shape == (256, 256, 1) and ex["mask"].dtype == np.uint8
            assert ex["channel_mean"].dtype == np.float32 and ex["channel_std"].shape == (3,)
            n = ex["slice_index"]
            np.testing.assert_array_equal(ex["image"], read_image(root / pid / f"{pid}_{n}.tif"))
            np.testing.assert_array_equal(
                ex["mask"][..., 0], read_image(root / pid / f"{pid}_{n}_mask.tif") // 255
            )
            assert ex["num_slices"] == len(list((root / pid).glob("*_mask.tif")))
            fields = table[pid.rsplit("_", 1)[0]]
            assert {f: ex[f] for f in lgg.CSV_FIELDS} == fields
            np.testing.assert_array_equal(ex["crop_box"], [0, 256, 0, 256])
        seen += [pid for pid, _, _ in index[split]]
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert sorted(seen) == folders  # every patient in exactly one split


def test_raw_channel_stats_are_the_volume_statistics(synthetic_tfds_dir, synthetic_manual_dir):
    examples = all_examples(synthetic_tfds_dir, "raw", "train")
    pid = examples[0]["patient_id"].decode()
    volume = np.stack([ex["image"] for ex in examples if ex["patient_id"] == pid.encode()])
    x = volume.astype(np.float64) / 255
    np.testing.assert_allclose(examples[0]["channel_mean"], x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(examples[0]["channel_std"], x.std(axis=(0, 1, 2)), rtol=1e-6)


def test_baseline_matches_skimage_reference_on_synthetic(synthetic_tfds_dir, synthetic_manual_dir):
    root = synthetic_manual_dir / "kaggle_3m"
    examples = all_examples(synthetic_tfds_dir, "baseline", "train")
    # The patient with the fewest slices (skimage's 3D resize is slow).
    n, pid = min(
        (len(list((root / p).glob("*_mask.tif"))), p)
        for p in {ex["patient_id"].decode() for ex in examples}
    )
    mine = [ex for ex in examples if ex["patient_id"] == pid.encode()]
    images, masks = read_volume(root / pid)
    r, m, (z_start, _), _ = skimage_baseline(images, masks)
    first = z_start + 1  # the first kept slice's number (1-based)
    assert [ex["slice_index"] for ex in mine] == list(range(first, first + len(r)))
    assert all(ex["num_slices"] == len(r) for ex in mine)
    stored = np.stack([ex["image"] for ex in mine]).astype(int)
    assert np.abs(stored - np.rint(r * 255)).max() <= 1
    np.testing.assert_array_equal(np.stack([ex["mask"][..., 0] for ex in mine]), m)
    np.testing.assert_allclose(mine[0]["channel_mean"], r.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(mine[0]["channel_std"], r.std(axis=(0, 1, 2)), rtol=1e-5)


def test_splits_are_by_patient_and_reproduce_the_baseline_holdout():
    # 110 made-up folder names: the validation split is the baseline's random.sample.
    rng = random.Random(0)
    folders = [f"TCGA_XX_{rng.randrange(10**4):04d}_{19900101 + i}" for i in range(110)]
    train, val = lgg.split_patients(folders)
    assert sorted(val) == sorted(baseline_holdout(folders))
    assert len(val) == 10 and sorted(train + val) == sorted(folders) and not set(train) & set(val)
    assert lgg.holdout_patients(reversed(folders)) == baseline_holdout(folders)
    # Small data sets (tests) hold out a fifth of the patients, at least one.
    assert len(lgg.split_patients(folders[:6])[1]) == 1
    assert len(lgg.split_patients(folders[:19])[1]) == 3


def test_patient_folds():
    ids = [f"P{i:03d}" for i in range(23)]
    folds = lgg.patient_folds(ids, k=5, seed=0)
    assert len(folds) == 5
    vals = [v for _, v in folds]
    assert sorted(p for v in vals for p in v) == ids  # each patient validated exactly once
    assert {len(v) for v in vals} == {4, 5}
    for train, val in folds:
        assert sorted(train + val) == ids and not set(train) & set(val)
    assert lgg.patient_folds(list(reversed(ids)), k=5, seed=0) == folds  # order-independent
    assert lgg.patient_folds(ids, k=5, seed=1) != folds
    with pytest.raises(ValueError):
        lgg.patient_folds(ids, k=1)


# ------------------------------------------------------------------------------------------------
# bad input: a clear error naming the file, nothing skipped


def test_image_without_mask(manual, tmp_path):
    folder = first_patient(manual)
    (folder / f"{folder.name}_3_mask.tif").unlink()
    err = build_raises(manual, tmp_path, "image without its mask")
    assert f"{folder.name}_3.tif" in str(err)


def test_mask_without_image(manual, tmp_path):
    folder = first_patient(manual)
    (folder / f"{folder.name}_2.tif").unlink()
    err = build_raises(manual, tmp_path, "mask without its image")
    assert f"{folder.name}_2_mask.tif" in str(err)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_or_truncated_tif(manual, tmp_path, damage):
    folder = first_patient(manual)
    path = folder / f"{folder.name}_2.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tiff" * 100)
    err = build_raises(manual, tmp_path, "cannot read the TIFF")
    assert str(path) in str(err)


def test_wrong_shape(manual, tmp_path):
    folder = first_patient(manual)
    path = folder / f"{folder.name}_2.tif"
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(path, format="TIFF")
    err = build_raises(manual, tmp_path, r"shape \(128, 128, 3\)")
    assert str(path) in str(err)


def test_wrong_dtype(manual, tmp_path):
    folder = first_patient(manual)
    path = folder / f"{folder.name}_2_mask.tif"
    Image.fromarray(np.zeros((256, 256), np.uint16)).save(path, format="TIFF")
    err = build_raises(manual, tmp_path, "dtype uint16")
    assert str(path) in str(err)


def test_mask_values_other_than_0_255(manual, tmp_path):
    folder = first_patient(manual)
    path = folder / f"{folder.name}_2_mask.tif"
    mask = np.zeros((256, 256), np.uint8)
    mask[10:20, 10:20] = 1  # a 0/1 mask: not the download's 0/255
    Image.fromarray(mask).save(path, format="TIFF")
    err = build_raises(manual, tmp_path, r"mask values other than 0 and 255: \[1\]")
    assert str(path) in str(err)


def test_patient_folder_without_slices(manual, tmp_path):
    empty = manual / "kaggle_3m" / "TCGA_CS_0000_20000101"
    empty.mkdir()
    err = build_raises(manual, tmp_path, "patient folder with no slices")
    assert str(empty) in str(err)


def test_gap_in_slice_numbers(manual, tmp_path):
    folder = first_patient(manual)
    n = len(list(folder.glob("*_mask.tif")))
    for name in (f"{folder.name}_3.tif", f"{folder.name}_3_mask.tif"):
        (folder / name).unlink()
    err = build_raises(manual, tmp_path, "gaps in the slice numbers: no slice 3")
    assert str(folder) in str(err) and f"{folder.name}_{n}.tif" in str(err)


def test_unexpected_file_in_patient_folder(manual, tmp_path):
    folder = first_patient(manual)
    (folder / "notes.txt").write_text("x")
    err = build_raises(manual, tmp_path, "unexpected entry")
    assert str(folder / "notes.txt") in str(err)


def test_patient_missing_from_data_csv_warns_and_stores_missing(manual, tmp_path):
    folder = first_patient(manual)
    csv_path = manual / "kaggle_3m" / "data.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    key = folder.name.rsplit("_", 1)[0]
    csv_path.write_text("".join(line for line in lines if not line.startswith(key + ",")))
    with pytest.warns(LGGDataWarning, match=f"{folder.name}: no row '{key}'"):
        build(manual, tmp_path / "tfds", "raw", num_workers=0)
    examples = [
        ex for s in ("train", "validation") for ex in all_examples(tmp_path / "tfds", "raw", s)
    ]
    mine = [ex for ex in examples if ex["patient_id"] == folder.name.encode()]
    others = [ex for ex in examples if ex["patient_id"] != folder.name.encode()]
    assert mine and all(ex[f] == lgg.MISSING for ex in mine for f in lgg.CSV_FIELDS)
    assert any(ex[f] != lgg.MISSING for ex in others for f in lgg.CSV_FIELDS)


def test_malformed_data_csv(manual, tmp_path):
    csv_path = manual / "kaggle_3m" / "data.csv"
    text = csv_path.read_text().splitlines()
    text[1] = text[1].replace(",", ",x", 1)  # a non-integer code
    csv_path.write_text("\n".join(text) + "\n")
    err = build_raises(manual, tmp_path, "line 2: RNASeqCluster='x")
    assert str(csv_path) in str(err)


@pytest.mark.parametrize("kind", ["empty", "wrong", "missing"])
def test_empty_or_wrong_manual_dir_repeats_instructions(tmp_path, kind):
    manual = tmp_path / "manual"
    if kind != "missing":
        manual.mkdir()
    if kind == "wrong":
        (manual / "some_other_data").mkdir()
        (manual / "some_other_data" / "scan_1.tif").write_bytes(b"")
        (manual / "readme.txt").write_text("x")
    with pytest.raises(LGGDataError) as info:
        build(manual, tmp_path / "tfds", "raw", num_workers=0)
    message = str(info.value)
    assert str(manual) in message
    assert "kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation" in message
    if kind == "wrong":
        assert "readme.txt" in message


def test_differing_copies_are_refused(layouts, tmp_path):
    shutil.copytree(layouts["unpacked"], tmp_path, dirs_exist_ok=True)
    folder = first_patient(tmp_path / "lgg-mri-segmentation")
    (folder / f"{folder.name}_1.tif").unlink()
    (folder / f"{folder.name}_1_mask.tif").unlink()
    with pytest.raises(LGGDataError, match="copies of the data .* that differ"):
        lgg.find_kaggle_root(tmp_path)


# ------------------------------------------------------------------------------------------------
# real data (../shared/lgg): skipped cleanly without it


def _real_examples(real_tfds_dir: Path, config: str) -> dict[str, list[dict]]:
    return {s: all_examples(real_tfds_dir, config, s) for s in ("train", "validation")}


@pytest.mark.real_data
@pytest.mark.slow
def test_real_raw_is_every_slice_as_downloaded(real_tfds_dir, real_manual_dir):
    root = real_manual_dir / "kaggle_3m"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(folders) == 110
    examples = _real_examples(real_tfds_dir, "raw")
    assert sum(len(v) for v in examples.values()) == 3929
    patients = {ex["patient_id"].decode() for v in examples.values() for ex in v}
    assert sorted(patients) == folders
    val = {ex["patient_id"].decode() for ex in examples["validation"]}
    assert val == set(baseline_holdout(folders))
    for ex in examples["train"] + examples["validation"]:
        pid, n = ex["patient_id"].decode(), ex["slice_index"]
        np.testing.assert_array_equal(ex["image"], read_image(root / pid / f"{pid}_{n}.tif"))
        np.testing.assert_array_equal(
            ex["mask"][..., 0] * 255, read_image(root / pid / f"{pid}_{n}_mask.tif")
        )
    # data.csv fields, read independently.
    with open(root / "data.csv", newline="") as f:
        rows = {r.pop("Patient"): r for r in csv.DictReader(f)}
    for ex in examples["validation"]:
        row = rows[ex["patient_id"].decode().rsplit("_", 1)[0]]
        assert {k: ex[k] for k in row} == {k: (int(v) if v else -1) for k, v in row.items()}


@pytest.mark.real_data
@pytest.mark.slow
def test_real_baseline_counts_and_holdout(real_tfds_dir, real_manual_dir):
    folders = sorted(p.name for p in (real_manual_dir / "kaggle_3m").iterdir() if p.is_dir())
    builder = tfds.builder(f"{NAME}/baseline", data_dir=str(real_tfds_dir))
    # The baseline's preprocessing, run on the real data, keeps "3,336 training and 332
    # validation slices".
    assert builder.info.splits["train"].num_examples == 3336
    assert builder.info.splits["validation"].num_examples == 332
    index = builder.info.metadata["patients"]
    assert sorted(p for p, _, _ in index["validation"]) == sorted(baseline_holdout(folders))
    assert len(index["train"]) == 100


@pytest.mark.real_data
@pytest.mark.slow
def test_real_baseline_matches_skimage_on_three_patients(real_tfds_dir, real_manual_dir):
    """Tolerance: stored uint8 values within 1 of rint(255 r_ref) on at most 1e-5 of the values
    (our separable resize equals skimage's 3D zoom up to ~1e-15, which can only flip a rounding
    tie); masks identical; channel mean/std within 1e-5 relative (float32 storage)."""
    root = real_manual_dir / "kaggle_3m"
    builder = tfds.builder(f"{NAME}/baseline", data_dir=str(real_tfds_dir))
    # The three patients with the fewest slices, from both splits (keeps skimage's 3D resize short).
    candidates = []
    for split in ("train", "validation"):
        for pid, start, count in builder.info.metadata["patients"][split]:
            n = len(list((root / pid).glob("*_mask.tif")))
            candidates.append((n, pid, split, start, count))
    for _n, pid, split, start, count in sorted(candidates)[:3]:
        source = tfds.data_source(f"{NAME}/baseline", data_dir=str(real_tfds_dir), split=split)
        mine = [source[i] for i in range(start, start + count)]
        images, masks = read_volume(root / pid)
        r, m, (z_start, _), _ = skimage_baseline(images, masks)
        first = z_start + 1  # the first kept slice's number (1-based)
        assert count == len(r)
        assert [ex["slice_index"] for ex in mine] == list(range(first, first + len(r)))
        diff = np.abs(np.stack([ex["image"] for ex in mine]).astype(int) - np.rint(r * 255))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-5, (pid, diff.max(), (diff > 0).sum())
        np.testing.assert_array_equal(np.stack([ex["mask"][..., 0] for ex in mine]), m)
        np.testing.assert_allclose(mine[0]["channel_mean"], r.mean(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(mine[0]["channel_std"], r.std(axis=(0, 1, 2)), rtol=1e-5)
        # The input the network sees: within the quantisation bound of the exact standardisation.
        exact = (r - r.mean(axis=(0, 1, 2))) / r.std(axis=(0, 1, 2))
        stored = (np.stack([ex["image"] for ex in mine]) / 255.0 - mine[0]["channel_mean"]) / mine[
            0
        ]["channel_std"]
        assert np.abs(stored - exact).max() <= 1.0 / 255 / r.std(axis=(0, 1, 2)).min()
