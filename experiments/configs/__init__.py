"""Registry of the experiments: one module per experiment in this package.

Each module has a docstring (command, what it reproduces, expected/measured result) and
``get_config() -> Config``; multi-run experiments (``ablation``, ``cv5``) also have
``get_configs() -> dict[str, Config]`` naming their sub-runs (the sub-run name is also the
sub-folder of the parent workdir).

    >>> from experiments import configs
    >>> configs.get_configs("ablation").keys()
"""

from __future__ import annotations

import importlib
from types import ModuleType

from unet_jax.config import Config

#: Experiment names, in the order they are listed to users.
EXPERIMENTS: tuple[str, ...] = (
    "smoke",
    "cpu_quick",
    "run1",
    "run2",
    "baseline",
    "ablation",
    "cv5",
)


def load(name: str) -> ModuleType:
    """The module of experiment ``name``.

    Raises:
      ValueError: unknown name; the message lists the valid names.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid names: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def is_multi_run(name: str) -> bool:
    """Whether experiment ``name`` consists of several named sub-runs."""
    return hasattr(load(name), "get_configs")


def get_config(name: str) -> Config:
    """The config of a single-run experiment, or the shared base of a multi-run one."""
    return load(name).get_config()


def get_configs(name: str) -> dict[str, Config]:
    """``{sub-run name: Config}``; a single-run experiment gives ``{name: get_config()}``."""
    module = load(name)
    if hasattr(module, "get_configs"):
        return dict(module.get_configs())
    return {name: module.get_config()}
