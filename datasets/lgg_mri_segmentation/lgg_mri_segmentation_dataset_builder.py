"""TFDS builder of the LGG MRI data (``lgg_mri_segmentation``), built without TensorFlow.

Two configs: ``baseline`` (default; the data exactly as the baseline, brain-segmentation-pytorch,
trains on it) and ``raw`` (every slice as downloaded). Splits ``train`` / ``validation`` by patient,
reproducing the baseline's holdout. Examples are stored in (patient_id, slice_index) order.

Build (no TensorFlow needed)::

    python -m datasets.lgg_mri_segmentation --manual_dir M --data_dir D [--config baseline|raw|all]

or from Python :func:`build`; read with ``tfds.data_source("lgg_mri_segmentation/baseline",
data_dir=D, split="train")``. See README.md beside this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unet_jax import lgg
from unet_jax.lgg import CSV_FIELDS, MISSING, SLICE_SIZE, LGGDataError
from unet_jax.synthetic import exclusive_lock

from . import archive, kaggle

log = logging.getLogger(__name__)

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class LggConfig(tfds.core.BuilderConfig):
    """A builder config; ``name`` is ``"baseline"`` or ``"raw"``."""


class _ZlibTensor(tfds.features.Tensor):
    """``tfds.features.Tensor(encoding="zlib")`` that also takes bytes already compressed.

    The worker processes compress the pixels (``zlib.compress(array.tobytes(), ZLIB_LEVEL)``, the
    format Tensor stores and decodes), so the one process that writes the files does not spend
    its time in zlib. On disk and in features.json this *is* a plain ``Tensor``: readers need
    nothing from this module.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)

    def encode_example(self, example_data: Any) -> Any:
        if isinstance(example_data, bytes):
            return example_data
        return super().encode_example(example_data)

    @property
    def _fully_qualified_class_name(self) -> str:
        return f"{tfds.features.Tensor.__module__}.{tfds.features.Tensor.__name__}"


def _features() -> tfds.features.FeaturesDict:
    size = SLICE_SIZE
    features: dict[str, Any] = {
        # uint8 pixels, zlib-compressed (tfds.features.Image would need TensorFlow to encode).
        "image": _ZlibTensor((size, size, 3)),
        "mask": _ZlibTensor((size, size, 1)),
        "channel_mean": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "channel_std": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "patient_id": tfds.features.Text(),
        "slice_index": tfds.features.Scalar(dtype=np.int32),
        "num_slices": tfds.features.Scalar(dtype=np.int32),
        "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        "padding": tfds.features.Tensor(shape=(4,), dtype=np.int32),
    }
    for field in CSV_FIELDS:
        features[field] = tfds.features.Scalar(dtype=np.int32)
    return tfds.features.FeaturesDict(features)


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextlib.contextmanager
def _spawn_environment() -> Iterator[None]:
    """What spawned workers inherit: one BLAS thread each (the pool is the parallelism), this
    package's parent on sys.path (``tfds build`` imports it from a temporary sys.path), and this
    process's id in ``_POOL_PARENT_ENV`` (see :func:`_exit_if_main_rerun_by_worker`)."""
    threads = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved_env = {k: os.environ.get(k) for k in (*threads, _POOL_PARENT_ENV)}
    saved_path = list(sys.path)
    os.environ.update({k: "1" for k in threads})
    os.environ[_POOL_PARENT_ENV] = str(os.getpid())
    if _PACKAGE_PARENT not in sys.path:
        sys.path.append(_PACKAGE_PARENT)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.path[:] = saved_path


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started in the block ignore SIGINT (an ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler): on Ctrl-C only this process gets the
    KeyboardInterrupt and stops the workers, instead of every worker printing a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# Worker processes and the main script.
