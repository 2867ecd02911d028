"""The side-by-side benchmarks keep working: benchmarks/epoch_time.py, benchmarks/input_pipeline.py,
benchmarks/full_epoch.py, benchmarks/conv_grad.py and their shared modules (machine, flops, data,
runners, workers, cli), run for 1-2 steps at tiny size on synthetic data.

Sizes: images stored at 64 and resized on the fly to 32 (so the resize paths run too), U-Net
features 4, batch 4. XLA:CPU compiles the threefry PRNG slowly (the U-Net's ~50 parameter
initialisers alone take tens of seconds on a loaded 2-core machine), so the test that builds the
unet_jax Trainer switches JAX to the ``unsafe_rbg`` PRNG for its duration: the same code paths,
other random numbers, a fraction of the compile time.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from _requires import needs_torch
from benchmarks import conv_grad, epoch_time, full_epoch, input_pipeline
from benchmarks.data import load_data, load_saved_split, save_split
from benchmarks.flops import peak_tflops, training_flops_per_example, unet_forward_flops
from benchmarks.machine import fmt_summary, summarize
from benchmarks.runners import ResizePair, baseline_volumes
from unet_jax.synthetic import disc_split

TINY_DATA = ["--synthetic", "4,12,64", "--image-size", "32"]


def _finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_summary(s: dict, n: int) -> None:
    assert s["n"] == n and len(s["values"]) == n
    assert all(_finite_positive(v) for v in s["values"])
    assert s["min"] <= s["median"] <= s["max"]


@pytest.fixture
def fast_prng():
    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", old)


# ----------------------------------------------------------------------------- shared pieces


def _torch_hook_flops(features: int, size: int) -> int:
    """Independent count: 2 x MACs of every Conv2d / ConvTranspose2d from the shapes seen by
    forward hooks of the PyTorch model on the meta device (no arithmetic is done)."""
    import torch

    from benchmarks.torch_baseline.unet import UNet as TorchUNet

    model = TorchUNet(3, 1, features).to("meta")
    total = [0]

    def hook(mod, inputs, output):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        if isinstance(mod, torch.nn.ConvTranspose2d):  # every input pixel meets Cout * k taps
            total[0] += 2 * inputs[0][0].numel() * mod.out_channels * k
        else:  # every output pixel meets Cin * k taps
            total[0] += 2 * output[0].numel() * mod.in_channels * k

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    model(torch.zeros((1, 3, size, size), device="meta"))
    return total[0]


@needs_torch
@pytest.mark.parametrize("features,size", [(4, 32), (8, 64), (32, 256)])
def test_forward_flops_match_an_independent_count(features, size):
    assert unet_forward_flops(features, size) == _torch_hook_flops(features, size)


def test_training_flops_of_the_baseline_model():
    # The baseline's U-Net: about 24 GFLOP forward and 73 GFLOP per training image at 256x256, 32 features.
    assert 23.5e9 < unet_forward_flops(32, 256) < 24.5e9
    assert training_flops_per_example(32, 256) == 3 * unet_forward_flops(32, 256)
    assert 72e9 < training_flops_per_example(32, 256) < 74e9
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") is None


def test_summarize_and_format():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert fmt_summary(s) == "2.5 (1.0-10.0)"
    assert fmt_summary(None) == "-"
    with pytest.raises(ValueError):
        summarize([])


def test_load_data_without_data_dir_is_synthetic_and_labelled(tmp_path):
    split, label = load_data(str(tmp_path / "absent"), synthetic=(3, 5, 32))
    assert label.startswith("SYNTHETIC") and "absent" in label
    assert split.images.shape == (15, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.masks.max() == 1 and len(split.patients) == 3
    sub, label = load_data(None, patients=2, synthetic=(3, 5, 32))
    assert sub.num_examples == 10 and "first 2 patients" in label
    save_split(split, tmp_path / "cache")
    back = load_saved_split(tmp_path / "cache")
    for name in ("images", "masks", "volume", "slice_index", "mean", "std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(split, name))
    assert back.patients == split.patients


@needs_torch
def test_baseline_volumes_are_the_normalised_slices():
    split = disc_split(3, 4, 16, seed=1)
    vols = baseline_volumes(split)
    assert len(vols) == 3
    for v, (image, mask) in enumerate(vols):
        rows = split.volume_slices(v)
        want = (split.images[rows] / 255.0 - split.mean[v]) / split.std[v]
        np.testing.assert_allclose(image, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mask, split.masks[rows].astype(np.float32))


def test_resize_pair_keeps_masks_binary():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64, 1), np.float32)
    mask[10:30, 20:50] = 1
    x, y = ResizePair(32)((image, mask))
    assert x.shape == (32, 32, 3) and y.shape == (32, 32, 1)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert y.sum() == pytest.approx(mask.sum() / 4, rel=0.1)


# ----------------------------------------------------------------------------- epoch_time


@needs_torch
def test_epoch_time_runs_all_variants(tmp_path, fast_prng):
    out = tmp_path / "epoch.json"
    res = epoch_time.main(
        [
            *TINY_DATA,
            "--inprocess",
            "--features",
            "4",
            "--batch",
            "4",
            "--steps",
            "1",
            "--reps",
            "2",
            "--tuned-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    rows = {r["variant"]: r for r in res["results"]}
    assert set(rows) == {"baseline", "torch_tuned", "unet_jax"}
    assert res["data"].startswith("SYNTHETIC") and "64->32" in res["resize"]
    ref = rows["unet_jax"]
    for name, r in rows.items():
        for task in epoch_time.TASKS:
            _check_summary(r[task], 2)
            assert r["ratio_unet_jax"][task] == pytest.approx(
                ref[task]["median"] / r[task]["median"]
            )
        # Projected epoch = the real split's 3,336 examples over the data-included rate.
        want = sorted(3336 / v for v in r["step_data"]["values"])
        assert sorted(r["epoch_s"]["values"]) == pytest.approx(want)
        assert r["ratio_unet_jax"]["epoch"] == pytest.approx(
            r["epoch_s"]["median"] / ref["epoch_s"]["median"]
        )
        assert _finite_positive(float(r["peak_mem_mb"]))
        assert all(math.isfinite(x["loss"]) for x in res["raw"][name]["step_data"])
        assert f"| `{name}` |" in res["table"]
    assert all(v == pytest.approx(1.0) for v in ref["ratio_unet_jax"].values())
    flops = res["flops"]
    assert flops["analytic_forward_per_example"] == unet_forward_flops(4, 32)
    # XLA's own count of the forward pass is within 20% of the analytic one (it skips the
    # zero-padding taps, which matter at 32x32, and adds the elementwise work).
    assert flops["xla_forward_per_example"] == pytest.approx(
        flops["analytic_forward_per_example"], rel=0.2
    )
    saved = json.loads(out.read_text())
    assert saved["table"] == res["table"] and len(saved["results"]) == 3


def test_epoch_time_rejects_too_little_data():
    with pytest.raises(SystemExit):
        epoch_time.main(
            [
                "--synthetic",
                "1,4,32",
                "--image-size",
                "32",
                "--batch",
                "4",
                "--steps",
                "2",
                "--inprocess",
            ]
        )


# ----------------------------------------------------------------------------- full_epoch


def test_full_epoch_summary_by_hand():
    # Epoch ends at 10, 12, 14.5, 20, 23.5 s after t0 = 0: walls 10, 2, 2.5, 5.5, 3.5.
    res = full_epoch.summarise(
        [10.0, 12.0, 14.5, 20.0, 23.5],
        0.0,
        steps_per_epoch=100,
        batch=16,
        recipe_epochs=10,
        eval_every=2,
    )
    assert res["epoch_walls_s"] == pytest.approx([10, 2, 2.5, 5.5, 3.5])
    assert res["train_epoch_s"]["median"] == pytest.approx(2.25)  # epochs 2 and 3
    assert res["eval_and_checkpoint_s"] == pytest.approx(3.5 - 2.25)
    assert res["train_images_per_s"] == pytest.approx(1600 / 2.25)
    # 10 epochs: the first (10 s), 9 more at 2.25 s, 5 evaluations (every 2nd) at 1.25 s.
    assert res["recipe_projection_s"] == pytest.approx(10 + 9 * 2.25 + 5 * 1.25)
    with pytest.raises(ValueError):
        full_epoch.summarise(
            [1.0, 2.0, 3.0], 0.0, steps_per_epoch=1, batch=1, recipe_epochs=3, eval_every=1
        )


def test_full_epoch_runs_the_training_loop(tmp_path, fast_prng):
    out = tmp_path / "full.json"
    res = full_epoch.main(
        [
            "--exp",
            "smoke",
            "--epochs",
            "4",
            "--synthetic",
            "2,2,8,32",
            "--set",
            "features=4",
            "--set",
            "batch_size=4",
            "--set",
            "image_size=32",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
    )
    assert res["data"].startswith("SYNTHETIC") and res["steps_per_epoch"] == 16 // 4
    assert len(res["epoch_walls_s"]) == 4 and all(_finite_positive(w) for w in res["epoch_walls_s"])
    # Only the last two epochs evaluated, as documented.
    assert [e["epoch"] for e in res["evals"]] == [3, 4]
    assert res["config"]["eval_every_epochs"] == 3 and res["config"]["epochs"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "w" / "run" / "metrics.jsonl").open()]
    assert sorted(m["epoch"] for m in metrics if m["type"] == "eval") == [3, 4]
    assert json.loads(out.read_text())["table"] == res["table"]


def test_full_epoch_rejects_too_few_epochs():
    with pytest.raises(SystemExit):
        full_epoch.main(["--exp", "smoke", "--epochs", "3"])


# ----------------------------------------------------------------------------- conv_grad


@needs_torch
def test_weight_grad_formulations_match_a_numpy_sum():
    # dW[i, j, ci, co] = sum over n, h, w of x_pad[n, h+i, w+j, ci] * dy[n, h, w, co], by hand.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((3, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            want[i, j] = np.einsum("nhwc,nhwd->cd", xp[:, i : i + 6, j : j + 6], dy)
    for name, fn in conv_grad.weight_grad_fns(x.shape).items():
        np.testing.assert_allclose(np.asarray(fn(x, dy)), want, rtol=1e-4, atol=1e-4, err_msg=name)
    _, torch_hwio = conv_grad.torch_weight_grad(x, dy)
    np.testing.assert_allclose(torch_hwio, want, rtol=1e-4, atol=1e-4)
    _, blas_hwio = conv_grad.openblas_weight_grad(x, dy)
    np.testing.assert_allclose(blas_hwio, want, rtol=1e-4, atol=1e-4)


@needs_torch
def test_conv_grad_runs(tmp_path):
    out = tmp_path / "cg.json"
    res = conv_grad.main(
        [
            "--batch",
            "2",
            "--image-size",
            "16",
            "--features",
            "4",
            "--levels",
            "2",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    b = res["breakdown_ms"]
    for fw in ("jax", "torch"):
        assert all(_finite_positive(b[fw][k]) for k in ("forward", "input grads", "param grads"))
        assert b[fw]["weight grads (param - input)"] == pytest.approx(
            b[fw]["param grads"] - b[fw]["input grads"]
        )
    assert [tuple(r["shape"]) for r in res["layers"]] == [(2, 16, 16, 4), (2, 8, 8, 8)]
    for r in res["layers"]:
        assert set(r["ms"]) == {
            "xla",
            "shift9",
            "shift9_chunked",
            "im2col",
            "flat9",
            "cnhw_shift9",
            "openblas_flat9",
            "torch",
        }
        assert max(r["max_rel_err"].values()) < 1e-4
    assert "| (2, 16, 16, 4) |" in res["table"]
    assert json.loads(out.read_text())["table"] == res["table"]


# ----------------------------------------------------------------------------- input_pipeline


@needs_torch
def test_input_pipeline_in_worker_processes(tmp_path):
    # Worker processes, as in a measured run: forked DataLoader workers (0 and 2) included.
    out = tmp_path / "ip.json"
    res = input_pipeline.main(
        [
            *TINY_DATA,
            "--batch-sizes",
            "4",
            "--workers",
            "0,2",
            "--steps",
            "2",
            "--baseline-steps",
            "2",
            "--reps",
            "2",
            "--out",
            str(out),
        ]
    )
    rows = res["results"]
    assert [(r["pipeline"], r["workers"]) for r in rows] == [
        ("unet_jax", None),
        ("baseline", 0),
        ("baseline", 2),
    ]
    for r in rows:
        _check_summary(r["examples_per_s"], 2)
    assert {s["baseline_workers"] for s in res["speedups"]} == {0, 2}
    for s in res["speedups"]:
        base = next(r for r in rows if r["workers"] == s["baseline_workers"])
        assert s["speedup"] == pytest.approx(
            rows[0]["examples_per_s"]["median"] / base["examples_per_s"]["median"]
        )
    assert res["goal"].startswith("goal (>= 20x")
    assert res["infos"]["unet_jax"]["process"] == "subprocess"
    assert json.loads(out.read_text())["table"] == res["table"]


def test_input_pipeline_analyse_by_hand():
    tasks = [
        ("unet_jax", {"batch": 16}),
        ("baseline", {"batch": 16, "workers": 0}),
        ("baseline", {"batch": 16, "workers": 2}),
    ]
    results = {
        0: [{"examples_per_s": 900.0}, {"examples_per_s": 1100.0}],
        1: [{"examples_per_s": 25.0, "startup_s": 1.0}] * 2,
        2: [{"examples_per_s": 50.0, "startup_s": 1.0}] * 2,
    }
    rows, speedups = input_pipeline.analyse(tasks, results)
    assert rows[0]["examples_per_s"]["median"] == 1000.0
    assert [(s["baseline_workers"], s["speedup"]) for s in speedups] == [(0, 40.0), (2, 20.0)]
    table = input_pipeline.format_table(rows, speedups)
    assert "| 16 | 40.0x | 20.0x (N=2) |" in table


@pytest.mark.slow
def test_full_run_times_a_whole_experiment_cold_and_warm(tmp_path, monkeypatch):
    from benchmarks import full_run

    # The runs are subprocesses: the fast PRNG (see the module docstring) through the environment.
    monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")

    out = full_run.main(
        [
            "--exp", "run1", "--synthetic", "4,5,6", "--set", "image_size=16",
            "--set", "features=2", "--set", "batch_size=4", "--set", "epochs=2",
            "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    cold, warm = out["rows"]
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    for row in (cold, warm):
        assert row["runs"] == 1 and row["epochs"] == 2
        assert 0 < row["compile_s"] < row["wall_s"] and row["outside_training_s"] > 0
        assert row["eval_ckpt_visible_s"] >= 0 and row["eval_ckpt_background_s"] > 0
        assert 0 <= row["best_val_dsc"][0] <= 1
    # The warm run loads what the cold one compiled.
    assert warm["compile_s"] < cold["compile_s"]
    assert any((tmp_path / "xla_cache_run1").iterdir())
    assert "| run1 | warm |" in out["table"]
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["cache"] == "warm"


def test_epoch_loop_times_both_dispatch_modes(fast_prng):
    from benchmarks import epoch_loop

    out = epoch_loop.main(
        ["--image-size", "16", "--features", "2", "--batch", "4", "--synthetic", "2,4,16",
         "--reps", "1"]
    )  # fmt: skip
    assert set(out["times"]) == {"device loop (lax.scan)", "host steps"}
    assert all(len(v) == 1 and v[0] > 0 for v in out["times"].values())
    assert "| host steps |" in out["table"] and "1.00x" in out["table"]


def test_packed_runs_times_alone_and_both_packings(fast_prng):
    from benchmarks import packed_runs

    out = packed_runs.main(
        ["--runs", "2", "--image-size", "16", "--features", "2", "--batch", "4",
         "--synthetic", "2,4,16", "--reps", "1"]
    )  # fmt: skip
    assert set(out["results"]) == {2}
    times = out["results"][2]["times"]
    assert set(times) == {"alone", "vmap", "unroll"}
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert "| 2 | vmap |" in out["table"] and "| 2 | alone |" in out["table"]
