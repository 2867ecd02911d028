"""Fabricated run workdirs for the run-folder, report and comparison tests: three small volumes
with known predictions, a metrics log, per_patient.csv and predictions.npz, written as training
writes them (or with pieces left out, or in the format of runs from before HD95 and the volume
difference were computed: ``old_format``).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from _reference import np_dsc
from unet_jax import metrics
from unet_jax.config import Config

SIZE = 64
PATIENTS = ("TCGA_CS_1111_20000101", "TCGA_DU_2222_20000102", "TCGA_EZ_3333_20000103")


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def predictions(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three volumes: good (pred shifted 2 px), fair (shifted 6 px, smaller), bad (elsewhere)."""
    images, truths, preds, names, numbers = [], [], [], [], []
    for p, (patient, n) in enumerate(zip(PATIENTS, (5, 6, 7))):
        for s in range(n):
            image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
            image[..., 1] += np.uint8(40)  # FLAIR a bit brighter, still gray
            lesion = 1 <= s <= n - 2
            radius = 2 * min(s, n - 1 - s)
            empty = np.zeros((SIZE, SIZE), bool)
            truth = disc(30, 30, 4 + radius) if lesion else empty
            if p == 0:
                pred = np.roll(truth, 2, axis=1)
            elif p == 1:
                pred = np.roll(disc(30, 30, 3 + radius), 6, axis=0) if lesion else empty
            else:
                pred = disc(10, 50, 5) if s == n - 1 else empty
            images.append(image)
            truths.append(truth)
            preds.append(pred)
            names.append(patient)
            numbers.append(s + 1)
    return {
        "image": np.stack(images),
        "truth": np.stack(truths),
        "pred": np.stack(preds),
        "patient": np.asarray(names),
        "slice_index": np.asarray(numbers, np.int32),
    }


def per_patient_rows(pred: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for patient in PATIENTS:
        m = pred["patient"] == patient
        p, t = pred["pred"][m], pred["truth"][m]
        rows.append(
            {
                "patient": patient,
                "slices": int(m.sum()),
                "dsc": np_dsc(p, t) * 0.98,
                "dsc_lcc": np_dsc(p, t),
                "accuracy": float((p == t).mean()),
                "precision": 0.9,
                "recall": 0.8,
                "true_pixels": int(t.sum()),
                "pred_pixels": int(p.sum()),
                # The fabricated values of the newer columns (the metric itself is tested in
                # test_metrics.py against independent computations).
                "hd95_lcc": metrics.hd95(p, t),
                "avd_lcc": abs(int(p.sum()) - int(t.sum())),
                "ravd_lcc": abs(int(p.sum()) - int(t.sum())) / int(t.sum()),
            }
        )
    return rows


#: The columns of ``per_patient.csv`` as runs wrote it before HD95 and the volume difference.
OLD_COLUMNS = [
    "patient",
    "slices",
    "dsc",
    "dsc_lcc",
    "accuracy",
    "precision",
    "recall",
    "true_pixels",
    "pred_pixels",
]
#: The columns as training writes them now (the fabricated rows have no Dice loss).
COLUMNS = OLD_COLUMNS[:4] + ["hd95_lcc", "avd_lcc", "ravd_lcc"] + OLD_COLUMNS[4:]


def write_csv(path: Path, rows: list[dict], old_format: bool = False) -> None:
    columns = OLD_COLUMNS if old_format else COLUMNS
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def metrics_lines(
    rng: np.random.Generator,
    epochs: int = 3,
    steps_per_epoch: int = 10,
    with_eval: bool = True,
    with_summary: bool = True,
    old_format: bool = False,
) -> list[dict]:
    lines = []
    best = -1.0
    for e in range(epochs):
        for s in range(steps_per_epoch):
            step = e * steps_per_epoch + s + 1
            lines.append(
                {
                    "type": "train",
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": float(0.9 * np.exp(-step / 12) + 0.1 + 0.02 * rng.random()),
                    "lr": 3e-4,
                    "images_per_s": float(50 + rng.random()),
                }
            )
        if with_eval:
            dsc = float(0.5 + 0.1 * e + 0.05 * rng.random())
            lines.append(
                {
                    "type": "eval",
                    "step": (e + 1) * steps_per_epoch,
                    "epoch": e + 1,
                    "val_loss": float(0.5 - 0.05 * e),
                    "val_dsc": dsc,
                    "val_dsc_median": dsc + 0.02,
                    "val_dsc_raw": dsc - 0.01,
                    "val_accuracy": 0.99,
                    "best": dsc > best,
                }
            )
            if not old_format:
                lines[-1].update(
                    val_hd95=float(8 - e),
                    val_hd95_median=float(6 - e),
                    val_hd95_undefined=0,
                    val_avd=float(300 - 50 * e),
                    val_avd_median=float(200 - 40 * e),
                    val_ravd=0.4 - 0.1 * e,
                    val_patients=3,
                )
            best = max(best, dsc)
    if with_summary:
        lines.append({"type": "summary", "best_val_dsc": best, "wall_s": 12.5})
    return lines


def make_workdir(
    root: Path,
    *,
    seed: int = 0,
    with_eval: bool = True,
    config: Config | None = None,
    dsc_offsets: tuple[float, ...] | None = None,
    with_predictions: bool = True,
    old_format: bool = False,
) -> Path:
    """A run workdir with every file training writes (or fewer, as asked; ``old_format``: no
    HD95 or volume difference in ``per_patient.csv`` and the log, as older runs wrote them)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps((config or Config(name="test")).to_dict()))
    with open(root / "metrics.jsonl", "w") as f:
        lines = metrics_lines(
            rng, with_eval=with_eval, with_summary=with_eval, old_format=old_format
        )
        for line in lines:
            f.write(json.dumps(line) + "\n")
    if with_eval:
        pred = predictions(rng)
        if with_predictions:
            np.savez(root / "predictions.npz", **pred)
        rows = per_patient_rows(pred)
        if dsc_offsets is not None:
            for row, off in zip(rows, dsc_offsets):
                row["dsc_lcc"] = min(1.0, row["dsc_lcc"] + off)
        write_csv(root / "per_patient.csv", rows, old_format=old_format)
    return root


def md_links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)