#
# The workers are started with "spawn" (not fork: the caller may hold threads, of JAX or TFDS, that
# fork would copy broken). A spawned process starts by re-running the parent's main script (as
# ``__mp_main__``), which fails where that script cannot be re-run: one fed on standard input
# (``python - < build.py``: its ``__file__`` is ``<stdin>``, not a file), or one (or a ``-m``
# module) that builds the data set at its top level, without an ``if __name__ == "__main__":``
# guard (each worker would build it again, and wait for the build lock this process holds).
# ``multiprocessing.Pool`` restarted such workers forever: the build hung, silently.
#
# Decision: such a build reads in this process, as with ``num_workers=0`` (the same data set,
# slower), after one logged warning naming the cause and the fix; it never hangs. Falling back
# rather than failing: the workers are only a speed-up, and the user gets the data set at once.
# A main script that cannot be re-run is seen up front (no worker is started). A worker that
# re-runs a main script which builds ends at once, quietly, with ``_MAIN_RERUN_EXIT``
# (:func:`_exit_if_main_rerun_by_worker`, before the lock). The pool below watches every worker
# (no silent restarts) and falls back when one ends before it has started; one that ends later,
# while reading a patient (killed, out of memory), is an error naming the patient.
_POOL_PARENT_ENV = "LGG_MRI_SEGMENTATION_POOL_PARENT"
_MAIN_RERUN_EXIT = 75
#: Why this process cannot use worker processes, and the fix, once seen (its main script builds at
#: its top level): later builds read in this process without starting workers.
_no_workers_reason: tuple[str, str] | None = None


def _exit_if_main_rerun_by_worker() -> None:
    """In a worker process of :class:`_PatientPool` that, while starting, re-runs a main script
    which builds the data set: end it at once, quietly (the pool reads in its parent instead)."""
    if os.environ.get(_POOL_PARENT_ENV) == str(os.getppid()):
        os._exit(_MAIN_RERUN_EXIT)


def _main_rerun_by_spawn() -> tuple[str, str] | None:
    """What a spawned process re-runs as the main script (``multiprocessing.spawn``'s rule):
    ``("module", name)`` where started with ``-m``, ``("script", path)`` where started with a file
    (or standard input: ``<stdin>``, not a file), or None: ``-c``, interactive, a package's
    ``__main__`` (``python -m datasets.lgg_mri_segmentation``), where nothing is re-run."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return None if name == "__main__" or name.endswith(".__main__") else ("module", name)
    path = getattr(main, "__file__", None)
    if path is None:
        return None
    original_dir = getattr(multiprocessing.process, "ORIGINAL_DIR", None) or ""
    return "script", os.path.normpath(os.path.join(original_dir, path))


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


class _RemoteTraceback(Exception):
    """A worker's traceback: the ``__cause__`` of the exception it raised, re-raised here."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}"


def _worker_main(conn: Any) -> None:
    """A worker process: a first message (``None``: started), then for each ``(index, job)``
    received ``(index, examples, None, None)`` or ``(index, None, error, traceback)``, until the
    pipe is closed."""
    conn.send(None)
    while True:
        try:
            index, job = conn.recv()
        except EOFError:
            return
        try:
            reply = (index, kaggle.patient_examples(*job), None, None)
        except Exception as e:
            error: Exception = e
            try:
                pickle.dumps(e)
            except Exception:
                error = RuntimeError(f"{type(e).__name__}: {e}")
            reply = (index, None, error, traceback.format_exc())
        conn.send(reply)


@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: Any  # this process's end of its pipe
    ready: bool = False  # its first message came: it started
    job: int | None = None  # the index of the job it has


