"""The persistent XLA compilation cache: compile a program once, load it in later runs.

A run of the full-size U-Net compiles its train, epoch and evaluation programs for tens of
seconds on a GPU; an experiment of many runs (the ablation's arms, the folds of ``cv5``, seeds)
compiles the same programs again and again, since their shapes agree. JAX's persistent cache
stores each compiled program on disk under a key of the program and the compiler setup, so
every later run with the same shapes loads it instead (on this CPU too).

On by default for ``experiments.run``; the folder is ``$UNET_JAX_COMPILE_CACHE`` if set (and not
empty), else ``$XDG_CACHE_HOME/unet_jax/xla`` (``~/.cache/unet_jax/xla``); ``none`` or an empty
value (``--compile_cache ""``, e.g. an unset ``$VAR``) turns it off.

The cache never stops a run:

* a folder that cannot hold it (a file, a path under a file, a folder we cannot write into, no
  home folder) gives one line on stderr, ``warning: compile cache PATH is not usable (WHY):
  compiling without a cache``, and the run compiles without a cache;
* a damaged entry (one JAX fails to load: a truncated or overwritten file) is deleted when JAX
  reads it, so the program is compiled and written again; instead of JAX's warning per entry,
  one line on stderr at exit says ``warning: compile cache DIR: N damaged entries replaced``.

:func:`compile_seconds` tells how long the process has spent compiling (cached or not), so that
a run's step times can leave it out and its report can say it.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The value of ``--compile_cache`` / ``$UNET_JAX_COMPILE_CACHE`` that turns the cache off.
OFF = "none"

# Damaged entries deleted in this process: (cache folder, entry file) in the order found.
_damaged: list[tuple[Path, Path]] = []


def default_dir() -> str:
    """The cache folder to use when none is given (or :data:`OFF`)."""
    env = os.environ.get("UNET_JAX_COMPILE_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    try:
        base = Path(base).expanduser()
    except RuntimeError:  # "~" and no home folder: enable() says so
        base = Path(base)
    return str(base / "unet_jax" / "xla")


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent cache on in ``directory`` (default :func:`default_dir`); returns the
    folder, or None when ``directory`` is :data:`OFF` or empty, or is not a usable folder (one
    warning line on stderr then). Call before the first compilation."""
    import jax

    directory = default_dir() if directory is None else os.fspath(directory)
    if directory.strip() in ("", OFF):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path = Path(directory).expanduser().absolute()
    except RuntimeError:  # "~" and no home folder
        path, why = Path(directory), "cannot find the home folder"
    else:
        why = _unusable(path)
    if why is not None:
        print(
            f"warning: compile cache {path} is not usable ({why}): compiling without a cache",
            file=sys.stderr,
            flush=True,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Cache everything that took real compile time; tiny helper programs are not worth a
        # file (JAX's default, 1 s, would leave out the small models of the tests and demo).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    _replace_damaged_entries()
    return path


def _reason(err: OSError) -> str:
    text = err.strerror or type(err).__name__
    return text[:1].lower() + text[1:]


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot hold the cache, or None when it can (it is created if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "not a folder"
    except NotADirectoryError:
        file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        return f"{file} is not a folder" if file is not None else "not a folder"
    except OSError as e:
        return f"cannot create it: {_reason(e)}"
    if not path.is_dir():
        return "not a folder"
    try:  # really write: mode bits do not tell (root writes anyway; quotas, odd mounts)
        fd, probe = tempfile.mkstemp(prefix=".unet_jax-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into it: {_reason(e)}"
    if not os.access(path, os.R_OK | os.X_OK):
        return "cannot read it"
    return None


def _replace_damaged_entries() -> None:
    """Make JAX delete an entry it fails to load instead of warning about it on every run.

    JAX (0.10 to 0.12 at least) reads an entry in ``jax._src.compilation_cache.
    get_executable_and_time``; ``jax._src.compiler._cache_read`` turns any error of it into a
    two-line ``UserWarning`` ("Error reading persistent compilation cache entry ...") and
    compiles, but never rewrites the entry (the cache keeps an existing file). Wrapping that
    function, we delete the entry's file instead, so the fresh program is written in its place,
    and count it for one line at exit. Errors JAX is told to raise (and contents verification)
    pass through; where the file cannot be deleted, JAX's own warning stays.
    """
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover - a JAX without the module keeps its own warning
        return
    read = getattr(cc, "get_executable_and_time", None)
    if read is None or getattr(read, "_unet_jax_replaces_damaged", False):
        return

    def get_executable_and_time(cache_key, *args, **kwargs):
        try:
            return read(cache_key, *args, **kwargs)
        except Exception as e:
            import jax

            verification = getattr(cc, "CacheVerificationError", ())
            if (
                isinstance(e, verification)
                or jax.config.jax_raise_persistent_cache_errors
                or not _delete_entry(cc, cache_key)
            ):
                raise
            return None, None

    get_executable_and_time._unet_jax_replaces_damaged = True
    cc.get_executable_and_time = get_executable_and_time
    atexit.register(_report_damaged)


def _delete_entry(cc, cache_key: str) -> bool:
    """Delete the files of entry ``cache_key``; False where there is no such file or it stays."""
    cache = getattr(cc, "_cache", None)
    folder = getattr(cache, "_path", None)
    if folder is None:
        import jax

        folder = jax.config.jax_compilation_cache_dir
    if not folder or "://" in str(folder):
        return False
    folder = Path(str(folder))
    try:
        from jax._src import lru_cache

        suffixes = (lru_cache._CACHE_SUFFIX, lru_cache._ATIME_SUFFIX)
    except (ImportError, AttributeError):  # pragma: no cover
        suffixes = ("-cache", "-atime")
    entry = folder / f"{cache_key}{suffixes[0]}"
    if not entry.is_file():  # the error is not this file's
        return False
    try:
        entry.unlink(missing_ok=True)  # missing: another process was faster
    except OSError:
        return False
    for suffix in suffixes[1:]:
        (folder / f"{cache_key}{suffix}").unlink(missing_ok=True)
    _damaged.append((folder, entry))
    return True


def _report_damaged() -> None:
    """One stderr line per cache folder where damaged entries were deleted in this process."""
    folders: dict[Path, list[Path]] = {}
    for folder, entry in _damaged:
        folders.setdefault(folder, []).append(entry)
    for folder, entries in folders.items():
        n = len(entries)
        written = sum(e.is_file() for e in entries)
        what = f"{n} damaged {'entry' if n == 1 else 'entries'}"
        if written == n:
            line = f"{what} replaced"
        else:  # e.g. compiled faster than the threshold this time
            line = f"{what} removed ({written} written again)"
        print(f"warning: compile cache {folder}: {line}", file=sys.stderr, flush=True)


# JAX's compile-time events, summed over the process from the first call of compile_seconds().
_compile_seconds = [0.0]
_listening = [False]


def _on_duration(name: str, seconds: float, **_: Any) -> None:
    if name.startswith("/jax/core/compile/"):
        _compile_seconds[0] += seconds


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling programs so far (a load
    from the persistent compilation cache counts only its tracing and lowering)."""
    if not _listening[0]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
    return _compile_seconds[0]
