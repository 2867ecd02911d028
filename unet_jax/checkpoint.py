"""Orbax checkpoints: the model (parameters + BatchNorm statistics), the optimiser state and a
JSON ``meta`` item (step, epoch, PRNG state, metrics and the resolved config).

Layout of a training workdir::

    checkpoints/latest/<step>/{model,opt,meta}   most recent (for resume)
    checkpoints/best/<step>/{model,meta}         best by validation DSC (for use)

The best checkpoint leaves out the optimiser state: nothing resumes from it, and the Adam moments
are two thirds of a checkpoint's bytes, written again at every improvement (on a GPU an epoch's
training takes about as long as writing them).

Two managers rather than one with ``best_fn`` and ``max_to_keep``: a single manager keeping the
"best N" deletes the most recent checkpoint when it is not among the best, which breaks resume.
The best manager still gets ``best_fn``/``best_mode`` so the ranking survives restarts (Orbax
reads saved metrics back from disk).

A model-only checkpoint (``model`` + ``meta``, no ``opt``), as written by
``python -m unet_jax.convert``, has the same layout at its top level, so
:func:`load_model` reads either kind.

Damage: Orbax finalises a checkpoint by renaming its folder, so a kill mid-save leaves no
partial step; a step's files can still be damaged afterwards (a full disk, a partial copy of a
workdir). :meth:`TrainCheckpoints.restore_latest` then falls back to the previous ``latest``
step when one is kept (``keep_latest`` >= 2), moving the damaged one to
``checkpoints/corrupt/``; otherwise, and in :func:`load_model`, a one-line
:class:`CheckpointError` names the damaged folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from unet_jax.config import Config
from unet_jax.model import UNet, abstract_model, load_pure, model_to_pure, named_leaves
from unet_jax.rundir import CHECKPOINTS_DIRNAME

BEST_METRIC = "val_dsc"
FORMAT = "unet_jax.checkpoint/1"
#: Sub-folder of ``checkpoints/`` that receives damaged ``latest`` steps, out of Orbax's way.
CORRUPT_DIRNAME = "corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, not ours, damaged, or does not match the model."""


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of a pytree is finite (no NaN or infinity).

    Leaves may be JAX arrays (sharded ones included: the check runs where they live and only a
    flag per leaf comes back), NumPy arrays or scalars and Python numbers; integer, boolean and
    non-numeric leaves count as finite.
    """
    on_device = []
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                on_device.append(leaf)
        elif isinstance(leaf, (np.ndarray, np.generic)):
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.isfinite(leaf).all():
                return False
        elif isinstance(leaf, (float, complex)) and not np.isfinite(leaf):
            return False
    return not on_device or bool(_finite_flags(on_device).all())


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """One flag per array: all of its values are finite (one program for a whole tree)."""
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _one_line(err: BaseException, limit: int = 250) -> str:
    """``Type: first line of the message`` of the error's root cause (Orbax wraps the
    TensorStore error that says what is wrong), shortened to ``limit`` characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_orbax_noise() -> None:
    """Keep a failed Orbax save or restore to its one error (which reaches the caller).

    When a write or read fails (a damaged checkpoint, a full disk), Orbax's worker thread logs
    the error with its traceback through absl, and the operations still in flight complete later
    on a closed asyncio loop, each printing an "Event loop is closed" traceback through
    ``sys.unraisablehook``; after a failed read, the per-array read coroutines it abandoned
    raise again when the garbage collector closes them, at some later point of the run (measured:
    93 tracebacks of 62 lines for one damaged 4-feature checkpoint). Hundreds of lines around
    the one error that matters. This drops exactly those messages (once per process); every
    other one goes through.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_unet_jax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if _is_orbax_coroutine(unraisable.object):
            return
        previous(unraisable)

    hook._unet_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_drop_orbax_thread_errors)
    logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)
    # ... and the writes a failed save never started, or the reads a failed restore never
    # started, are reported as never awaited when freed.
    warnings.filterwarnings(
        "ignore",
        message="coroutine '(async_serialize_from_host|_read_array_index_and_device_put)",
        category=RuntimeWarning,
    )


def _is_orbax_file(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


def _is_orbax_coroutine(obj: Any) -> bool:
    """Whether ``obj`` is a coroutine of Orbax's own code (one it abandoned when a read failed)."""
    code = getattr(obj, "cr_code", None)
    return code is not None and _is_orbax_file(code.co_filename)