class _PatientPool:
    """Runs ``kaggle.patient_examples`` over patients in spawned worker processes; the results
    come in the jobs' order.

    One pool serves both splits (starting workers costs about a second each); it is closed by
    :meth:`close` or when the last split is done. Where the workers cannot start, it reads in this
    process after one warning (see the comment above).
    """

    def __init__(self, num_workers: int):
        self._num_workers = num_workers
        self._workers: list[_Worker] | None = None
        self._in_process = num_workers <= 0

    def map(self, jobs: Sequence[tuple]) -> Iterator[list[dict[str, Any]]]:
        if self._in_process or len(jobs) <= 1 or not self._start():
            for job in jobs:
                yield kaggle.patient_examples(*job)
            return
        results: dict[int, tuple[Any, BaseException | None]] = {}
        done = sent = 0
        window = 2 * self._num_workers  # jobs sent beyond the next result to yield, at most
        try:
            while done < len(jobs):
                if done in results:
                    examples, error = results.pop(done)
                    if error is not None:
                        raise error
                elif self._workers is None:  # fell back: the rest in this process
                    examples = kaggle.patient_examples(*jobs[done])
                else:
                    sent = self._send(jobs, sent, min(len(jobs), done + window))
                    self._receive(jobs, results)
                    continue
                yield examples
                done += 1
        except BaseException:
            self.close()
            raise

    def _start(self) -> bool:
        """Start the workers (if not running); False where they cannot be used (warned)."""
        if self._workers is not None:
            return True
        if _no_workers_reason is not None:
            self._fall_back(*_no_workers_reason)
            return False
        main = _main_rerun_by_spawn()
        if main is not None and main[0] == "script" and not os.path.isfile(main[1]):
            main_file = getattr(sys.modules["__main__"], "__file__", None)
            self._fall_back(
                f"they start by re-running the main script, and {main_file!r} is not a file "
                "(a script fed on standard input?)",
                "run the build from a script file, under `if __name__ == '__main__':`",
            )
            return False
        ctx = multiprocessing.get_context("spawn")
        self._workers = []
        with _spawn_environment(), _sigint_ignored():
            for i in range(self._num_workers):
                conn, child_conn = ctx.Pipe()
                try:
                    process = ctx.Process(
                        target=_worker_main,
                        args=(child_conn,),
                        name=f"{Builder.name}-worker-{i}",
                        daemon=True,
                    )
                    process.start()
                except BaseException:
                    conn.close()
                    self.close()
                    raise
                finally:
                    child_conn.close()
                self._workers.append(_Worker(process, conn))
        return True

    def _send(self, jobs: Sequence[tuple], sent: int, limit: int) -> int:
        """Give idle workers jobs ``sent``, ``sent + 1``, ... below ``limit``; the next to send."""
        for worker in self._workers or ():
            if worker.job is None and sent < limit:
                with contextlib.suppress(OSError):  # a dead worker: _receive sees it end
                    worker.conn.send((sent, jobs[sent]))
                worker.job = sent
                sent += 1
        return sent

    def _receive(self, jobs: Sequence[tuple], results: dict[int, Any]) -> None:
        """Wait for a message from, or the end of, a worker; handle what came."""
        workers = self._workers or []
        ready = set(
            multiprocessing.connection.wait(
                [w.conn for w in workers] + [w.process.sentinel for w in workers]
            )
        )
        for worker in workers:
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # it ended
                    pass
                else:
                    if not worker.ready:
                        worker.ready = True
                    else:
                        index, examples, error, remote_traceback = message
                        if error is not None:
                            error.__cause__ = _RemoteTraceback(remote_traceback)
                        results[index] = (examples, error)
                        worker.job = None
                    continue
            elif worker.process.sentinel not in ready:
                continue
            self._ended(worker, jobs)
            return

    def _ended(self, worker: _Worker, jobs: Sequence[tuple]) -> None:
        """A worker process ended: fall back to this process if it never started, else raise."""
        global _no_workers_reason
        worker.process.join()
        how = _how_it_ended(worker.process.exitcode)
        if worker.ready:
            patient = (
                "" if worker.job is None else f" while reading {jobs[worker.job][1].patient_id}"
            )
            raise RuntimeError(
                f"{Builder.name}: a worker process ended ({how}){patient}; pass num_workers=0 to "
                "read in this process (or fewer workers where memory is short)"
            )
        main = _main_rerun_by_spawn()
        what = f"the main {main[0]} {main[1]}" if main else "the main script"
        if worker.process.exitcode == _MAIN_RERUN_EXIT:
            _no_workers_reason = (
                f"they start by re-running {what}, which builds the data set at its top level",
                f"put the build in {what} under `if __name__ == '__main__':`",
            )
            cause, fix = _no_workers_reason
        else:
            cause = f"a worker process could not start ({how}; see its error above)"
            fix = "fix that error"
            if main:
                cause += f"; they start by re-running {what}"
                fix += f", or put the work of {what} under `if __name__ == '__main__':`"
        self.close()
        self._fall_back(cause, fix)

    def _fall_back(self, cause: str, fix: str) -> None:
        """Read in this process from now on, after one warning."""
        self._in_process = True
        log.warning(
            "%s: reading in this process instead of in %d worker processes: %s; to use them, %s "
            "(num_workers=0 reads in this process without this warning)",
            Builder.name,
            self._num_workers,
            cause,
            fix,
        )

    def close(self) -> None:
        workers, self._workers = self._workers, None
        for worker in workers or ():
            worker.process.terminate()
        for worker in workers or ():
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


