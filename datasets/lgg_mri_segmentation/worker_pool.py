"""Reading patients in spawned worker processes for the builder: :class:`PatientPool`.

Why spawn, and why the pool never hangs where spawn cannot re-run the main script: see the
comment above :data:`_POOL_PARENT_ENV`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import kaggle

log = logging.getLogger(__name__)
#: The data set's name (the builder's), which messages start with.
DATASET_NAME = "lgg_mri_segmentation"

# ``tfds build`` imports this package from a temporary sys.path: its workers need it too.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@contextlib.contextmanager
def _spawn_environment() -> Iterator[None]:
    """What spawned workers inherit: one BLAS thread each (the pool is the parallelism), this
    package's parent on sys.path (``tfds build`` imports it from a temporary sys.path), and this
    process's id in ``_POOL_PARENT_ENV`` (see :func:`exit_if_main_rerun_by_worker`)."""
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
# (:func:`exit_if_main_rerun_by_worker`, before the lock). The pool below watches every worker
# (no silent restarts) and falls back when one ends before it has started; one that ends later,
# while reading a patient (killed, out of memory), is an error naming the patient.
_POOL_PARENT_ENV = "LGG_MRI_SEGMENTATION_POOL_PARENT"
_MAIN_RERUN_EXIT = 75
#: Why this process cannot use worker processes, and the fix, once seen (its main script builds at
#: its top level): later builds read in this process without starting workers.
_no_workers_reason: tuple[str, str] | None = None


def exit_if_main_rerun_by_worker() -> None:
    """In a worker process of :class:`PatientPool` that, while starting, re-runs a main script
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


class PatientPool:
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
                        name=f"{DATASET_NAME}-worker-{i}",
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
                f"{DATASET_NAME}: a worker process ended ({how}){patient}; pass num_workers=0 to "
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
            DATASET_NAME,
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
