"""Import the PyTorch baseline's weights (brain-segmentation-pytorch ``state_dict``).

``unet_from_torch(state_dict)`` returns a :class:`~unet_jax.model.UNet` in eval mode whose
outputs equal PyTorch's; ``python -m unet_jax.convert IN.pt OUT_DIR`` writes it as an Orbax
checkpoint that the rest of the project (e.g. ``python -m unet_jax.predict``) loads.

Reading a ``.pt`` file needs PyTorch, the ``baseline`` extra (``pip install -e ".[baseline]"``);
the rest of the project does not. Weights holding NaN or inf, or negative BatchNorm variances,
are refused: such a model predicts nothing. The output is written beside its place and renamed
into it when complete, so a failed conversion leaves nothing behind.

Layouts: PyTorch conv weights are ``(C_out, C_in, kH, kW)`` and Flax's ``(kH, kW, C_in, C_out)``;
transposed-conv weights are ``(C_in, C_out, 2, 2)`` in PyTorch and ``(C_in, 2, 2, C_out)`` here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax.config import Config
from unet_jax.fileio import os_error_reason
from unet_jax.model import UNet, load_pure, model_to_pure
from unet_jax.rundir import unwritable_reason

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


#: How the README installs PyTorch for the conversion (the ``baseline`` extra).
INSTALL_TORCH = 'pip install -e ".[baseline]"'


class ConversionError(ValueError):
    """Bad input or output: the state_dict is not the baseline U-Net's (missing/extra keys,
    wrong shapes, non-finite values), the file cannot be read, or the output cannot be written."""


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


def _check_values(sd: Mapping[str, np.ndarray], keys: list[str]) -> None:
    """Refuse NaN/inf anywhere and negative running variances: the model would output NaN,
    which thresholds to empty masks without any error."""
    non_finite = [k for k in keys if not np.isfinite(sd[k].astype(np.float32)).all()]
    if non_finite:
        raise ConversionError(
            f"the state_dict holds NaN or inf in {len(non_finite)} tensor(s): {non_finite}"
        )
    negative = [k for k in keys if k.endswith(".running_var") and (sd[k] < 0).any()]
    if negative:
        raise ConversionError(
            f"the state_dict holds negative BatchNorm running variances in: {negative}"
        )


def unet_from_torch(state_dict: Mapping[str, Any]) -> UNet:
    """Build an eval-mode UNet from the baseline's ``state_dict`` (torch tensors or numpy arrays).

    Raises :class:`ConversionError` naming every missing, unexpected or mis-shaped key, and
    the tensors holding NaN/inf (or negative running variances).
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    in_ch, out_ch, features = _infer_sizes(sd)
    # Shapes only: every leaf is set from the state_dict (the mapping covers them all), so
    # nothing is initialised, and a refused state_dict costs no model.
    model = nnx.eval_shape(lambda: UNet(in_ch, out_ch, features, rngs=nnx.Rngs(0)))
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
        node[path[-1]] = value
    if wrong_shape:
        problems.append(
            f"wrong shapes (for in_channels={in_ch}, out_channels={out_ch}, "
            f"features={features}): {wrong_shape}"
        )
    if problems:
        raise ConversionError("not a baseline U-Net state_dict: " + "; ".join(problems))
    _check_values(sd, [key for key, _, _ in rows])
    load_pure(model, jax.tree.map(jnp.asarray, state))
    model.eval()
    return model


def load_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt`` state_dict safely (``weights_only=True``: no arbitrary unpickling).

    Needs PyTorch (the ``baseline`` extra); without it, a :class:`ConversionError` says how to
    install it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        import torch  # the `baseline` extra; only needed for this entry point
    except ImportError:
        raise ConversionError(
            f"{path}: reading a .pt file needs PyTorch, which is not installed; "
            f"install the baseline extra: {INSTALL_TORCH}"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        reason = " ".join(str(e).split())  # torch's messages span several lines
        raise ConversionError(
            f"{path}: cannot be loaded as a weights-only state_dict ({reason})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    return obj


def check_output(out: Path) -> None:
    """Refuse an output that exists with content or as a file, or that cannot be made (a file
    in its path, a folder we may not write in), before anything is read or written."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")
    # The checkpoint is written beside ``out`` and renamed into place: its parent must be (or
    # become) a folder we can write in.
    reason = unwritable_reason(out)
    if reason:
        raise ConversionError(f"output {out}: {reason}")


def write_checkpoint(out: Path, model: UNet, config: Config, meta: dict[str, Any]) -> None:
    """Write the model-only checkpoint into a new folder beside ``out`` and rename it to ``out``
    when complete; on failure remove it (and the parent folders made for it)."""
    from unet_jax.checkpoint import save_model_checkpoint

    out = out.absolute()
    made = []  # parent folders created here, outermost last
    for parent in out.parents:
        if parent.exists():
            break
        made.append(parent)
    partial = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed output
        save_model_checkpoint(partial, model, config, meta)
        if out.is_dir():
            out.rmdir()  # checked empty before; fails if something appeared meanwhile
        partial.rename(out)
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError):
            raise ConversionError(f"cannot write the output {out}: {os_error_reason(e)}") from None
        if isinstance(e, Exception):  # Orbax wraps some I/O errors in its own types
            reason = " ".join(str(e).split())
            raise ConversionError(
                f"cannot write the output {out}: {type(e).__name__}: {reason}"
            ) from None
        raise


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m unet_jax.convert IN.pt OUT_DIR``; returns the exit status (0 done, 2 bad
    input or output, 130 interrupted)."""
    parser = argparse.ArgumentParser(
        prog="python -m unet_jax.convert",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 done, 2 bad input or output, 130 interrupted. Needs PyTorch "
        f"(the baseline extra: {INSTALL_TORCH}).",
    )
    parser.add_argument("input", help="the baseline's .pt state_dict (e.g. unet.pt)")
    parser.add_argument("output", help="new directory for the Orbax checkpoint")
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="input size the model was trained at (saved in the config; a multiple of 16)",
    )
    args = parser.parse_args(argv)
    out = Path(args.output)
    try:
        if args.image_size < 16 or args.image_size % 16:
            raise ConversionError(
                f"--image-size {args.image_size}: must be a positive multiple of 16 "
                "(the U-Net halves it four times)"
            )
        check_output(out)
        state_dict = load_torch_state_dict(args.input)
        try:
            model = unet_from_torch(state_dict)
        except ConversionError as e:
            raise ConversionError(f"{args.input}: {e}") from None
        config = Config(
            name="converted_torch_baseline",
            in_channels=model.in_channels,
            out_channels=model.out_channels,
            features=model.features,
            image_size=args.image_size,
            dataset_config="baseline",
        )
        write_checkpoint(out, model, config, {"source": str(Path(args.input).absolute())})
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(
        f"wrote {out} (features={model.features}, in={model.in_channels}, out={model.out_channels})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