class Builder(tfds.core.GeneratorBasedBuilder):
    """The LGG MRI segmentation data (kaggle_3m) as a TFDS dataset; see README.md."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: configs baseline and raw."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = lgg.MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        LggConfig(
            name="baseline",
            description=(
                "The baseline's training data exactly: per volume, first and last slice dropped, "
                "10% threshold, crop, pad to square, resize to 256 (order 2 / nearest), "
                "10th-99th percentile rescaling r in [0, 1], stored as rint(255 r) uint8 with the "
                "per-volume channel mean and std of the unquantised r."
            ),
        ),
        LggConfig(
            name="raw",
            description="Every slice exactly as downloaded (256x256x3 uint8, mask 0/1).",
        ),
    ]
    DEFAULT_CONFIG_NAME = "baseline"

    # Where README.md, CITATIONS.bib and TAGS.txt are. TFDS 4.9.10 infers it from the top-level
    # package name, which finds HuggingFace's `datasets` where that wins the import.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 finds a packaged builder's file through a check that needs the
        # `importlib_resources` backport (undeclared for Python >= 3.9), and by package name
        # (see above); this is what it computes otherwise.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        manual_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Args: num_workers: processes that read and preprocess patients (0: in this process;
        default: the number of CPUs, at most 8); manual_path: where the download is (a folder or
        the zip archive itself; default: the download config's manual_dir); other arguments as
        ``tfds.core.DatasetBuilder``."""
        self._num_workers = _default_workers() if num_workers is None else int(num_workers)
        self._manual_path = None if manual_path is None else os.fspath(manual_path)
        # Its worker processes start on first use, so an unused pool costs nothing.
        self._pool = _PatientPool(self._num_workers)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(),
            supervised_keys=("image", "mask"),
            homepage="https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        _exit_if_main_rerun_by_worker()
        manual_dir = self._manual_path
        if manual_dir is None:
            try:
                manual_dir = dl_manager.manual_dir
            except AssertionError as e:  # TFDS's own check: missing or empty directory
                raise LGGDataError(str(e)) from None
            except NotADirectoryError as e:  # a file: the zip archive itself
                manual_dir = e.filename
        source = archive.open_source(manual_dir)
        log.info("Reading the LGG data from %s", source.describe())
        patients = kaggle.list_patients(source)
        table = kaggle.read_data_csv(source)
        metadata = kaggle.patient_metadata(patients, table, source.describe("data.csv"))
        train_ids, val_ids = lgg.split_patients(p.patient_id for p in patients)
        by_id = {p.patient_id: p for p in patients}
        meta = self.info.metadata
        meta["config"] = self.builder_config.name
        meta["missing_value"] = MISSING
        meta["validation_patients"] = val_ids
        meta["source"] = source.describe()
        meta["patients"] = {}
        # Workers left by an interrupted earlier build; the pool restarts them on first use.
        self._pool.close()
        return {
            split: self._generate_examples(
                split, source, [by_id[i] for i in ids], metadata, last=(split == "validation")
            )
            for split, ids in (("train", train_ids), ("validation", val_ids))
        }

    def _generate_examples(
        self,
        split: str,
        source: archive.Source,
        patients: list[kaggle.PatientFiles],
        metadata: dict[str, dict[str, int]],
        last: bool = False,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config.name
        jobs = [(source, p, config, metadata[p.patient_id]) for p in patients]
        # [patient_id, first example index, number of examples] per patient, in stored order.
        index: list[list[Any]] = []
        self.info.metadata["patients"][split] = index
        start = 0
        pool = self._pool
        try:
            for patient, examples in zip(patients, pool.map(jobs)):
                index.append([patient.patient_id, start, len(examples)])
                start += len(examples)
                for example in examples:
                    # Keys sort as (patient_id, slice_index): with disable_shuffling, TFDS
                    # stores examples sorted by key.
                    yield f"{patient.patient_id}/{int(example['slice_index']):05d}", example
        finally:
            if last:
                pool.close()


def data_error_in(error: BaseException) -> LGGDataError | None:
    """The :class:`LGGDataError` that ``error`` is or was caused by (through ``__cause__`` /
    ``__context__``, e.g. re-raised by TFDS or by a worker pool), or ``None``."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, LGGDataError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


#: The folder TFDS writes a build into before renaming it to ``<version>`` (its
#: ``utils.incomplete_dir``); a killed build leaves it behind.
_INCOMPLETE = re.compile(r"^incomplete\.[A-Za-z0-9]+_\d+\.\d+\.\d+$")


def remove_incomplete_builds(config_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``incomplete.*`` folders that killed builds left in ``config_dir``
    (``<data_dir>/lgg_mri_segmentation/<config>``), printing one line for each.

    Only folders of TFDS's pattern (``incomplete.<6 characters>_<version>``) directly in that
    folder are touched. Call it only while holding the build lock (:func:`build` does), since a
    build in progress elsewhere writes one of them.
    """
    removed = []
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        return removed
    for entry in sorted(config_dir.iterdir()):
        if _INCOMPLETE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            print(f"removed {entry}: left by an interrupted build", file=sys.stderr)
            removed.append(entry)
    return removed


def build(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: str = "baseline",
    *,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> Builder:
    """Build (or reuse) one config of the data set as array_record files, without TensorFlow.

    Builds of one ``data_dir`` and config wait for each other (through an ``flock`` on
    ``data_dir/lgg_mri_segmentation/<config>``); the leftovers of killed builds there are removed
    first (:func:`remove_incomplete_builds`). A build is written aside by TFDS and renamed into
    place when complete, so an interrupted one leaves no partial data set.

    Args:
      manual_dir: where the Kaggle download is: the zip archive itself (e.g. ``archive.zip``), or
        a folder holding the zip, the unpacked archive or a kaggle_3m folder.
      data_dir: TFDS data directory; the result is ``data_dir/lgg_mri_segmentation/<config>/1.0.0``.
      config: ``"baseline"`` or ``"raw"``.
      num_workers: processes for reading/preprocessing (0: none; default: CPUs, at most 8).
      overwrite: rebuild even if the data set is already there.

    Returns:
      The prepared builder; read it with ``builder.as_data_source(split)`` or
      ``tfds.data_source(f"lgg_mri_segmentation/{config}", data_dir=data_dir, split=...)``.

    Raises:
      LGGDataError: bad or missing input (the message names the file).
    """
    # First: in a worker re-running a main script that builds, the parent holds the lock below.
    _exit_if_main_rerun_by_worker()
    if config not in ("baseline", "raw"):
        raise ValueError(f"config must be 'baseline' or 'raw', got {config!r}")
    data_dir = Path(data_dir).expanduser()
    config_dir = data_dir / Builder.name / config
    config_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(config_dir):
        remove_incomplete_builds(config_dir)
        builder = Builder(
            # The constructor's file_format sets info.file_format, which writing and reading use.
            config=config,
            data_dir=os.fspath(data_dir),
            file_format="array_record",
            num_workers=num_workers,
            manual_path=manual_dir,
        )
        mode = (
            tfds.download.GenerateMode.FORCE_REDOWNLOAD
            if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir), download_mode=mode
            ),
        )
    return builder
