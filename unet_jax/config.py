"""The run configuration: one typed, frozen dataclass.

Every experiment under ``experiments/configs/`` returns a :class:`Config`; the resolved config is
saved as ``config.json`` beside the run and inside every checkpoint, so inference and resume
read the model and preprocessing settings from there instead of from flags.

Every config is validated when it is built (``Config(...)``, :meth:`Config.replace`,
:func:`override`, :meth:`Config.from_dict`): a value that training would refuse later, or that
would run without meaning anything (0 epochs, no resumable checkpoint), raises
:class:`ConfigError` at once, with one line naming the field, its value and what is allowed, so a
run stops before anything is written. The rules are :data:`RULES`.

Some fields are *execution-only* (:func:`execution_fields`, marked in the field's metadata):
changing one does not change what a run computes (to float rounding), only where or how it runs
or what it writes. A run resumes with them changed (``unet_jax.rundir.prepare_workdir``), and
runs that differ in them (and in ``name`` and ``seed``) can train side by side (:func:`packable`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A config value that is not allowed: one line naming the field, its value and what is."""


#: The field-metadata key that marks a field execution-only (:func:`execution_fields`).
EXECUTION = "execution"


def _execution(default: Any) -> Any:
    """A field with ``default`` marked execution-only (:func:`execution_fields`)."""
    return dataclasses.field(default=default, metadata={EXECUTION: True})


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings of a training run. Defaults are the PyTorch baseline's where it has one.

    Fields made with ``_execution(...)`` are execution-only (:func:`execution_fields`); each
    says why. The others change the trained numbers or the run's results, among them: ``name``
    (not a number, but it identifies the run: a different one on a workdir is most likely the
    wrong workdir), ``seed``, the data, split and source settings (the synthetic data is
    generated from ``seed``, ``synthetic_patients``, ``synthetic_slices``), model, optimiser and
    augmentation, ``epochs`` (the schedule and the last step depend on it: a longer run is a new
    run), ``eval_every_epochs`` (which epochs are evaluated decides the best checkpoint and the
    run's result) and ``threshold`` (the metrics, and so the best checkpoint).
    """

    name: str = "default"

    # --- data ---------------------------------------------------------------------------
    #: TFDS builder config: ``baseline`` (the baseline's preprocessing) or ``raw``.
    dataset_config: str = "baseline"
    #: Where the built TFDS data lives (None: TFDS's default, ~/tensorflow_datasets).
    #: Execution-only: where the data lies, not what it is (a run resumes after it moved).
    data_dir: str | None = _execution(None)
    #: Where the Kaggle download is (None: TFDS's manual-dir convention,
    #: <data_dir>/downloads/manual). Execution-only: the data built from it is the same.
    manual_dir: str | None = _execution(None)
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
    #: Execution-only: over the budget, grain streams the same batches from the host (only the
    #: normalisation and augmentation are compiled apart: float rounding).
    device_memory_budget_gb: float | None = _execution(None)

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
    #: than the same step dispatched alone (benchmarks/RESULTS.md). Same batches and losses:
    #: execution-only.
    epoch_loop: str = _execution("auto")
    #: Train runs that differ only in ``seed`` (the seeds of an arm) side by side in one
    #: program: ``experiments.run --seeds`` packs them when this is on (``unet_jax.train``).
    #: Execution-only: a packed run trains as when alone, and resumes alone or packed.
    pack_runs: bool = _execution(False)
    #: How packed runs share the program: ``vmap`` (one batched program: fills an accelerator),
    #: ``unroll`` (the runs' steps one after another in one program: each run as alone, to
    #: float rounding; bitwise on the CPUs measured) or ``auto``: ``vmap`` on accelerators,
    #: ``unroll`` on the CPU. Execution-only (the same runs to float rounding).
    pack_mode: str = _execution("auto")

    # --- evaluation, checkpoints, logging -------------------------------------------------
    eval_every_epochs: int = 1
    threshold: float = 0.5
    #: Log the training loss every N steps. Execution-only: what is written, not trained.
    log_every_steps: int = _execution(10)
    #: Keep this many most recent checkpoints besides the best one: 2, so that a damaged newest
    #: one (a full disk, a partial copy) has a previous one to resume from. Execution-only:
    #: what is kept.
    keep_latest: int = _execution(2)
    #: Also checkpoint every N steps within epochs (0: at epoch ends only). Execution-only: a
    #: resume continues from any step with the same batches.
    checkpoint_every_steps: int = _execution(0)
    #: Write the report (figures, report.md) when the run ends (done by ``experiments.run``).
    #: Execution-only: what is written.
    write_report: bool = _execution(True)

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (coerced as by :func:`override`, then validated)."""
        return override(self, changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Stable JSON text (sorted keys) of the config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; an unknown key or a bad value is a :class:`ConfigError`."""
        return override(cls(), d)


def field_names() -> list[str]:
    """Names of all config fields, sorted."""
    return sorted(f.name for f in dataclasses.fields(Config))


def execution_fields() -> tuple[str, ...]:
    """Names of the execution-only fields, in field order: changing one does not change what a
    run computes (to float rounding), only where or how it runs or what it writes (the data's
    location, how steps are dispatched or packed, what is logged, kept or reported). A run
    resumes with them changed; packed runs may differ in them."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get(EXECUTION))


def packable(configs: list[Config]) -> bool:
    """Whether runs of these configs can train side by side in one program
    (``unet_jax.train.train_runs``): equal but for ``name``, ``seed`` and the execution-only
    fields (the pack executes as the first config says), and not runs of different seeds on
    synthetic data, which is generated from the seed (packed runs share one copy of the data)."""
    ignored = {"name", "seed", *execution_fields()}
    keys = [{k: v for k, v in c.to_dict().items() if k not in ignored} for c in configs]
    if any(k != keys[0] for k in keys[1:]):
        return False
    return not configs or configs[0].source != "synthetic" or len({c.seed for c in configs}) == 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

#: Patients of the LGG data set (kaggle_3m); both data-set configs keep all of them.
LGG_PATIENTS = 110
#: The U-Net's 2x2 max poolings (``unet_jax.model``): the image side must divide by 2**4.
UNET_POOLINGS = 4
#: The synthetic patients' ids are distinct 4-digit numbers (``unet_jax.synthetic``).
MAX_SYNTHETIC_PATIENTS = 9000

#: A rule takes a field's value and the whole config; it returns what is allowed when the value
#: breaks it, else None.
Rule = Callable[[Any, "Config"], "str | None"]


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    why: str = "",
) -> Rule:
    """A finite number (an integer with ``integer``) within the bounds (open or closed)."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
        allowed = f"must be {kind} in {interval}"
    elif low is not None:
        allowed = f"must be {kind} {'>' if low_open else '>='} {_fmt(low)}"
    else:
        allowed = f"must be {kind}"
    if why:
        allowed += f" ({why})"

    def rule(value: float, _: Config) -> str | None:
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        return None if ok else allowed

    return rule


@dataclasses.dataclass(frozen=True)
class _OneOf:
    """A rule: one of ``allowed``; a value in ``refused`` is named with its own reason."""

    allowed: tuple[Any, ...]
    why: str = ""
    refused: tuple[tuple[Any, str], ...] = ()

    def __call__(self, value: Any, _: Config) -> str | None:
        if value in self.allowed:
            return None
        names = ", ".join(repr(a) for a in self.allowed)
        text = f"must be {names}" if len(self.allowed) == 1 else f"must be one of {names}"
        if self.why:
            text += f" ({self.why})"
        reason = dict(self.refused).get(value)
        return f"{text}; {value!r} is refused: {reason}" if reason else text


def _one_of(*allowed: Any, why: str = "", refused: dict[Any, str] | None = None) -> Rule:
    """One of ``allowed`` (``why``: the reason); ``refused``: values with their own reason."""
    return _OneOf(allowed, why, tuple((refused or {}).items()))


def _optional(rule: Rule) -> Rule:
    """``None`` or what ``rule`` allows."""

    def optional(value: Any, config: Config) -> str | None:
        problem = None if value is None else rule(value, config)
        return None if problem is None else f"must be None or {problem.removeprefix('must be ')}"

    return optional


def _non_empty(value: str, _: Config) -> str | None:
    return None if value.strip() else "must be a non-empty string (it names the run)"


def _image_size(value: int, _: Config) -> str | None:
    step = 2**UNET_POOLINGS
    if value >= step and value % step == 0:
        return None
    return (
        f"must be a positive multiple of {step} (the U-Net halves the image {UNET_POOLINGS} "
        "times), e.g. 64, 128 or the stored 256"
    )


def _warmup(value: float, config: Config) -> str | None:
    if value <= config.epochs:
        return None
    return f"must be <= epochs ({config.epochs}): the warm-up cannot be longer than the run"


def _patients(config: Config) -> tuple[int, str]:
    if config.source == "synthetic":
        return config.synthetic_patients, f"synthetic_patients = {config.synthetic_patients}"
    return LGG_PATIENTS, f"the LGG data has {LGG_PATIENTS}"


def _folds_fit(value: int, config: Config) -> str | None:
    n, which = _patients(config)
    if config.split != "fold" or value <= n:
        return None
    return f"must be <= the patients with split='fold' ({which}): each fold validates one or more"


def _fold(value: int, config: Config) -> str | None:
    if 0 <= value < config.num_folds:
        return None
    return f"must be in 0..{config.num_folds - 1} (num_folds = {config.num_folds})"


def _slices(value: tuple[int, ...], config: Config) -> str | None:
    low = 3 if config.dataset_config == "baseline" else 1
    if len(value) == 2 and low <= value[0] <= value[1]:
        return None
    text = f"must be two integers lo,hi with {low} <= lo <= hi (slices per synthetic patient)"
    if low > 1:
        text += "; dataset_config='baseline' drops each volume's first and last slice"
    return text


#: The rules of each field, checked in field order (so a rule may read the fields before it,
#: already checked); fields without rules only have their type checked.
RULES: dict[str, tuple[Rule, ...]] = {
    "name": (_non_empty,),
    "dataset_config": (_one_of("baseline", "raw"),),
    "source": (_one_of("lgg", "synthetic"),),
    "synthetic_patients": (
        _number(
            2,
            MAX_SYNTHETIC_PATIENTS,
            integer=True,
            why="a split needs a training and a validation patient; ids are 4-digit numbers",
        ),
    ),
    "synthetic_slices": (_slices,),
    "image_size": (_image_size,),
    "split": (_one_of("holdout", "fold"),),
    "num_folds": (
        _number(2, integer=True, why="a fold split needs training and validation patients"),
        _folds_fit,
    ),
    "fold": (_fold,),
    "device_memory_budget_gb": (_optional(_number(0.0, low_open=True)),),
    "sampling": (_one_of("weighted", "shuffle"),),
    "aug_scale": (
        _number(
            0.0, 1.0, high_open=True, why="scales are drawn from [1 - aug_scale, 1 + aug_scale]"
        ),
    ),
    "aug_angle": (_number(0.0, why="degrees; angles are drawn from [-aug_angle, aug_angle]"),),
    "aug_flip": (_number(0.0, 1.0, why="a probability"),),
    "in_channels": (
        _one_of(3, why="the slices have 3 channels: pre-contrast, FLAIR, post-contrast"),
    ),
    "out_channels": (_one_of(1, why="one lesion logit: the losses, metrics and predict read one"),),
    "features": (_number(1, integer=True),),
    "dtype": (
        _one_of(
            "float32",
            "bfloat16",
            refused={
                "float16": "the Dice loss's per-pixel gradients (~1e-8 at batch 16 of 256x256) "
                "underflow to 0 in float16 (no loss scaling here); a float16 run trained to "
                "DSC 0.017. bfloat16 is the half-precision option (float32's range)"
            },
        ),
    ),
    "batch_size": (_number(1, integer=True),),
    "epochs": (_number(1, integer=True, why="0 epochs trains nothing"),),
    "learning_rate": (_number(0.0, low_open=True),),
    "weight_decay": (_number(0.0),),
    "schedule": (_one_of("constant", "cosine"),),
    "warmup_epochs": (_number(0.0), _warmup),
    "final_lr_fraction": (
        _number(0.0, 1.0, why="the cosine schedule ends at this times learning_rate"),
    ),
    "grad_clip": (_optional(_number(0.0, low_open=True, why="None turns clipping off")),),
    "loss": (_one_of("dice", "bce_dice"),),
    "seed": (
        _number(
            0,
            2**32 - 1,
            integer=True,
            why="the synthetic data's generator refuses negative seeds; larger ones give the "
            "keys of seed mod 2**32",
        ),
    ),
    "epoch_loop": (_one_of("auto", "device", "host"),),
    "pack_mode": (_one_of("auto", "vmap", "unroll"),),
    "eval_every_epochs": (_number(1, integer=True),),
    "threshold": (_number(0.0, 1.0, low_open=True, high_open=True, why="a probability cut"),),
    "log_every_steps": (_number(1, integer=True),),
    "keep_latest": (
        _number(1, integer=True, why="0 keeps no checkpoint to resume an interrupted run from"),
    ),
    "checkpoint_every_steps": (_number(0, integer=True, why="0: at epoch ends only"),),
}


def _type_problem(tp: Any, value: Any) -> str | None:
    """What the field's declared type allows, when ``value`` is not of it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        problem = _type_problem(inner[0], value)
        return None if problem is None else f"must be None or {problem.removeprefix('must be ')}"
    if origin is tuple:
        ok = isinstance(value, tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        return None if ok else "must be a tuple of integers"
    if tp is bool:
        return None if isinstance(value, bool) else "must be a boolean (true or false)"
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return f"must be {_TYPE_NAMES.get(tp, tp.__name__)}"
    if tp is float:
        return None if isinstance(value, (int, float)) else "must be a number"
    return None if isinstance(value, tp) else f"must be {_TYPE_NAMES.get(tp, tp.__name__)}"


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def validate(config: Config) -> None:
    """Check every field's type, then :data:`RULES` in field order.

    Raises:
      ConfigError: the first value not allowed, as ``config key 'f' = value: what is allowed``.
    """
    hints = _hints()
    fields = [f.name for f in dataclasses.fields(config)]
    for name in fields:
        problem = _type_problem(hints[name], getattr(config, name))
        if problem:
            raise _error(name, getattr(config, name), problem)
    for name in fields:
        for rule in RULES.get(name, ()):
            problem = rule(getattr(config, name), config)
            if problem:
                raise _error(name, getattr(config, name), problem)


def choices(name: str) -> tuple[Any, ...]:
    """The values field ``name`` allows when it is a choice (``loss``, ``dtype``, ...), else ()."""
    return next((r.allowed for r in RULES.get(name, ()) if isinstance(r, _OneOf)), ())


def _error(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config key {name!r} = {value!r}: {allowed}")


# --------------------------------------------------------------------------------------------
# Overrides (as from ``--set key=value``)
# --------------------------------------------------------------------------------------------


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to the field's type.

    Raises:
      ConfigError: the value cannot be read as that type (one line naming the field).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _error(name, value, "must be integers separated by commas, e.g. 16,24")
        return tuple(_coerce(name, args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise _error(name, value, "must be a boolean (true/false, yes/no, 1/0)")
        return bool(value)
    if tp in (int, float, str):
        if tp is not str and isinstance(value, bool):
            raise _error(name, value, f"must be {_TYPE_NAMES[tp]}, not a boolean")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise _error(name, value, f"must be {_TYPE_NAMES[tp]}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise _error(name, value, "must be an integer")
        return out
    return value


def override(config: Config, changes: dict[str, Any]) -> Config:
    """Apply ``{key: value}`` changes (values may be strings, as from ``--set key=value``).

    Raises:
      ConfigError: an unknown key (the valid ones are listed), a value that cannot be read as
        its field's type, or a resulting config that is not valid (:func:`validate`).
    """
    hints = _hints()
    unknown = sorted(set(changes) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; valid keys: {', '.join(field_names())}"
        )
    coerced = {k: _coerce(k, hints[k], v) for k, v in changes.items()}
    return dataclasses.replace(config, **coerced)
