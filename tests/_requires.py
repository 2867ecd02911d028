"""Markers for tests that need an optional extra. The newer-Python CI leg installs no PyTorch
(its wheel for that Python is a CUDA build of several GB), so these skip there, naming why."""

import importlib.util

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None

needs_torch = pytest.mark.skipif(
    not HAS_TORCH,
    reason="needs PyTorch (the baseline's reference): pip install -e '.[baseline]'",
)
