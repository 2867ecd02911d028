"""Data sets of this project, as TFDS dataset folders: ``datasets.lgg_mri_segmentation``.

``datasets`` is also the name of HuggingFace's package, common in ML environments. Both work
side by side:

- Where HuggingFace's ``datasets`` wins the import (installed in site-packages, the project
  installed in editable mode, Python started outside the project's root), ``import
  datasets.lgg_mri_segmentation`` still finds this folder through the editable install's finder.
- Where this package wins (Python started in the project's root, e.g. ``python -m
  datasets.lgg_mri_segmentation``), this module makes itself a stand-in for HuggingFace's package
  too: the other package's folder is appended to ``__path__`` (so ``datasets.arrow_dataset`` & co.
  import from there) and its ``__init__`` runs in this namespace the first time a name that is
  not defined here is looked up (``from datasets import load_dataset``). Nothing of it is
  imported unless asked for.

Do not install the project non-editable next to HuggingFace ``datasets``: both would write
``site-packages/datasets/__init__.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _other_datasets_package() -> str | None:
    """Folder of another top-level ``datasets`` package on sys.path (HuggingFace's), if any."""
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.getcwd()), "datasets")
        if os.path.abspath(candidate) == _HERE:
            continue
        if os.path.isfile(os.path.join(candidate, "__init__.py")):
            return candidate
    return None


_OTHER = _other_datasets_package()
_other_state = {"loaded": False, "loading": False}

if _OTHER is not None:
    __path__.append(_OTHER)  # type: ignore[name-defined]  # noqa: F821

    def __getattr__(name: str) -> Any:
        # While the other __init__ runs, its `from . import config` style imports probe
        # attributes of this module: answer "absent" so that the import system loads them.
        if _other_state["loaded"] or _other_state["loading"] or name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        _other_state["loading"] = True
        try:
            init = os.path.join(_OTHER, "__init__.py")
            with open(init, encoding="utf-8") as f:
                code = compile(f.read(), init, "exec")
            exec(code, globals())  # noqa: S102 - the other package's own __init__
            _other_state["loaded"] = True
        finally:
            _other_state["loading"] = False
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
