"""Import the PyTorch baseline's weights (brain-segmentation-pytorch ``state_dict``).

``unet_from_torch(state_dict)`` returns a :class:`~unet_jax.model.UNet` in eval mode whose
outputs equal PyTorch's; ``python -m unet_jax.convert IN.pt OUT_DIR`` writes it as an Orbax
checkpoint that the rest of the project (e.g. ``python -m unet_jax.predict``) loads.

Layouts: PyTorch conv weights are ``(C_out, C_in, kH, kW)`` and Flax's ``(kH, kW, C_in, C_out)``;
transposed-conv weights are ``(C_in, C_out, 2, 2)`` in PyTorch and ``(C_in, 2, 2, C_out)`` here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax.config import Config
from unet_jax.model import UNet, load_pure, model_to_pure

_BLOCKS = [
    "encoder1",
    "encoder2",
    "encoder3",
    "encoder4",
    "bottleneck",
    "decoder4",
    "decoder3",
    "decoder2",
    "decoder1",
]
_BLOCK_PREFIX = {
    "encoder1": "enc1",
    "encoder2": "enc2",
    "encoder3": "enc3",
    "encoder4": "enc4",
    "bottleneck": "bottleneck",
    "decoder4": "dec4",
    "decoder3": "dec3",
    "decoder2": "dec2",
    "decoder1": "dec1",
}


class ConversionError(ValueError):
    """The state_dict is not the baseline U-Net's (missing/extra keys or wrong shapes)."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _mapping(features: int) -> list[tuple[str, tuple[str, ...], str]]:
    """(torch key, path in the NNX state, kind) for every tensor the conversion reads."""
    rows = []
    for block in _BLOCKS:
        p = _BLOCK_PREFIX[block]
        for i in (1, 2):
            rows.append((f"{block}.{p}conv{i}.weight", (block, f"conv{i}", "kernel"), "conv"))
            rows.append((f"{block}.{p}norm{i}.weight", (block, f"norm{i}", "scale"), "vec"))
            rows.append((f"{block}.{p}norm{i}.bias", (block, f"norm{i}", "bias"), "vec"))
            rows.append(
                (f"{block}.{p}norm{i}.running_mean", (block, f"norm{i}", "running_mean"), "vec")
            )
            rows.append(
                (f"{block}.{p}norm{i}.running_var", (block, f"norm{i}", "running_var"), "vec")
            )
    for level in (4, 3, 2, 1):
        rows.append((f"upconv{level}.weight", (f"upconv{level}", "kernel"), "upconv"))
        rows.append((f"upconv{level}.bias", (f"upconv{level}", "bias"), "vec"))
    rows.append(("conv.weight", ("conv", "kernel"), "conv"))
    rows.append(("conv.bias", ("conv", "bias"), "vec"))
    return rows


def _infer_sizes(sd: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    try:
        w1 = sd["encoder1.enc1conv1.weight"]
        wout = sd["conv.weight"]
    except KeyError as e:
        raise ConversionError(
            f"not a baseline U-Net state_dict: missing key {e.args[0]!r}"
        ) from None
    if w1.ndim != 4 or wout.ndim != 4:
        raise ConversionError(
            f"not a baseline U-Net state_dict: encoder1.enc1conv1.weight has shape {w1.shape}, "
            f"conv.weight has shape {wout.shape} (expected 4-D conv weights)"
        )
    return int(w1.shape[1]), int(wout.shape[0]), int(w1.shape[0])


def unet_from_torch(state_dict: Mapping[str, Any]) -> UNet:
    """Build an eval-mode UNet from the baseline's ``state_dict`` (torch tensors or numpy arrays).

    Raises :class:`ConversionError` naming every missing, unexpected or mis-shaped key.
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    in_ch, out_ch, features = _infer_sizes(sd)
    model = UNet(in_ch, out_ch, features, rngs=nnx.Rngs(0))
    state = model_to_pure(model)
    rows = _mapping(features)
    expected = {key for key, _, _ in rows}
    # num_batches_tracked only matters for momentum=None in PyTorch; the baseline uses 0.1.
    ignorable = {k for k in sd if k.endswith(".num_batches_tracked")}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected - ignorable)
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    wrong_shape = []
    for key, path, kind in rows:
        if key not in sd:
            continue
        value = sd[key].astype(np.float32)
        if kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif kind == "upconv":
            value = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
        node = state
        for name in path[:-1]:
            node = node[name]
        target_shape = tuple(node[path[-1]].shape)
        if value.shape != target_shape:
            wrong_shape.append(f"{key}: {tuple(sd[key].shape)}")
            continue
        node[path[-1]] = jnp.asarray(value)
    if wrong_shape:
        problems.append(
            f"wrong shapes (for in_channels={in_ch}, out_channels={out_ch}, "
            f"features={features}): {wrong_shape}"
        )
    if problems:
        raise ConversionError("not a baseline U-Net state_dict: " + "; ".join(problems))
    load_pure(model, state)
    model.eval()
    return model


def load_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt`` state_dict safely (``weights_only=True``: no arbitrary unpickling)."""
    import torch  # the `baseline` extra; only needed for this entry point

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ConversionError(
            f"{path}: cannot be loaded as a weights-only state_dict ({e})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    return obj


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m unet_jax.convert IN.pt OUT_DIR``."""
    from unet_jax.checkpoint import save_model_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m unet_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("input", help="the baseline's .pt state_dict (e.g. unet.pt)")
    parser.add_argument("output", help="new directory for the Orbax checkpoint")
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="input size the model was trained at (saved in the config)",
    )
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        print(f"error: output directory {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        model = unet_from_torch(load_torch_state_dict(args.input))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = Config(
        name="converted_torch_baseline",
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        features=model.features,
        image_size=args.image_size,
        dataset_config="baseline",
    )
    save_model_checkpoint(out, model, config, {"source": str(Path(args.input).absolute())})
    print(
        f"wrote {out} (features={model.features}, in={model.in_channels}, out={model.out_channels})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