def _drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """asyncio log filter: False for "... exception was never retrieved" of an Orbax write or
    read (the first failure reaches the caller; these are its siblings, reported when the
    collector frees them). Orbax's own: its code in the message or in the exception's traceback,
    or TensorStore's error for Orbax's storage (OCDBT), which the read futures hold bare."""
    message = record.getMessage()
    if "never retrieved" not in message:
        return True
    if "orbax" in message or "in OCDBT database" in message:
        return False
    err = record.exc_info[1] if record.exc_info else None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(
            _is_orbax_file(f.f_code.co_filename) for f, _ in traceback.walk_tb(err.__traceback__)
        ):
            return False
        err = err.__cause__ or err.__context__
    return True


def _drop_orbax_thread_errors(record: logging.LogRecord) -> bool:
    """absl log filter: False for Orbax's report of an exception its worker thread raised (the
    same exception is raised to the caller of the save or restore, which reports it)."""
    return not (
        record.levelno >= logging.ERROR
        and "orbax" in record.pathname
        and "raised an exception" in record.getMessage()
    )


def _drop_orbax_read_only_notes(record: logging.LogRecord) -> bool:
    """absl log filter: False for the warnings Orbax logs whenever a checkpoint is opened
    read-only (as loading one does: "CheckpointManagerOptions.read_only=True, setting ...",
    "Given directory is read only=..."), four per load, and for "Metadata file does not exist"
    when one item of a step is restored on its own (the step's metadata sits a folder up):
    notes, not problems. A restore that does fail raises, and that error is reported."""
    message = record.getMessage()
    return not (
        record.levelno == logging.WARNING
        and "orbax" in record.pathname
        and (
            "read_only=True, setting" in message
            or message.startswith("Given directory is read only")
            or message.startswith("Metadata file does not exist")
        )
    )


# Installed on import: loading a checkpoint opens it read-only before anything else here runs.
logging.getLogger("absl").addFilter(_drop_orbax_read_only_notes)


def _manager(directory: Path, **options) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options)
    return ocp.CheckpointManager(directory, options=opts)


def _best_manager(directory: Path, **options) -> ocp.CheckpointManager:
    """The manager of the best checkpoint, ranked by :data:`BEST_METRIC` (read back from disk)."""
    return _manager(
        directory,
        max_to_keep=1,
        best_fn=lambda m: float(m[BEST_METRIC]),
        best_mode="max",
        **options,
    )


def _meta(step: int, config: Config, extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = {"format": FORMAT, "step": int(step), "config": config.to_dict()}
    meta.update(extra or {})
    return meta


def latest_step(workdir: str | Path) -> int | None:
    """The newest complete ``latest`` step in a training workdir, or None: read from the folder
    names alone (Orbax writes a step under a temporary name and renames it to the bare step
    number when complete), so it opens no manager and writes nothing (a full disk's report)."""
    folder = Path(workdir) / CHECKPOINTS_DIRNAME / "latest"
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit() and p.is_dir()]
    return max(steps, default=None)


