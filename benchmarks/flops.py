"""Model FLOPs and model FLOP utilisation (MFU): the analytic count of the U-Net's convolutions, the
devices' peak rates, and XLA's own count from a cost analysis."""

from __future__ import annotations

from typing import Any


def unet_forward_flops(
    features: int, image_size: int, in_channels: int = 3, out_channels: int = 1
) -> int:
    """Analytic FLOPs (2 x multiply-accumulates) of one U-Net forward pass on one image.

    Counts the convolutions and the transposed convolutions (the matmul-like work); BatchNorm,
    ReLU, pooling and concatenation are a fraction of a percent and left out. 3x3 convolutions
    count all 9 taps at every output pixel (zero padding included), as is usual for MFU.
    """

    def conv(h: int, cin: int, cout: int, k: int) -> int:
        return 2 * h * h * cin * cout * k * k

    f, h, c, total = features, image_size, in_channels, 0
    levels = [f, 2 * f, 4 * f, 8 * f]
    for ch in levels:  # encoder blocks
        total += conv(h, c, ch, 3) + conv(h, ch, ch, 3)
        c, h = ch, h // 2
    total += conv(h, c, 16 * f, 3) + conv(h, 16 * f, 16 * f, 3)  # bottleneck
    c = 16 * f
    for ch in reversed(levels):  # 2x2 stride-2 up-convolution, then a block on the concatenation
        total += 2 * h * h * c * 4 * ch
        h *= 2
        total += conv(h, 2 * ch, ch, 3) + conv(h, ch, ch, 3)
        c = ch
    return total + conv(h, c, out_channels, 1)


def training_flops_per_example(features: int, image_size: int) -> int:
    """Model FLOPs of one training example: forward + backward ~= 3 x forward."""
    return 3 * unet_forward_flops(features, image_size)


#: Dense bf16/fp16 tensor-core peaks (TFLOP/s) per device, for model FLOP utilisation; matched on
#: ``device_kind`` substrings in order. ``--peak-tflops`` overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device_kind: str | None) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_TFLOPS`, or None if unknown."""
    if not device_kind:
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def flops_of(cost: Any) -> float | None:
    """``flops`` from a JAX cost analysis (a dict, or a list of dicts in some versions)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
