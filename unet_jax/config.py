"""The run configuration: one typed, frozen dataclass.

Every experiment under ``experiments/configs/`` returns a :class:`Config`; the resolved config is
saved as ``config.json`` beside the run and inside every checkpoint, so inference and resume
read the model and preprocessing settings from there instead of from flags.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings of a training run. Defaults are the PyTorch baseline's where it has one."""

    name: str = "default"

    # --- data ---------------------------------------------------------------------------
    #: TFDS builder config: ``baseline`` (the baseline's preprocessing) or ``raw``.
    dataset_config: str = "baseline"
    #: Where the built TFDS data lives (None: TFDS's default, ~/tensorflow_datasets).
    data_dir: str | None = None
    #: Where the Kaggle download is (None: TFDS's manual-dir convention, <data_dir>/downloads/manual).
    manual_dir: str | None = None
    #: ``synthetic`` generates the project's phantom data set instead of reading LGG.
    source: str = "lgg"
    synthetic_patients: int = 12
    synthetic_slices: tuple[int, int] = (16, 24)
    #: Model input size; slices are resized on device when it differs from the stored 256.
    image_size: int = 256
    #: ``holdout`` = the baseline's 10 validation patients; ``fold`` = patient-level k folds.
    split: str = "holdout"
    num_folds: int = 5
    fold: int = 0
    #: Device-memory budget for the resident pipeline in GiB (None: always resident).
    device_memory_budget_gb: float | None = None

    # --- sampling and augmentation --------------------------------------------------------
    #: ``weighted``: the baseline's lesion-weighted sampling; ``shuffle``: epochs of all slices.
    sampling: str = "weighted"
    aug_scale: float = 0.05
    aug_angle: float = 15.0
    aug_flip: float = 0.5

    # --- model --------------------------------------------------------------------------
    in_channels: int = 3
    out_channels: int = 1
    features: int = 32
    #: Compute dtype: ``float32`` or ``bfloat16`` (parameters stay float32).
    dtype: str = "float32"

    # --- optimisation -------------------------------------------------------------------
    batch_size: int = 16
    epochs: int = 100
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    #: ``constant`` or ``cosine`` (decay to ``lr * final_lr_fraction`` over the run).
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    final_lr_fraction: float = 0.0
    #: Global-norm gradient clipping (None: off).
    grad_clip: float | None = None
    #: ``dice`` (the baseline's) or ``bce_dice``.
    loss: str = "dice"
    seed: int = 42

    #: How an epoch is dispatched on the resident path: ``device`` (the epoch's steps as one
    #: compiled loop, ``lax.scan``), ``host`` (one dispatch per step) or ``auto``: ``device`` on
    #: accelerators, ``host`` on the CPU, where XLA runs the loop's body several times slower
    #: than the same step dispatched alone (benchmarks/RESULTS.md). Same batches and losses.
    epoch_loop: str = "auto"

    # --- evaluation, checkpoints, logging -------------------------------------------------
    eval_every_epochs: int = 1
    threshold: float = 0.5
    log_every_steps: int = 10
    #: Keep this many most recent checkpoints besides the best one.
    keep_latest: int = 1
    #: Also checkpoint every N steps within epochs (0: at epoch ends only).
    checkpoint_every_steps: int = 0
    #: Write the report (figures, report.md) when the run ends (done by ``experiments.run``).
    write_report: bool = True

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (type-checked)."""
        return override(self, changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Stable JSON text (sorted keys) of the config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        return override(cls(), d)


def field_names() -> list[str]:
    """Names of all config fields, sorted."""
    return sorted(f.name for f in dataclasses.fields(Config))


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        return tuple(_coerce(name, args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(f"config key {name!r}: {value!r} is not a boolean")
        return bool(value)
    if tp in (int, float, str):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {name!r} needs {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ValueError(f"config key {name!r} needs an integer, got {value!r}")
        return out
    return value


def override(config: Config, changes: dict[str, Any]) -> Config:
    """Apply ``{key: value}`` changes (values may be strings, as from ``--set key=value``)."""
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(changes) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(field_names())}")
    coerced = {k: _coerce(k, hints[k], v) for k, v in changes.items()}
    return dataclasses.replace(config, **coerced)