class TrainCheckpoints:
    """The ``latest`` and ``best`` checkpoint managers of one training workdir: Orbax storage
    only (what a run saves and when is :class:`unet_jax.run_state.RunState`'s)."""

    def __init__(self, workdir: str | Path, keep_latest: int = 1):
        _quiet_orbax_noise()
        self.root = Path(workdir).absolute() / CHECKPOINTS_DIRNAME
        self.latest = _manager(self.root / "latest", max_to_keep=keep_latest)
        self.best = _best_manager(self.root / "best")
        self._best_metric: float | None = self._read_best_metric()  # then kept by save_best()

    def _read_best_metric(self) -> float | None:
        step = self.best.best_step()
        if step is None:
            return None
        try:
            meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return float(meta["meta"]["metrics"][BEST_METRIC])
        except Exception as err:  # any damage: one line naming the folder
            folder = self.best.directory / str(step)
            raise CheckpointError(
                f"the best checkpoint {folder} is damaged ({_one_line(err)}): delete that "
                "folder to resume without it, or start over with --restart"
            ) from None

    def best_metric(self) -> float | None:
        """The validation DSC of the best checkpoint on disk, if any (a run's best so far is
        :attr:`unet_jax.run_state.RunState.best_metric`: it can be older, on a resume)."""
        return self._best_metric

    def save_latest(
        self, step: int, model_state: dict, optimizer_state: Any, config: Config, meta: dict
    ) -> None:
        """Save as ``latest`` (what a resume restores), unless step ``step`` is there already."""
        if self.latest.latest_step() != step:
            self.latest.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model_state),
                    opt=ocp.args.StandardSave(optimizer_state),
                    meta=ocp.args.JsonSave(_meta(step, config, meta)),
                ),
                force=True,
            )
        self.latest.wait_until_finished()

    def save_best(
        self, step: int, model_state: dict, config: Config, meta: dict, metric: float
    ) -> None:
        """Save as ``best`` (model and meta only) and make ``metric`` the best so far."""
        if self.best.latest_step() != step:
            self.best.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model_state),
                    meta=ocp.args.JsonSave(_meta(step, config, meta)),
                ),
                metrics={BEST_METRIC: float(metric)},
                force=True,
            )
        self.best.wait_until_finished()
        self._best_metric = float(metric)

    def restore_latest(self, model_target: dict, opt_target: Any):
        """``(model_state, optimizer_state, meta)`` of the latest checkpoint, or None if there
        is none (the targets give the structure to restore into).

        A step that cannot be restored (damaged or missing files, non-finite parameters) is
        skipped for the previous kept one: once an earlier step restores, the damaged ones are
        moved to ``checkpoints/corrupt/`` (so that the resumed run saves those steps again)
        and a one-line warning names the damaged folder.

        Raises:
          CheckpointError: no kept step can be restored (one line naming the newest step's
            folder and the way out: --restart).
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None
        damaged: list[int] = []
        first_error = ""
        for step in steps:
            try:
                out = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        model=ocp.args.StandardRestore(model_target),
                        opt=ocp.args.StandardRestore(opt_target),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                if not all_finite(out["model"]):
                    raise ValueError("its parameters hold NaN or infinite values")
            except Exception as err:  # any damage: try the previous step
                first_error = first_error or _one_line(err)
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
                if jax.process_index() == 0:
                    print(
                        f"warning: the latest checkpoint {self._step_dir(steps[0])} cannot be "
                        f"restored ({first_error}); resuming from step {step} instead (damaged "
                        f"step(s) {damaged} moved to {self.root / CORRUPT_DIRNAME})",
                        file=sys.stderr,
                    )
            return out["model"], out["opt"], out["meta"]
        only = "it is the only one kept" if len(steps) == 1 else "no earlier one restores either"
        raise CheckpointError(
            f"the latest checkpoint {self._step_dir(steps[0])} cannot be restored "
            f"({first_error}) and {only}: start over with --restart (deletes the run)"
        )

    def _step_dir(self, step: int) -> Path:
        return Path(self.latest.directory) / str(step)

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged ``latest`` steps to ``checkpoints/corrupt/latest-<step>`` (process 0;
        the others wait), then have the manager forget them."""
        if jax.process_index() == 0:
            corrupt = self.root / CORRUPT_DIRNAME
            corrupt.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = corrupt / f"latest-{step}"
                n = 1
                while target.exists():
                    n += 1
                    target = corrupt / f"latest-{step}-{n}"
                self._step_dir(step).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("unet_jax_checkpoint_set_aside")
        self.latest.reload()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def save_model_checkpoint(
    directory: str | Path,
    model: UNet,
    config: Config,
    extra_meta: dict[str, Any] | None = None,
    step: int = 0,
) -> Path:
    """Write a model-only checkpoint (``model`` + ``meta``) that :func:`load_model` reads."""
    directory = Path(directory).absolute()
    mngr = _manager(directory, max_to_keep=None)
    mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_to_pure(model)),
            meta=ocp.args.JsonSave(_meta(step, config, extra_meta)),
        ),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()
    return directory


