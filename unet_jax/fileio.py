"""Files written whole or not at all, and a lock on a folder: the helpers every writer of a
data folder shares (the synthetic-data writer, the TFDS builder, ``experiments.data``); and
:func:`os_error_reason`, the one-line reason of a failed write in the writers' error messages.

A write goes to a hidden name beside its target (:func:`partial_path`) and is renamed into
place when complete (:func:`replace_with`); a killed write leaves only hidden leftovers, which
the next writer removes (:func:`remove_leftovers`) while holding :func:`exclusive_lock`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "exclusive_lock",
    "os_error_reason",
    "partial_path",
    "remove_atomically",
    "remove_leftovers",
    "replace_with",
]

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(partial|old)-[0-9]+-[0-9a-f]{8}$")


def os_error_reason(err: OSError) -> str:
    """Why an operating-system call failed, for a one-line message: the system's text and the
    file it names (``No space left on device: /out/a.csv``), else the error's own text, else the
    name of its type (an ``OSError`` raised without arguments)."""
    if err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err) or type(err).__name__


def partial_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` to write it under before :func:`replace_with`
    (``.<name>.partial-<pid>-<random>``)."""
    return path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def replace_with(path: Path, new: Path) -> None:
    """Put the complete ``new`` (a file or folder) in the place of ``path``.

    A folder already at ``path`` is first renamed aside (``.<name>.old-*``), then deleted, so
    that ``path`` never holds a mix of old and new; a kill between the two renames leaves no
    ``path`` and hidden leftovers, which :func:`remove_leftovers` deletes.
    """
    if new.is_dir() and path.is_dir():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        path.rename(old)
        new.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def remove_atomically(path: Path) -> None:
    """Delete the folder (or file) ``path``: renamed aside first, so that a kill never leaves
    part of it in place (the renamed leftover is one that :func:`remove_leftovers` deletes)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    path.rename(old)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the hidden ``.partial-*`` / ``.old-*`` leftovers of killed writes of ``path``.

    Call it only while holding :func:`exclusive_lock` on ``path.parent`` (otherwise a write in
    progress elsewhere may be one of them). Prints one line per leftover; returns them.
    """
    removed = []
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m is None or m["name"] != path.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        print(f"removed {entry}: left by an interrupted write of {path}", file=sys.stderr)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def exclusive_lock(folder: Path | str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (which must exist) for the ``with`` block.

    Other processes taking the lock on the same folder wait (a one-line notice says so); the lock
    goes with its holder, so a killed process never leaves it taken. Without ``fcntl`` (Windows)
    or where the file system refuses locks, the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process writing in {folder} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without locks
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
