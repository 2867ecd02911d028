"""Subprocess worker for test_input_pipeline: batches of a few steps on N fake devices."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from unet_jax.input_pipeline import AugmentSpec, ResidentData, make_mesh  # noqa: E402
from unet_jax.synthetic import blob_split  # noqa: E402


def batches(sampling: str, steps=(0, 1, 5)) -> dict:
    data = ResidentData(
        blob_split(3, 6, 32, 0), make_mesh(), 8, sampling, AugmentSpec(0.1, 20, 0.5)
    )
    fn = jax.jit(data.train_batch)
    key = jax.random.key(7)
    out = {}
    for s in steps:
        x, y = fn(key, s, data.arrays)
        assert len(x.sharding.device_set) == jax.device_count()
        out[f"{sampling}_x{s}"] = np.asarray(x)
        out[f"{sampling}_y{s}"] = np.asarray(y)
        out[f"{sampling}_i{s}"] = np.asarray(data.indices(jax.random.split(key)[0], s))
    return out


if __name__ == "__main__":
    res = {**batches("weighted"), **batches("shuffle")}
    np.savez(sys.argv[1], devices=jax.device_count(), **res)