def _resolve_checkpoint_dir(path: Path, step: int | None) -> tuple[Path, int]:
    """Find the Orbax manager directory and step for a workdir or a checkpoint directory.

    A ``step`` that is in neither manager is a :class:`CheckpointError` listing the steps that
    are, newest first, each marked ``latest`` and/or ``best`` where it is that (e.g. ``no
    checkpoint for step 999 under RUN (steps: 152 (latest), 133, 114 (best))``).
    """
    root = path / CHECKPOINTS_DIRNAME

    def best_step(directory: Path, steps: list[int]) -> int:
        # Ranked by the metrics the best manager saved; the newest step when it has none.
        mngr = _best_manager(directory, read_only=True)
        best = mngr.best_step()
        mngr.close()
        return best if best is not None else steps[-1]

    candidates = [root / "best", root / "latest", path]
    if step is not None:
        # An explicit step may be in either manager of a workdir.
        candidates = [root / "latest", root / "best", path]
    found: dict[Path, list[int]] = {}
    for directory in candidates:
        if not directory.is_dir():
            continue
        steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        if not steps:
            continue
        found[directory] = steps
        if step is None:
            if directory.name == "best":
                return directory, best_step(directory, steps)
            return directory, steps[-1]
        if step in steps:
            return directory, step
    if step is not None and found:
        marks: dict[int, list[str]] = {s: [] for steps in found.values() for s in steps}
        if root / "latest" in found:
            marks[found[root / "latest"][-1]].append("latest")
        if root / "best" in found:
            marks[best_step(root / "best", found[root / "best"])].append("best")
        listed = ", ".join(
            f"{s} ({', '.join(marks[s])})" if marks[s] else str(s)
            for s in sorted(marks, reverse=True)
        )
        raise CheckpointError(f"no checkpoint for step {step} under {path} (steps: {listed})")
    raise CheckpointError(
        f"{path} holds no unet_jax checkpoint (expected a training workdir with checkpoints/, or a "
        "directory written by `python -m unet_jax.convert`)"
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _check_stored_shapes(label: str | Path, item: Path, config: Config, model: UNet) -> None:
    """Refuse a checkpoint whose config does not build the model its stored arrays belong to,
    comparing Orbax's metadata with the config's model before anything is restored.

    Restoring such a checkpoint fails part-way through Orbax's concurrent reads, and the reads
    still in flight then print tracebacks ("Event loop is closed") until the process exits.
    Metadata that cannot be read is left to the restore, which says why it fails.
    """
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored_tree = checkpointer.metadata(item / "model")
        stored = named_leaves(getattr(stored_tree, "item_metadata", stored_tree))
    except Exception:
        return
    needed = named_leaves(model_to_pure(model))
    problems = [f"{k} missing" for k in needed if k not in stored]
    problems += [f"{k} not in the model" for k in stored if k not in needed]
    problems += [
        f"{k} stored as {_shape(stored[k].shape)}, the config needs {_shape(needed[k].shape)}"
        for k in needed
        if k in stored and tuple(stored[k].shape) != tuple(needed[k].shape)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{label}: the checkpoint's config (in_channels={config.in_channels}, "
            f"out_channels={config.out_channels}, features={config.features}) does not match "
            f"its stored parameters: {problems[0]}{more}"
        )


def load_model(path: str | Path, step: int | None = None) -> tuple[UNet, Config, dict[str, Any]]:
    """Restore ``(model in eval mode, config, meta)`` from a training workdir or a model checkpoint.

    A workdir gives its best checkpoint unless ``step`` names another. A packaged model's name or
    a ``.safetensors`` model file is loaded by :func:`unet_jax.pretrained.load` (no steps).

    Raises:
      CheckpointError: one line for a missing, foreign or damaged checkpoint, or one whose
        config does not build its stored arrays (found from Orbax's metadata, before restoring).
    """
    from unet_jax import pretrained

    if pretrained.is_model_reference(path):
        if step is not None:
            raise CheckpointError(f"{path} is a model file: it has no steps (got step {step})")
        try:
            return pretrained.load(path)
        except pretrained.PretrainedError as e:
            raise CheckpointError(str(e)) from None
    given, path = path, Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    directory, step = _resolve_checkpoint_dir(path, step)
    item = directory / str(step)
    meta_file = item / "meta" / "metadata"
    if not (item / "model").is_dir():
        raise CheckpointError(f"{item} is not a unet_jax checkpoint (no 'model' item)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{item} is not a unet_jax checkpoint: unreadable meta ({e})"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{item} is not a unet_jax checkpoint (format {meta.get('format')!r})"
        )
    try:
        config = Config.from_dict(meta["config"])
    except Exception as e:  # a meta without a valid config
        raise CheckpointError(
            f"{item} is not a unet_jax checkpoint: its meta holds no valid config ({_one_line(e)})"
        ) from None
    model = abstract_model(config)
    _check_stored_shapes(given, item, config, model)
    # Onto this process's first device, whatever the devices and hosts of the run that saved it
    # (Orbax would otherwise restore onto the saved topology, e.g. two hosts' devices).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), model_to_pure(model)
    )
    _quiet_orbax_noise()
    try:
        load_pure(model, ocp.StandardCheckpointer().restore(item / "model", target))
    except Exception as e:  # damaged files or another model: one line
        raise CheckpointError(
            f"the checkpoint {item} cannot be restored, it is damaged or for another model "
            f"({_one_line(e)})"
        ) from None
    model.eval()
    return model, config, meta
