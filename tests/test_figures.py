"""Tests of unet_jax.figures: the drawn mean and median lines and the statistics behind them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unet_jax import figures


def test_patient_bar_lines_at_mean_and_median(tmp_path: Path):
    values = [0.91, 0.15, 0.77, 0.62, 0.88]
    drawn = figures.plot_patient_bars(
        list("abcde"), values, tmp_path / "bars.png", ylabel="DSC", title="t"
    )
    assert drawn["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert drawn["median"] == pytest.approx(np.median(values), abs=1e-12)
    assert (tmp_path / "bars.png").is_file()


def test_mean_median_ignores_nan():
    assert figures.mean_median([1.0, np.nan, 0.0, 0.5]) == pytest.approx((0.5, 0.5))
    assert all(np.isnan(figures.mean_median([np.nan])))


def test_moving_average_matches_direct_computation():
    x = np.random.default_rng(2).random(23)
    got = figures.moving_average(x, 5)
    want = [x[max(0, i - 4) : i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(got, want)


def test_unbounded_patient_bars_skip_undefined_values(tmp_path: Path):
    # HD95 in voxels: not in [0, 1], and NaN where undefined (drawn as "n/a", no bar).
    values = [3.0, np.nan, 12.5, 7.0]
    drawn = figures.plot_patient_bars(
        list("abcd"), values, tmp_path / "hd95.png", ylabel="HD95", title="t", unit_range=False
    )
    assert drawn["mean"] == pytest.approx(np.mean([3.0, 12.5, 7.0]), abs=1e-12)
    assert drawn["median"] == pytest.approx(7.0, abs=1e-12)
    assert (tmp_path / "hd95.png").is_file()
