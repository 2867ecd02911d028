"""The run folder as training writes it: the names of its files, the workdir's preparation and
lock, the log and the writers (reading a run: :mod:`unet_jax.rundata`).

A run's workdir holds:

* ``config.json`` — ``Config.to_dict()`` (written first; a different config there is refused,
  but for its execution-only fields: the file then shows the settings the run now uses);
* ``metrics.jsonl`` — ``{"type": "train", ...}`` lines, one ``{"type": "eval", ...}`` line per
  evaluation and a final ``{"type": "summary", ...}`` line (:class:`RunLog`);
* ``per_patient.csv`` — per-patient validation metrics of the best checkpoint
  (``dsc`` raw, ``dsc_lcc`` after the largest-3D-component step: the headline number);
* ``predictions.npz`` — validation slices of the best checkpoint (``image``, ``truth``, ``pred``
  after threshold and LCC, ``patient``, ``slice_index``);
* ``checkpoints/`` (``unet_jax.checkpoint``), ``tensorboard/`` (optional) and ``report/``
  (``unet_jax.report``);
* ``.lock`` — the advisory lock of the run training in it (:func:`lock_workdir`; it holds that
  process's pid and host).

This module is the only one that spells those names: training writes through it, reports read
through :mod:`unet_jax.rundata`, which takes them from here. It needs no JAX.

Training is strict: a run folder it cannot use raises :class:`RunFolderError`, whose message is
one line naming the file or folder (an unwritable workdir, a damaged ``config.json``, a damaged
line inside ``metrics.jsonl``, a workdir another run holds). What a kill leaves behind is
repaired instead: a torn last line of ``metrics.jsonl`` is cut off when the run resumes.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.config import Config, execution_fields

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "PER_PATIENT_FIELDS",
    "PER_PATIENT_FILE",
    "PREDICTIONS_FILE",
    "PREDICTION_KEYS",
    "REPORT_DIRNAME",
    "RUN_FILES",
    "TENSORBOARD_DIRNAME",
    "ConfigMismatchError",
    "RunFolderError",
    "RunLog",
    "WorkdirLock",
    "WorkdirLockedError",
    "check_writable",
    "lock_workdir",
    "prepare_workdir",
    "repair_metrics_log",
    "write_best",
    "write_per_patient_csv",
    "write_predictions",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PER_PATIENT_FILE = "per_patient.csv"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINTS_DIRNAME = "checkpoints"
TENSORBOARD_DIRNAME = "tensorboard"
#: The advisory lock file of the run training in a workdir (:func:`lock_workdir`).
LOCK_FILE = ".lock"
#: Sub-folder of a workdir that receives the report.
REPORT_DIRNAME = "report"
#: Files whose presence marks a folder as a run workdir.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, PER_PATIENT_FILE, PREDICTIONS_FILE)

#: Columns of ``per_patient.csv``, in order. ``hd95_lcc`` (95th-percentile Hausdorff distance,
#: voxel units, ``nan`` when exactly one of prediction and truth is empty), ``avd_lcc``
#: (absolute volume difference, voxels) and ``ravd_lcc`` (``avd_lcc`` / true voxels, ``nan``
#: for an empty truth) are of the prediction after the largest component
#: (:func:`unet_jax.metrics.volume_metrics`); files of older runs lack them (read as NaN).
PER_PATIENT_FIELDS = [
    "patient",
    "slices",
    "dsc",
    "dsc_lcc",
    "hd95_lcc",
    "avd_lcc",
    "ravd_lcc",
    "accuracy",
    "precision",
    "recall",
    "true_pixels",
    "pred_pixels",
    "dice_loss",
]
#: Columns read back from ``per_patient.csv`` as integers / floats (the rest is text or ignored).
INT_COLUMNS = ("slices", "true_pixels", "pred_pixels", "avd_lcc")
FLOAT_COLUMNS = ("dsc", "dsc_lcc", "hd95_lcc", "ravd_lcc", "accuracy", "precision", "recall")
#: Arrays of ``predictions.npz``.
PREDICTION_KEYS = ("image", "truth", "pred", "patient", "slice_index")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class RunFolderError(Exception):
    """A run folder training cannot use as it is: unwritable, a damaged ``config.json`` or
    ``metrics.jsonl``, or held by another run. The message is one line naming the file or
    folder and what to do."""


class ConfigMismatchError(RunFolderError, ValueError):
    """The workdir holds a run with a different config."""


class WorkdirLockedError(RunFolderError):
    """Another process trains in the workdir (it holds the workdir's lock)."""


def _reason(err: OSError) -> str:
    """An OS error's reason in a few words (``Permission denied``), without the path."""
    return err.strerror or type(err).__name__


def check_writable(workdir: Path) -> None:
    """Create ``workdir`` if needed and check that files can be created in it (a temporary file
    is created and removed), before anything of a run is written there.

    Raises:
      RunFolderError: the folder cannot be created or is not writable (read-only, no
        permission, a file in the way).
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(
            f"cannot create the workdir {workdir} ({_reason(err)}): choose another --workdir"
        ) from None
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise RunFolderError(
            f"the workdir {workdir} is not writable ({_reason(err)}): make it writable or "
            "choose another --workdir"
        ) from None


def unwritable_reason(out: Path) -> str | None:
    """Why ``out`` (a folder to be created beside its final place and renamed into it) cannot be
    written, or None: its nearest existing ancestor must be a folder we may write in."""
    ancestor = Path(out).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write in {ancestor} (permission denied)"
    return None


def _read_config_file(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict; a one-line :class:`RunFolderError` for anything else."""
    fix = "fix or delete it, or start over with --restart (which deletes the run)"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RunFolderError(f"cannot read {path} ({_reason(err)})") from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path} is not UTF-8 text: {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFolderError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): {fix}"
        ) from None
    if not isinstance(data, dict):
        raise RunFolderError(
            f"{path} holds a JSON {type(data).__name__}, not an object of config fields: {fix}"
        )
    return data


