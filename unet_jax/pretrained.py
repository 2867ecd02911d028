"""Trained models in the package: one safetensors file per model, pinned by its SHA-256.

    python -m unet_jax.pretrained list
    python -m unet_jax.pretrained export --checkpoint RUN --name NAME --out FILE [--dtype float16]

A model file holds the parameters and BatchNorm statistics (tensor names are the model's state
paths, e.g. ``enc1.conv1.kernel``) and, as safetensors metadata (strings), everything needed to
use it: the run's config (preprocessing: ``dataset_config``, ``image_size``, channels, features,
threshold), the recipe, the training data, the date, the storage dtype and the measured metrics.
:func:`load` returns ``(model, config, meta)`` as :func:`unet_jax.checkpoint.load_model` does,
so predict and evaluation take a packaged model wherever they take a checkpoint.

A packaged model (:data:`MODELS`) is loaded only if its file's SHA-256 is the one pinned here: a
changed byte is an error, never a silently different model. A file given by path (a model a user
exported) is checked for format, architecture and finite values, not pinned.

Why safetensors: the common format for shipped weights (no pickle, so loading runs no code;
readable from PyTorch, NumPy and JAX alike), with string metadata for the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "unet_jax.pretrained/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Storage dtypes :func:`export` offers; the loader casts back to the config's compute dtype.
DTYPES = ("float32", "float16", "bfloat16")


class PretrainedError(ValueError):
    """A model name, file or export that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model shipped in :data:`WEIGHTS_DIR`: its file and the SHA-256 the loader requires."""

    name: str
    file: str
    sha256: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


#: The packaged models by name. Their model cards: ``unet_jax/weights/README.md``.
MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "lgg-cpu-quick-128",
            "lgg-cpu-quick-128.safetensors",
            "a2b212a942d4965d6852952b130b3dee2923c3186b33b2d3eb881e7cd9a4497e",
        ),
    )
}
#: What ``python -m unet_jax.predict`` uses when given no checkpoint and no model.
DEFAULT_MODEL = "lgg-cpu-quick-128"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_model_reference(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a packaged model or a ``.safetensors`` model file (not a checkpoint)."""
    text = os.fspath(ref)
    return text.endswith(".safetensors") or (text in MODELS and not Path(text).exists())


def resolve(ref: str | os.PathLike) -> tuple[Path, PackagedModel | None]:
    """The file of a model name or path, with its pin (None for a file given by path)."""
    text = os.fspath(ref)
    if text in MODELS and not Path(text).exists():
        model = MODELS[text]
        if not model.path.is_file():
            raise PretrainedError(
                f"packaged model {text!r}: its file {model.path} is missing (reinstall unet_jax)"
            )
        return model.path, model
    path = Path(text)
    if not text.endswith(".safetensors"):
        known = ", ".join(MODELS) or "none"
        raise PretrainedError(
            f"unknown model {text!r}: give a packaged model's name ({known}; "
            "`python -m unet_jax.pretrained list`) or a .safetensors file"
        )
    if not path.is_file():
        raise PretrainedError(f"model file {path} does not exist")
    return path, None


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PretrainedError(
            f"{path} is not a readable safetensors model file ({' '.join(str(e).split())})"
        ) from None


