"""Tests of the baseline's data path and training loop (benchmarks/torch_baseline), CPU, tiny sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="needs PyTorch (the baseline itself): pip install -e '.[baseline]'"
)

from benchmarks.torch_baseline import data  # noqa: E402
from benchmarks.torch_baseline.train import dice_loss, main, train_epoch  # noqa: E402
from benchmarks.torch_baseline.unet import UNet  # noqa: E402


def test_slice_weights_hand_made_case():
    # Per-slice lesion areas 0, 2, 6, 0: total 8, 10% of the mean is 0.2, normaliser 8.8.
    m = np.zeros((4, 5, 5, 1), np.float32)
    m[1, 0, :2] = 1
    m[2, 1:3, :3] = 1
    w = data.slice_weights(m)
    np.testing.assert_allclose(w, np.array([0.2, 2.2, 6.2, 0.2]) / 8.8)
    assert math.isclose(w.sum(), 1.0)
    # No lesion at all: the baseline's formula is 0/0; uniform instead.
    np.testing.assert_allclose(data.slice_weights(np.zeros((3, 2, 2, 1))), [1 / 3] * 3)


def _tagged_volumes():
    """Two patients whose image values encode (patient, slice): 100 * p + z."""
    volumes = []
    for p, z_count in enumerate((3, 5)):
        img = (
            np.zeros((z_count, 8, 8, 3), np.float32)
            + (100 * p + np.arange(z_count))[:, None, None, None]
        )
        mask = np.zeros((z_count, 8, 8, 1), np.float32)
        mask[1, :2, :2] = 1  # areas: slice 1 -> 4 pixels
        mask[2, :4, :4] = 1  # slice 2 -> 16 pixels
        volumes.append((img, mask))
    return volumes


def test_dataset_index_mode_and_tensor_layout():
    ds = data.BaselineDataset(_tagged_volumes(), transform=None, random_sampling=False)
    assert len(ds) == 8
    x, y = ds[4]  # patient 1, slice 1
    assert x.shape == (3, 8, 8) and y.shape == (1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert float(x[0, 0, 0]) == 101.0 and float(y.sum()) == 4.0


def test_random_sampling_follows_patient_and_slice_weights():
    volumes = _tagged_volumes()
    ds = data.BaselineDataset(volumes, transform=None, random_sampling=True)
    np.random.seed(0)
    n = 4000
    tags = [int(ds[0][0][0, 0, 0]) for _ in range(n)]
    counts = {t: tags.count(t) / n for t in set(tags)}
    for p, (v, m) in enumerate(volumes):
        w = data.slice_weights(m)
        for z in range(v.shape[0]):
            expected = 0.5 * w[z]  # patient uniform, then slice by weight
            assert abs(counts.get(100 * p + z, 0.0) - expected) < 0.03, (p, z)


@pytest.mark.parametrize("shape", [(64, 64), (48, 40)])
@pytest.mark.parametrize("s", [0.95, 0.97, 1.0, 1.03, 1.05])
def test_scale_keeps_shape_and_binary_mask(shape, s):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((*shape, 3)).astype(np.float32)
    mask = (rng.random((*shape, 1)) > 0.5).astype(np.float32)
    out_i, out_m = data.scale_pair(img, mask, s)
    assert out_i.shape == img.shape and out_m.shape == mask.shape
    assert set(np.unique(out_m)) <= {0.0, 1.0}


def test_random_transforms_keep_shapes_and_binary_masks():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64, 1), np.float32)
    mask[20:40, 10:30] = 1
    t = data.transforms(scale=0.05, angle=15, flip_prob=0.5)
    np.random.seed(0)
    for _ in range(6):
        out_i, out_m = t((img, mask))
        assert out_i.shape == img.shape and out_m.shape == mask.shape
        assert set(np.unique(out_m)) <= {0.0, 1.0}
        assert 0 < out_m.sum() < mask.size


def test_flip_and_zero_rotation():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((16, 16, 3))
    mask = (rng.random((16, 16, 1)) > 0.5).astype(np.float64)
    fi, fm = data.flip_pair(img, mask)
    assert np.array_equal(fi, img[:, ::-1]) and np.array_equal(fm, mask[:, ::-1])
    ri, rm = data.rotate_pair(img, mask, 0.0)
    np.testing.assert_allclose(ri, img, atol=1e-12)
    assert np.array_equal(rm, mask)
    # Flip probability 0 never flips, 1 always flips.
    assert data.HorizontalFlip(0.0)((img, mask))[0] is img
    assert np.array_equal(data.HorizontalFlip(1.0)((img, mask))[0], img[:, ::-1])


def test_volumes_from_slices_groups_and_normalises():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (5, 4, 4), dtype=np.uint8) * 255
    ids = np.array(["b", "b", "a", "a", "a"])
    mean = np.array([[0.1, 0.2, 0.3]] * 2 + [[0.4, 0.5, 0.6]] * 3, np.float32)
    std = np.array([[0.5, 0.5, 0.5]] * 2 + [[0.25, 0.25, 0.25]] * 3, np.float32)
    vols = data.volumes_from_slices(images, masks, ids, mean, std)
    assert [v.shape[0] for v, _ in vols] == [2, 3]  # order of first appearance
    v, m = vols[1]
    expected = (images[2:].astype(np.float64) / 255 - mean[2:, None, None]) / std[2:, None, None]
    np.testing.assert_allclose(v, expected, atol=1e-5)
    assert m.shape == (3, 4, 4, 1) and m.dtype == np.float32
    assert np.array_equal(m[..., 0], (masks[2:] > 0).astype(np.float32))


def test_dice_loss_hand_case():
    p = torch.tensor([0.5, 1.0, 0.0, 0.25]).reshape(2, 1, 2, 1)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(2, 1, 2, 1)
    # sum(p*y) = 1.5, sum(p) = 1.75, sum(y) = 2 -> 1 - (3 + 1) / (3.75 + 1)
    assert math.isclose(float(dice_loss(p, y)), 1 - 4 / 4.75, rel_tol=1e-6)
    assert float(dice_loss(y, y)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("tuned", [False, True], ids=["naive", "tuned"])
def test_two_step_train_run(tuned):
    torch.manual_seed(0)
    np.random.seed(0)
    volumes = data.synthetic_volumes(num_patients=2, slices=4, image_size=32, seed=0)
    ds = data.BaselineDataset(volumes, transform=data.transforms(0.05, 15, 0.5))
    loader = data.make_loader(ds, batch_size=2, workers=0)
    model = UNet(in_channels=3, out_channels=1, init_features=4)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    r = train_epoch(model, loader, opt, "cpu", max_steps=2, amp=tuned, channels_last=tuned)
    assert r["steps"] == 2 and r["examples"] == 4
    assert len(r["loss"]) == 2 and all(0.0 <= v <= 1.0 for v in r["loss"])
    assert math.isfinite(r["final_loss"])
    for key in ("data_wait_total_s", "step_total_s", "wall_s", "examples_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert math.isfinite(r["examples_per_s_after_first"])


def test_no_per_step_sync_gives_the_same_losses():
    # The tuned loop fetches its losses once at the end; the numbers must be the per-step ones.
    torch.manual_seed(0)
    batches = [
        (torch.randn(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.7).float()) for _ in range(3)
    ]
    runs = []
    for sync in (True, False):
        torch.manual_seed(1)
        model = UNet(in_channels=3, out_channels=1, init_features=4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs.append(train_epoch(model, batches, opt, "cpu", sync_every_step=sync))
    assert all(isinstance(v, float) for v in runs[1]["loss"])
    np.testing.assert_allclose(runs[1]["loss"], runs[0]["loss"], rtol=1e-6)
    assert len(set(runs[0]["loss"])) == 3  # the parameters changed between steps
    assert runs[1]["final_loss"] == runs[1]["loss"][-1] and runs[1]["examples"] == 6


def test_worker_init_seeds_numpy_like_the_baseline():
    data.worker_init(3)
    a = np.random.rand(4)
    np.random.seed(45)
    np.testing.assert_array_equal(a, np.random.rand(4))


def test_cli_runs(capsys):
    # Workers 0: forking DataLoader workers from a pytest process that has already started JAX
    # (tests/test_augment.py) could deadlock; the worker seeding is tested on its own above.
    r = main(
        [
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--features",
            "4",
            "--workers",
            "0",
            "--patients",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert r["steps"] == 2 and math.isfinite(r["final_loss"])
    out = capsys.readouterr().out
    assert "step    2" in out and "examples/s" in out