def prepare_workdir(
    config: Config, workdir: Path, restart: bool, *, write_config: bool = True
) -> None:
    """Create the workdir, or check that an existing run there has the same config and repair
    what a kill left in its log.

    Checks, before anything is written: the workdir can be created and written to, and an
    existing ``config.json`` is a JSON object equal to ``config`` but for the execution-only
    fields (:func:`unet_jax.config.execution_fields`: the data moved, another ``epoch_loop``,
    ``log_every_steps``, ``write_report``, packing, ...). Then, on a resume, a torn last line of
    ``metrics.jsonl`` (a kill mid-write) is cut off with a one-line notice
    (:func:`repair_metrics_log`), and ``config.json`` is rewritten with ``config``: it shows the
    settings the run now uses (each checkpoint keeps the config it was saved with).

    Args:
      restart: delete the run files of an existing run (whatever its config, readable or not)
        instead.
      write_config: write ``config.json`` and repair the log (only one process of a multi-host
        run does).

    Raises:
      ConfigMismatchError: the workdir holds a run with another config and ``restart`` is off.
      RunFolderError: the workdir is not writable, its ``config.json`` is not a JSON object, or
        a line other than the last of its ``metrics.jsonl`` is damaged (one line naming it).
    """
    check_writable(workdir)
    cfg_file = workdir / CONFIG_FILE
    if cfg_file.exists() and not restart:
        old = _read_config_file(cfg_file)
        new = json.loads(config.to_json())
        # Where and how the run executes, not what it trains: a run resumes after its data
        # moved, packed runs resume alone and back.
        for key in execution_fields():
            old.pop(key, None)
            new.pop(key, None)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config (differs in: {diff}). "
                "Use another --workdir, or restart from scratch (--restart), which deletes it."
            )
    if restart:
        for name in (
            CHECKPOINTS_DIRNAME,
            METRICS_FILE,
            TENSORBOARD_DIRNAME,
            REPORT_DIRNAME,
            PER_PATIENT_FILE,
            PREDICTIONS_FILE,
        ):
            p = workdir / name
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            except OSError as err:
                raise RunFolderError(
                    f"--restart cannot delete {p} ({_reason(err)}): delete it by hand"
                ) from None
    elif write_config:
        notice = repair_metrics_log(workdir / METRICS_FILE)
        if notice:
            print(notice, file=sys.stderr)
    if write_config:
        tmp = cfg_file.with_suffix(".tmp")
        tmp.write_text(config.to_json() + "\n")
        tmp.replace(cfg_file)


