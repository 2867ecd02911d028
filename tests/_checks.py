"""Assertions shared by the tests: one-line error messages; two programs that train one run."""


def assert_one_line(err: BaseException, *parts: str) -> None:
    """``err`` shows as one line without a chained traceback, naming every one of ``parts``."""
    message = str(err)
    assert "\n" not in message, message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    for part in parts:
        assert part in message, (part, message)


# --- Two different compiled programs of one training run -------------------------------------
# XLA promises nothing about float equality between two programs (a step inside `lax.scan` or
# alone, a step vmapped over packed runs or not, one process or two): it may order a reduction's
# sums differently, and which order it picks differs between CPUs and XLA versions. Such a
# difference starts in the last bits and training then amplifies it (Adam divides each step by
# the gradient's RMS, so near-zero gradients turn last-bit differences into parameter moves of a
# fraction of the learning rate). Measured on the tiny U-Net of tests/_synth.py (tiny_config,
# blob_train_val), 2-core Intel Xeon, jax 0.10.2 and 0.12.0.1, 4 seeds, and an AMD EPYC (Zen 5)
# CI run with jax 0.10.2:
#   * the first step's loss (no update yet): within 7.4e-8 relative in every comparison below;
#   * float rounding alone, the same program with every parameter nudged by one ulp: losses
#     within 9e-6 relative over 8 steps, parameters within 5e-3 relative L2;
#   * epoch as one scan vs step by step: losses 1.5e-6 (jax 0.12; bitwise on jax 0.10.2 Intel,
#     1.4e-7 at step 4 on AMD), parameters 4.4e-3;
#   * packed runs vmapped vs alone, 6 steps: losses 4.3e-5 (Intel), 2.3e-4 (AMD), parameters
#     2.1e-2 (Intel).
# Bounds: 1e-6 for the first loss (13x), 2e-3 for later losses (9x the AMD vmap gap), 0.1 for
# the parameters (5x). What they must tell apart: another seed's run differs by 1.5e-2 to 1e-1
# in the first loss and by >= 4e-2 in the largest of its first 6 losses (measured, 5 pairs of seeds).
FIRST_LOSS_RTOL = 1e-6
LOSS_RTOL = 2e-3
PARAM_REL_GAP = 0.1


def relative_l2_gap(a, b) -> float:
    """Relative L2 distance between two lists of arrays (``b`` is the reference)."""
    import numpy as np

    a, b = [np.asarray(x, np.float64) for x in a], [np.asarray(x, np.float64) for x in b]
    diff = np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return float(diff / np.sqrt(sum((y**2).sum() for y in b)))


def assert_same_training(losses, reference, params=None, reference_params=None) -> None:
    """Two programs trained the same run: equal up to amplified float rounding (bounds above)."""
    import numpy as np

    losses, reference = np.asarray(losses, np.float64), np.asarray(reference, np.float64)
    assert losses.shape == reference.shape and losses.size >= 1, (losses, reference)
    np.testing.assert_allclose(losses[0], reference[0], rtol=FIRST_LOSS_RTOL, atol=0)
    np.testing.assert_allclose(losses, reference, rtol=LOSS_RTOL, atol=0)
    if params is not None:
        gap = relative_l2_gap(params, reference_params)
        assert gap <= PARAM_REL_GAP, f"parameters differ by {gap:.3g} relative L2"
