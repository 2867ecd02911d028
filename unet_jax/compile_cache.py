"""The persistent XLA compilation cache: compile a program once, load it in later runs.

A run of the full-size U-Net compiles its train, epoch and evaluation programs for tens of
seconds on a GPU; an experiment of many runs (the ablation's arms, the folds of ``cv5``, seeds)
compiles the same programs again and again, since their shapes agree. JAX's persistent cache
stores each compiled program on disk under a key of the program and the compiler setup, so
every later run with the same shapes loads it instead (on this CPU too).

On by default for ``experiments.run``; the folder is ``$UNET_JAX_COMPILE_CACHE`` if set, else
``$XDG_CACHE_HOME/unet_jax/xla`` (``~/.cache/unet_jax/xla``); ``none`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The value of ``--compile_cache`` / ``$UNET_JAX_COMPILE_CACHE`` that turns the cache off.
OFF = "none"


def default_dir() -> str:
    """The cache folder to use when none is given (or :data:`OFF`)."""
    env = os.environ.get("UNET_JAX_COMPILE_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base).expanduser() / "unet_jax" / "xla")


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent cache on in ``directory`` (default :func:`default_dir`); returns the
    folder, or None when ``directory`` is :data:`OFF`. Call before the first compilation."""
    import jax

    directory = default_dir() if directory is None else str(directory)
    if directory == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(directory).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Cache everything that took real compile time; tiny helper programs are not worth a
        # file (JAX's default, 1 s, would leave out the small models of the tests and demo).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path