# --------------------------------------------------------------------------------------------
# The workdir lock
# --------------------------------------------------------------------------------------------


class WorkdirLock:
    """The lock of one workdir, held by this process until :meth:`release` (or the end of a
    ``with`` block, or the process: the OS drops it when the process dies, even by kill -9).

    Nested locks of one workdir within one process share the lock (a run that trains its
    packed runs one by one locks again what it holds); the last release drops it.
    """

    def __init__(self, path: Path | None, fd: int | None = None, key: str = ""):
        #: The lock file (None for a disabled lock).
        self.path = path
        self._key = key
        self._held = fd is not None

    def release(self) -> None:
        """Drop this hold of the lock (idempotent)."""
        if not self._held:
            return
        self._held = False
        with _HELD_GUARD:
            fd, count = _HELD[self._key]
            if count > 1:
                _HELD[self._key] = (fd, count - 1)
                return
            del _HELD[self._key]
        try:
            os.ftruncate(fd, 0)  # no stale pid for a reader; the file stays (see lock_workdir)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: Lock files this process holds: path -> (file descriptor, number of holds).
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    """Who holds a lock, as its file says (``pid 123 on host``)."""
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if not text:
        return "pid unknown"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


def lock_workdir(workdir: str | Path, *, enabled: bool = True) -> WorkdirLock:
    """Lock ``workdir`` for one training process: ``with lock_workdir(workdir): ...``.

    An exclusive ``fcntl.flock`` on ``<workdir>/.lock`` (created if needed, with the workdir),
    which holds the holder's pid and host. It is advisory and belongs to the open file: the
    OS releases it when the process ends, however it ends, so a killed run never leaves a
    stale lock. The file itself is never deleted (deleting a lock file races with the next
    run's lock).

    Args:
      enabled: ``False`` gives a lock that holds nothing (the other processes of a
        multi-host run: process 0 holds the shared workdir's lock).

    Raises:
      WorkdirLockedError: another process holds the lock (the message names the workdir and
        the holder's pid).
      RunFolderError: the workdir cannot be created or written to.
    """
    if not enabled:
        return WorkdirLock(None)
    workdir = Path(workdir).absolute()
    check_writable(workdir)
    path = workdir / LOCK_FILE
    key = str(path.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            fd, count = _HELD[key]
            _HELD[key] = (fd, count + 1)
            return WorkdirLock(path, fd, key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        except OSError as err:
            raise RunFolderError(f"cannot open the lock file {path} ({_reason(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd) if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else ""
            os.close(fd)
            if holder:
                raise WorkdirLockedError(
                    f"{workdir} is in use by another training run ({holder} holds its "
                    f"{LOCK_FILE}): wait for it to end or stop it, or use another --workdir"
                ) from None
            # A file system without locks (some network mounts): train unlocked, say so.
            print(
                f"warning: cannot lock {path} ({_reason(err)}); make sure no other run uses "
                f"{workdir}",
                file=sys.stderr,
            )
            return WorkdirLock(None)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds; only the holder's name is missing
        _HELD[key] = (fd, 1)
        return WorkdirLock(path, fd, key)


# --------------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------------


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A log line's record, or None when it is not a JSON object."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _log_lines(path: Path) -> list[tuple[int, int, bytes, dict[str, Any] | None]]:
    """``(line number, byte offset, text, record or None)`` of every non-blank line."""
    data = path.read_bytes()
    lines = []
    offset = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            lines.append((number, offset, line, _parse_record(line)))
        offset += len(line) + 1
    return lines


def _damaged_line_error(path: Path, number: int) -> RunFolderError:
    return RunFolderError(
        f"{path}, line {number}: not a JSON object (a damaged log): delete or fix that line, "
        "or start over with --restart (which deletes the run)"
    )


def repair_metrics_log(path: Path) -> str | None:
    """Make ``metrics.jsonl`` fit to append to, as a resume needs: cut off a torn last line
    (what a kill mid-write leaves), end the last line with its newline. Returns a one-line
    notice of the repair, or None when there was nothing to cut.

    Raises:
      RunFolderError: a damaged line that is not the last (naming the file and line number).
    """
    if not path.is_file():
        return None
    lines = _log_lines(path)
    for i, (number, _, _, record) in enumerate(lines):
        if record is None and i != len(lines) - 1:
            raise _damaged_line_error(path, number)
    if not lines:
        return None
    number, offset, text, record = lines[-1]
    if record is None:
        with open(path, "r+b") as f:
            f.truncate(offset)
        return (
            f"note: {path}: cut off a torn last line (line {number}, {len(text)} bytes of an "
            "interrupted write)"
        )
    end = offset + len(text)
    with open(path, "r+b") as f:
        f.seek(end)
        if f.read(1) != b"\n":
            f.seek(end)
            f.write(b"\n")
            f.truncate()
    return None


class RunLog:
    """``metrics.jsonl`` (+ optional TensorBoard via tensorboardX); writes only when enabled
    (on process 0 of a multi-host run)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.path = workdir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional, TF-free

                self.tb = SummaryWriter(str(workdir / TENSORBOARD_DIRNAME))
            except ImportError:
                pass

    def _records(self) -> list[tuple[bytes, dict[str, Any]]]:
        """The log's lines and records (a damaged line raises :class:`RunFolderError`)."""
        out = []
        for number, _, text, record in _log_lines(self.path):
            if record is None:
                raise _damaged_line_error(self.path, number)
            out.append((text, record))
        return out

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step``: a killed run may have logged past the checkpoint
        a resume starts from. ``step`` 0 (a run starting over without a checkpoint, e.g. one
        killed before its first) empties the log. Atomic: a kill leaves the old or new log."""
        if not (self.enabled and self.path.exists()):
            return
        records = self._records()
        if step <= 0:
            keep = []
        else:
            keep = [text for text, record in records if record.get("step", 0) <= step]
        if len(keep) == len(records):
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(text + b"\n" for text in keep))
        tmp.replace(self.path)

    def has(self, kind: str, step: int) -> bool:
        """Whether a record of type ``kind`` at ``step`` is in the log."""
        if not (self.enabled and self.path.exists()):
            return False
        return any(
            record.get("type") == kind and record.get("step") == step
            for _, record in self._records()
        )

    def last(self, kind: str) -> dict[str, Any] | None:
        """The last record of type ``kind`` in the log, if any."""
        if not (self.enabled and self.path.exists()):
            return None
        found = [record for _, record in self._records() if record.get("type") == kind]
        return found[-1] if found else None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it carries its ``type``: train, eval or summary)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_per_patient_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write the per-patient table (one row per volume; floats with 6 decimals)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_PATIENT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def write_predictions(path: str | Path, predictions: Mapping[str, np.ndarray]) -> None:
    """Write ``predictions.npz`` from arrays named :data:`PREDICTION_KEYS` (compressed)."""
    path = Path(path)
    missing = [k for k in PREDICTION_KEYS if k not in predictions]
    if missing:
        raise ValueError(f"predictions lack array(s) {missing}")
    # The temporary name must end in .npz, or numpy appends it.
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **{k: predictions[k] for k in PREDICTION_KEYS})
    tmp.replace(path)


def write_best(
    workdir: Path,
    rows: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, np.ndarray],
) -> None:
    """Write the best evaluation's ``per_patient.csv`` and ``predictions.npz``."""
    write_per_patient_csv(rows, workdir / PER_PATIENT_FILE)
    write_predictions(workdir / PREDICTIONS_FILE, predictions)