def load(ref: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """``(model in eval mode, config, meta)`` of a packaged model's name or a model file.

    ``meta`` holds ``config`` (as a dict), ``model`` (its name), ``file``, ``sha256``, ``dtype``
    (storage), ``step``, ``metrics`` and the card's other fields. Raises :class:`PretrainedError`
    (one line) for an unknown name, a file whose SHA-256 is not the pinned one, a file that is
    not a unet_jax model, one of another architecture than its config, or non-finite values.
    """
    import jax
    import jax.numpy as jnp

    from unet_jax.config import Config
    from unet_jax.model import abstract_model, load_pure, model_to_pure, named_leaves

    path, packaged = resolve(ref)
    digest = sha256_of(path)
    if packaged is not None and digest != packaged.sha256:
        raise PretrainedError(
            f"packaged model {packaged.name!r}: {path} has SHA-256 {digest}, not the pinned "
            f"{packaged.sha256}: the file was changed or damaged (reinstall unet_jax)"
        )
    tensors, metadata = _read(path)
    if metadata.get("format") != FORMAT:
        raise PretrainedError(
            f"{path} is not a unet_jax model file (metadata format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}; a PyTorch state dict goes through `python -m unet_jax.convert`)"
        )
    try:
        card = json.loads(metadata["card"])
        config = Config.from_dict(card["config"])
    except Exception as e:
        raise PretrainedError(
            f"{path}: its metadata holds no valid model config ({' '.join(str(e).split())})"
        ) from None
    model = abstract_model(config)
    template = model_to_pure(model)
    needed = named_leaves(template)
    problems = [f"{k} missing" for k in needed if k not in tensors]
    problems += [f"{k} not in the model" for k in tensors if k not in needed]
    problems += [
        f"{k} is {'x'.join(map(str, tensors[k].shape))}, the model needs "
        f"{'x'.join(map(str, needed[k].shape))}"
        for k in needed
        if k in tensors and tuple(tensors[k].shape) != tuple(needed[k].shape)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PretrainedError(
            f"{path}: its tensors are not those of the model its config describes "
            f"(in_channels={config.in_channels}, out_channels={config.out_channels}, "
            f"features={config.features}): {problems[0]}{more}"
        )
    bad = [k for k, v in tensors.items() if not np.isfinite(v.astype(np.float32)).all()]
    if bad:
        raise PretrainedError(f"{path}: NaN or inf in {', '.join(sorted(bad)[:3])}")
    device = jax.local_devices()[0]
    names = iter(needed)  # tree_leaves_with_path order == tree_map_with_path order
    pure = jax.tree.map(
        lambda leaf: jax.device_put(
            jnp.asarray(tensors[next(names)].astype(np.float32), leaf.dtype), device
        ),
        template,
    )
    load_pure(model, pure)
    model.eval()
    meta = {k: v for k, v in card.items() if k != "config"}
    meta.update(
        config=config.to_dict(),
        file=str(path),
        sha256=digest,
        packaged=packaged is not None,
    )
    return model, config, meta


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str,
    step: int | None = None,
    dtype: str = "float16",
    card: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint's model (a workdir's best unless ``step``) as a model file.

    The file's card holds the config (without machine-specific paths), the name, the checkpoint's
    step and evaluation metrics, the storage ``dtype``, the date and ``card``'s fields (recipe,
    training data, measured metrics...). Written aside and renamed when complete.
    """
    from safetensors.numpy import save_file

    from unet_jax.checkpoint import load_model
    from unet_jax.model import model_to_pure, named_leaves

    if dtype not in DTYPES:
        raise PretrainedError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model, config, meta = load_model(checkpoint, step)
    leaves = named_leaves(model_to_pure(model))
    if dtype == "bfloat16":
        import ml_dtypes

        storage = np.dtype(ml_dtypes.bfloat16)
    else:
        storage = np.dtype(dtype)
    tensors = {}
    for k, v in leaves.items():
        x = np.asarray(v, np.float32)
        if dtype != "float32" and np.abs(x).max(initial=0) > float(np.finfo(storage).max):
            raise PretrainedError(f"{k} exceeds the range of {dtype}: export as float32")
        tensors[k] = x.astype(storage)
    portable = config.replace(data_dir=None, manual_dir=None)
    full_card = {
        "name": name,
        "config": portable.to_dict(),
        "dtype": dtype,
        "step": meta.get("step"),
        "checkpoint_metrics": meta.get("metrics", {}),
        "exported": datetime.date.today().isoformat(),
        **(card or {}),
    }
    metadata = {"format": FORMAT, "name": name, "card": json.dumps(full_card, sort_keys=True)}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise PretrainedError(f"{out}: a model file's name ends in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # package data: readable by every user, as other files
        os.replace(partial, out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise PretrainedError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def card_of(ref: str | os.PathLike) -> dict[str, Any]:
    """A model file's card (its metadata), read without building the model."""
    path, _ = resolve(ref)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
    return json.loads(metadata.get("card", "{}"))


def describe(name: str) -> str:
    """A packaged model's card in a few lines (``python -m unet_jax.pretrained list``)."""
    m = MODELS[name]
    card = card_of(name)
    c = card.get("config", {})
    ev = card.get("evaluation", {})
    size = m.path.stat().st_size / 2**20
    lines = [
        f"{name}{' (default)' if name == DEFAULT_MODEL else ''}: {card.get('recipe', '?')}",
        f"  input: {c.get('in_channels')} channels (pre-contrast, FLAIR, post-contrast), "
        f"preprocessing {c.get('dataset_config')!r} done by predict, model at "
        f"{c.get('image_size')}x{c.get('image_size')}, {c.get('features')} features",
        f"  trained on: {card.get('training_data', '?')}",
    ]
    for key, label in (("no_tta", "without TTA"), ("tta", "with TTA")):
        if key in ev:
            e = ev[key]
            lines.append(
                f"  {label}: mean DSC {e['val_dsc']:.4f} (median {e['val_dsc_median']:.4f}), "
                f"HD95 {e['val_hd95']:.2f} voxels, on {e['val_patients']} validation patients at "
                "256x256, after the largest 3D component"
            )
    lines.append(f"  file: {m.path} ({size:.1f} MiB, {card.get('dtype')}), sha256 {m.sha256}")
    lines.append("  for research use only, not for clinical decisions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unet_jax.pretrained", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the packaged models' cards")
    ex = sub.add_parser("export", help="write a checkpoint's model as a .safetensors model file")
    ex.add_argument("--checkpoint", required=True, help="training workdir or checkpoint folder")
    ex.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    ex.add_argument("--name", required=True, help="the model's name, stored in its card")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument(
        "--dtype", choices=DTYPES, default="float16", help="storage dtype (default float16)"
    )
    ex.add_argument(
        "--card", help="a JSON file of extra card fields (recipe, training data, metrics)"
    )
    args = parser.parse_args(argv)
    from unet_jax.checkpoint import CheckpointError

    try:
        if args.command == "list":
            print("\n\n".join(describe(n) for n in MODELS))
            return 0
        card = json.loads(Path(args.card).read_text()) if args.card else None
        out = export(
            args.checkpoint, args.out, name=args.name, step=args.step, dtype=args.dtype, card=card
        )
    except (PretrainedError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {args.dtype}), sha256 {sha256_of(out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
