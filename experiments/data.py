"""Make sure the TFDS data set a run reads is built: the one place that calls the builder.

``unet_jax.data`` only reads a built data set; this module builds it first when needed, so that
dependencies point one way (``experiments`` -> ``datasets`` -> ``unet_jax``):

* ``source="lgg"``: nothing to do if the data set is built in the configured ``data_dir``;
  otherwise the Kaggle download is looked for in ``config.manual_dir`` (a folder, or the zip
  archive itself) and then in TFDS's manual-dir convention ``<data_dir>/downloads/manual``, and
  built once. With neither, :class:`unet_jax.data.DataNotFoundError` carries the download
  instructions.
* ``source="synthetic"``: the project's seeded phantom data in the kaggle_3m layout, written
  beside the data directory (``<root>/manual``, where ``<root>/tfds`` is the data directory) and
  taken through the same build (the no-download demo). The data is stamped with what generated it
  (``<root>/manual/synthetic.json``: generator version, seed, patients, slices, size): a config
  asking for other data gets it generated afresh (and built again), an unchanged one reuses it.

Interrupted writes never leave data that looks usable: the synthetic folder is written aside and
renamed into place when complete (a killed write is redone by the next run, its leftovers
removed), and TFDS renames a build into place when complete (the builder removes the leftovers of
killed builds). Processes sharing a data directory wait for each other.

Errors: bad data found (or made) while building arrives as :class:`BadDataError`, whatever part
of the build raised it (a worker process, TFDS's machinery); its message names the file or value.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets.lgg_mri_segmentation import build, data_error_in
from unet_jax import fileio, synthetic
from unet_jax.config import Config
from unet_jax.data import (
    DATASET,
    SplitData,
    configured_data_dir,
    is_built,
    load_data,
    not_built_error,
)
from unet_jax.lgg import SLICE_SIZE, LGGDataError

__all__ = [
    "SYNTHETIC_STAMP",
    "BadDataError",
    "ensure_built",
    "load_run_data",
    "manual_dir_candidates",
    "synthetic_params",
    "tfds_progress_bars",
]

#: The stamp of generated data, in its ``manual`` folder: the parameters that generated it.
SYNTHETIC_STAMP = "synthetic.json"


class BadDataError(LGGDataError):
    """The data set could not be built from the data found (or generated): the message names the
    file or the config value. ``experiments.run`` prints it as one line (exit status 2)."""


def manual_dir_candidates(config: Config, data_dir: Path) -> list[Path]:
    """Where the Kaggle download is looked for, in order."""
    out = [Path(config.manual_dir).expanduser()] if config.manual_dir else []
    out.append(data_dir / "downloads" / "manual")
    return out


def synthetic_params(config: Config) -> dict[str, Any]:
    """What the synthetic data of ``config`` is generated from (its stamp)."""
    lo, hi = config.synthetic_slices
    return {
        "generator": synthetic.GENERATOR_VERSION,
        "seed": config.seed,
        "patients": config.synthetic_patients,
        "slices": [lo, hi],
        "size": SLICE_SIZE,
    }


def ensure_built(config: Config, workdir: str | Path) -> Path:
    """Build the TFDS data set ``config`` needs unless it exists; return its ``data_dir``.

    Raises:
      unet_jax.data.DataNotFoundError: real data neither built nor downloaded.
      BadDataError: the download is not the LGG data as expected, or synthetic data would replace
        a folder this project did not write (the message names the file).
    """
    with _data_errors():
        if config.source != "synthetic":
            return _ensure_lgg(config, workdir)
        data_dir = configured_data_dir(config, workdir)
        with _synthetic_lock(data_dir):
            return _ensure_synthetic(config, data_dir)


def load_run_data(config: Config, workdir: str | Path) -> tuple[SplitData, SplitData]:
    """A run's ``(train, validation)``: :func:`ensure_built`, then ``unet_jax.data.load_data``.

    Synthetic data is read while no other process may regenerate it (they share the lock of
    :func:`ensure_built`).
    """
    if config.source != "synthetic":
        return load_data(config, ensure_built(config, workdir))
    with _data_errors():
        data_dir = configured_data_dir(config, workdir)
        with _synthetic_lock(data_dir):
            return load_data(config, _ensure_synthetic(config, data_dir))


# --------------------------------------------------------------------------------------------


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # a replaced or closed stream
        return False


@contextmanager
def tfds_progress_bars() -> Iterator[None]:
    """TFDS's progress bars during a build: shown on a terminal as TFDS shows them, off when
    stderr (where tqdm draws them) is not one (a log file, nohup, a scheduler, CI), where their
    redraws would leave carriage returns and ``ESC[A`` cursor moves in the file. TFDS's global
    switch is set back afterwards."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)  # TFDS has no public getter
    tfds.display_progress_bar(_is_terminal(sys.stderr))
    try:
        yield
    finally:
        tfds.display_progress_bar(before)


@contextmanager
def _data_errors() -> Iterator[None]:
    """Bad data raised anywhere in the block (also as the cause of another error, e.g. re-raised
    by a worker pool or TFDS) as one :class:`BadDataError` with the data error's message."""
    try:
        yield
    except BadDataError:
        raise
    except Exception as e:
        error = data_error_in(e)
        if error is None:
            raise
        raise BadDataError(str(error)) from None


def _ensure_lgg(config: Config, workdir: str | Path) -> Path:
    data_dir = configured_data_dir(config, workdir)
    if is_built(data_dir, config.dataset_config):
        return data_dir
    tried = manual_dir_candidates(config, data_dir)
    for manual in tried:
        # A file is the zip archive itself (as downloaded); the builder checks it.
        if manual.is_file() or (manual.is_dir() and any(manual.iterdir())):
            print(
                f"building {DATASET}/{config.dataset_config} from {manual} into {data_dir} "
                "(once; later runs reuse it)"
            )
            with tfds_progress_bars():
                build(manual, data_dir, config.dataset_config)
            return data_dir
    raise not_built_error(data_dir, config.dataset_config, tried)


@contextmanager
def _synthetic_lock(data_dir: Path) -> Iterator[None]:
    root = data_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    with fileio.exclusive_lock(root):
        yield


def _read_stamp(manual: Path) -> dict[str, Any] | None:
    """The parameters in ``manual``'s stamp; ``None`` without one; ``{}`` if unreadable."""
    path = manual / SYNTHETIC_STAMP
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


#: How the stamp's keys are called in the config (and in messages).
_NAMES = {
    "seed": "seed",
    "patients": "synthetic_patients",
    "slices": "synthetic_slices",
    "size": "size",
    "generator": "generator version",
}


def _describe(params: dict[str, Any], keys: Iterable[str] = _NAMES) -> str:
    """``seed=42, synthetic_patients=12, ...`` for ``keys`` of ``params``."""
    out = []
    for key in keys:
        value = params.get(key)
        if isinstance(value, list):
            value = tuple(value)
        out.append(f"{_NAMES.get(key, key)}={value}")
    return ", ".join(out)


def _ensure_synthetic(config: Config, data_dir: Path) -> Path:
    """The synthetic data of ``config`` generated (unless current) and built in ``data_dir``;
    the caller holds :func:`_synthetic_lock`."""
    params = synthetic_params(config)
    manual = data_dir.parent / "manual"
    builds = data_dir / DATASET
    # Holding the lock: hidden leftovers are those of killed writes, never of a write in progress.
    fileio.remove_leftovers(manual)
    fileio.remove_leftovers(builds)
    found = _read_stamp(manual)
    if found != params or not (manual / "kaggle_3m").is_dir():
        if not manual.exists():
            why = "no synthetic data yet"
        elif found is None:
            if config.data_dir:
                # A folder of the user's: never deleted unless this project wrote it.
                raise BadDataError(
                    f"{manual} holds data this project did not generate (no {SYNTHETIC_STAMP}); "
                    f"synthetic data is written to <data_dir>/manual: pass another --data_dir "
                    f"or delete {manual}"
                )
            why = f"{manual} is incomplete or from an older version (no {SYNTHETIC_STAMP})"
        elif found == params:
            why = f"{manual} is incomplete (no kaggle_3m)"
        else:
            changed = [k for k in _NAMES if found.get(k) != params.get(k)]
            why = f"{manual} holds synthetic data of other parameters ({_describe(found, changed)})"
        print(f"{why}: generating synthetic data ({_describe(params)}) in {manual}")
        # Builds of the old data go first: a build never outlives the data it was made from.
        fileio.remove_atomically(builds)
        tmp = fileio.partial_path(manual)
        tmp.mkdir(parents=True)
        synthetic.write_synthetic_kaggle3m(
            tmp,
            num_patients=params["patients"],
            slices=tuple(params["slices"]),
            size=params["size"],
            seed=params["seed"],
        )
        (tmp / SYNTHETIC_STAMP).write_text(json.dumps(params, indent=1) + "\n")
        fileio.replace_with(manual, tmp)
    if not is_built(data_dir, config.dataset_config):
        with tfds_progress_bars():
            build(manual, data_dir, config.dataset_config)
    return data_dir
