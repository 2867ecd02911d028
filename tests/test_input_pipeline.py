"""Input pipeline: sampling statistics, epochs, device-count invariance, padded evaluation,
normalisation, resident vs streaming."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from unet_jax.data import SplitData, concat, select_patients, split_from_records
from unet_jax.input_pipeline import (
    AugmentSpec,
    HostRecords,
    ResidentData,
    SamplerSpec,
    StreamingData,
    fits_on_device,
    make_mesh,
    resize_batch,
    sample_indices,
    slice_probabilities,
    validation_data,
)
from unet_jax.synthetic import blob_split

HERE = Path(__file__).resolve().parent


def _expected_probs(data: SplitData) -> np.ndarray:
    # Independent statement of the baseline's sampler: patient uniform, then slice weight
    # s_i + 0.1 * mean(s) normalised within the patient.
    area = data.masks.reshape(data.num_examples, -1).sum(1).astype(float)
    p = np.zeros(data.num_examples)
    for v in range(len(data.patients)):
        rows = np.flatnonzero(data.volume == v)
        w = area[rows] + 0.1 * area[rows].mean()
        p[rows] = w / w.sum() / len(data.patients)
    return p


def test_slice_probabilities_formula():
    data = blob_split(3, 6, 32)
    np.testing.assert_allclose(slice_probabilities(data), _expected_probs(data), rtol=1e-12)
    assert slice_probabilities(data).sum() == pytest.approx(1.0)


def test_weighted_sampler_frequencies_match_formula():
    data = blob_split(3, 6, 32)
    spec = SamplerSpec(data.num_examples, 50, "weighted")
    logp = jnp.log(jnp.asarray(slice_probabilities(data), jnp.float32))
    draw = jax.jit(lambda k, s: sample_indices(spec, k, s, logp))
    key = jax.random.key(0)
    idx = np.concatenate([np.asarray(draw(key, s)) for s in range(400)])  # 20,000 draws
    counts = np.bincount(idx, minlength=data.num_examples)
    expected = _expected_probs(data) * idx.size
    chi2, p = stats.chisquare(counts, expected)
    assert p > 1e-3, (chi2, p)
    # The rarest slices (no lesion: weight 0.1 * mean area) are really drawn less often.
    assert counts[expected < expected.mean()].mean() < counts[expected > expected.mean()].mean()


def test_shuffled_epoch_visits_each_slice_once():
    spec = SamplerSpec(23, 5, "shuffle")
    key = jax.random.key(1)
    for epoch in range(2):
        idx = np.concatenate(
            [
                np.asarray(sample_indices(spec, key, jnp.asarray(epoch * 4 + s), None))
                for s in range(spec.steps_per_epoch)
            ]
        )
        assert idx.size == 20 and len(set(idx.tolist())) == 20  # drop-last: 3 left out
    e0 = np.asarray(sample_indices(spec, key, jnp.asarray(0), None))
    e1 = np.asarray(sample_indices(spec, key, jnp.asarray(4), None))
    assert not np.array_equal(e0, e1)  # a new permutation each epoch


def test_same_seed_same_batches_on_one_and_eight_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = {}
    for n in (1, 8):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        r = subprocess.run(
            [sys.executable, str(HERE / "_pipeline_worker.py"), str(tmp_path / f"{n}.npz")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = np.load(tmp_path / f"{n}.npz")
    assert int(outs[1]["devices"]) == 1 and int(outs[8]["devices"]) == 8
    # Indices and masks identical; images equal up to float32 rounding (XLA fuses the
    # normalise + bilinear arithmetic differently per partitioning: measured <= 6e-6).
    for k in outs[1].files:
        if "_i" in k or "_y" in k:
            np.testing.assert_array_equal(outs[1][k], outs[8][k], err_msg=k)
        elif "_x" in k:
            np.testing.assert_allclose(outs[1][k], outs[8][k], atol=2e-5, err_msg=k)
    # ...and the batches really depend on the step.
    assert not np.array_equal(outs[1]["weighted_i0"], outs[1]["weighted_i1"])


def test_normalisation_and_padded_evaluation_cover_each_slice_once():
    data = blob_split(2, 7, 32)  # 14 slices, batch 4 -> 4 batches, 2 padding rows
    rd = ResidentData(data, make_mesh(), 4, "shuffle", AugmentSpec(0, 0, 0))
    assert rd.num_eval_batches == 4
    xs, valid = [], []
    for b in range(rd.num_eval_batches):
        x, y, v = rd.eval_batch(b)
        xs.append(np.asarray(x))
        valid.append(np.asarray(v))
        np.testing.assert_array_equal(np.asarray(y)[np.asarray(v)], data.masks[b * 4 : (b + 1) * 4])
    valid = np.concatenate(valid)
    assert valid.sum() == 14 and valid[:14].all() and not valid[14:].any()
    x = np.concatenate(xs)[valid]
    ref = (data.images / 255.0 - data.mean[data.volume][:, None, None, :]) / data.std[data.volume][
        :, None, None, :
    ]
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_train_batch_with_resize_keeps_masks_binary_and_augments():
    data = blob_split(2, 6, 32)
    rd = ResidentData(data, make_mesh(), 4, "weighted", AugmentSpec(0.05, 15, 0.5, image_size=16))
    x, y = jax.jit(rd.train_batch)(jax.random.key(0), 3, rd.arrays)
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 16, 16, 1)
    assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
    x2, _ = jax.jit(rd.train_batch)(jax.random.key(0), 4, rd.arrays)
    assert not np.allclose(np.asarray(x), np.asarray(x2))


def test_resident_and_streaming_give_identical_batches():
    data = blob_split(3, 6, 32)
    aug = AugmentSpec(0.05, 15, 0.5)
    mesh = make_mesh()
    records = [
        {
            "image": data.images[i],
            "mask": data.masks[i],
            "channel_mean": data.mean[data.volume[i]],
            "channel_std": data.std[data.volume[i]],
        }
        for i in range(data.num_examples)
    ]
    resident = ResidentData(data, mesh, 8, "weighted", aug)
    streaming = StreamingData(records, data, mesh, 8, "weighted", aug, num_threads=4)
    key = jax.random.key(3)
    fn = jax.jit(resident.train_batch)
    streamed = list(streaming.iterate(key, 0, 3))
    for s in range(3):
        xr, yr = fn(key, s, resident.arrays)
        xs, ys = streamed[s]
        np.testing.assert_allclose(np.asarray(xr), np.asarray(xs), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(yr), np.asarray(ys))


def test_patient_selection_concat_and_budget():
    a, b = blob_split(2, 4, 32, 0, "A"), blob_split(3, 4, 32, 1, "B")
    both = concat(a, b)
    assert both.patients == ("A00", "A01", "B00", "B01", "B02") and both.num_examples == 20
    sub = select_patients(both, ["B01", "A00"])
    assert sub.patients == ("A00", "B01")
    np.testing.assert_array_equal(sub.images[sub.volume == 1], b.images[b.volume == 1])
    with pytest.raises(ValueError, match="not in this data"):
        select_patients(both, ["Z"])
    assert fits_on_device(a, None) and not fits_on_device(a, 1e-6)


def test_bad_split_data_is_rejected_with_a_clear_error():
    d = blob_split(2, 4, 32)
    with pytest.raises(ValueError, match="non-finite.*P01"):
        std = d.std.copy()
        std[1, 0] = np.nan
        SplitData(d.images, d.masks, d.volume, d.slice_index, d.mean, std, d.patients)
    with pytest.raises(ValueError, match="masks shape"):
        SplitData(d.images, d.masks[:, :16], d.volume, d.slice_index, d.mean, d.std, d.patients)


def test_host_records_round_trip_through_split_from_records():
    data = blob_split(3, 5, 32, 2, "R")
    records = HostRecords(data)
    assert len(records) == data.num_examples
    back = split_from_records([records[i] for i in range(len(records))])
    assert back.patients == data.patients
    for name in ("images", "masks", "volume", "slice_index", "mean", "std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name), err_msg=name)


def test_streaming_reads_host_records_as_the_resident_split():
    data = blob_split(2, 6, 32)
    aug = AugmentSpec(0.05, 15, 0.5)
    mesh = make_mesh()
    resident = ResidentData(data, mesh, 4, "weighted", aug)
    streaming = StreamingData(HostRecords(data), data, mesh, 4, "weighted", aug, num_threads=2)
    key = jax.random.key(5)
    xr, yr = jax.jit(resident.train_batch)(key, 1, resident.arrays)
    xs, ys = streaming.train_batch(key, 1)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(xs), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(yr), np.asarray(ys))


def test_validation_data_is_in_order_and_never_augmented():
    data = blob_split(2, 6, 32)
    val = validation_data(data, make_mesh(), 4, "shuffle", 16)
    assert val.aug == AugmentSpec(0, 0, 0, 16) and val.spec.sampling == "shuffle"
    # Batch 1: slices 4..7 in order, normalised and resized, nothing else.
    x, y, valid = val.eval_batch(1)
    rows = slice(4, 8)
    ref = (data.images[rows] / 255.0 - data.mean[data.volume[rows]][:, None, None, :]) / data.std[
        data.volume[rows]
    ][:, None, None, :]
    ref_x, ref_y = resize_batch(jnp.asarray(ref, jnp.float32), jnp.asarray(data.masks[rows]), 16)
    assert np.asarray(valid).all()
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref_x), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y, np.float32))
    assert validation_data(data, make_mesh(), 4, "weighted", None).aug == AugmentSpec(0, 0, 0)
