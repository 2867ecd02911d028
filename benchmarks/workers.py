"""Where the runners of :mod:`benchmarks.runners` run, and in what order.

Every runner normally lives in its own worker process (:class:`Remote`), so its peak RSS is
attributable to it, PyTorch's DataLoader workers can fork from a process without JAX threads, and
each can have its own XLA flags. Only one worker computes at a time (the others block on their
stdin), so all variants see the same background load; :func:`round_robin` rotates the order every
repetition. :class:`Local` runs a runner in the calling process instead (tests; memory is then not
attributable).

The protocol: the parent starts ``python -m benchmarks.workers --worker SPEC_JSON``; the worker
reads the split from the ``.npy`` cache (:func:`benchmarks.data.save_split`), builds its runner and
answers one JSON line per task line on stdin, until ``{"task": "finish"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.data import load_saved_split, save_split
from benchmarks.machine import REPO, peak_rss_mb, rss_mb
from benchmarks.runners import RUNNERS


def _memory_report(runner, rss0: float, *, attributable: bool) -> dict[str, Any]:
    """End-of-run memory of a runner's process: device peak, peak RSS and its growth over
    ``rss0`` (the RSS before the data was loaded), and the DataLoader workers' largest peak."""
    peak = peak_rss_mb()
    return {
        **runner.memory(),
        "peak_rss_mb": peak,
        "peak_rss_delta_mb": max(0.0, peak - rss0),
        "workers_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
        "attributable": attributable,
    }


class Local:
    """A runner in this process (tests): same interface as :class:`Remote`."""

    def __init__(self, kind: str, split, **kwargs: Any):
        self.rss0 = rss_mb()
        self.runner = RUNNERS[kind](split, **kwargs)
        self.info = {**self.runner.info(), "process": "in-process"}

    def call(self, **task: Any) -> dict[str, Any]:
        return self.runner.run(**task)

    def finish(self) -> dict[str, Any]:
        return _memory_report(self.runner, self.rss0, attributable=False)


class Remote:
    """A runner in its own worker process, driven over stdin/stdout with JSON lines."""

    def __init__(
        self, kind: str, split_dir: str | Path, env: dict[str, str] | None = None, **kwargs: Any
    ):
        spec = {"kind": kind, "split_dir": str(split_dir), "kwargs": kwargs}
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.info = {**self._read(), "process": "subprocess"}

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(
                f"{self.kind} worker exited (rc {rc}) without answering; see its stderr above"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.kind} worker failed: {msg['error']}")
        return msg

    def call(self, **task: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> dict[str, Any]:
        out = self.call(task="finish")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve(spec: dict[str, Any]) -> None:
    """Worker process main loop: build the runner, then answer one task per stdin line."""
    # The protocol owns the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    kind = spec["kind"]
    if kind == "jax":
        import jax  # noqa: F401  (import before measuring the baseline RSS)
    else:
        import torch  # noqa: F401
    from unet_jax import input_pipeline  # noqa: F401

    rss0 = rss_mb()
    try:
        split = load_saved_split(spec["split_dir"])
        runner = RUNNERS[kind](split, **spec["kwargs"])
        del split
        info = {
            **runner.info(),
            "rss_before_data_mb": rss0,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        }
        proto.write(json.dumps(info) + "\n")
    except Exception as e:
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise
    for line in sys.stdin:
        task = json.loads(line)
        if task.get("task") == "finish":
            proto.write(json.dumps(_memory_report(runner, rss0, attributable=True)) + "\n")
            return
        try:
            out = runner.run(**task)
        except Exception as e:
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            raise
        proto.write(json.dumps(out) + "\n")


@contextlib.contextmanager
def started(
    specs: dict[str, tuple[str, dict[str, Any]]],
    split,
    *,
    inprocess: bool,
    env: dict[str, dict[str, str]] | None = None,
    log=print,
):
    """Start one runner per name (``{name: (kind, kwargs)}``), one after another; yield
    ``{name: Local | Remote}``; always stop the worker processes."""
    import tempfile

    handles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="unet_jax_bench_") as tmp:
        if not inprocess:
            save_split(split, tmp)
        try:
            for name, (kind, kwargs) in specs.items():
                t = time.perf_counter()
                if inprocess:
                    handles[name] = Local(kind, split, **kwargs)
                else:
                    handles[name] = Remote(kind, tmp, env=(env or {}).get(name), **kwargs)
                log(
                    f"  ready: {name:<12s} ({time.perf_counter() - t:.1f} s: data, model, "
                    f"compile, warm-up)"
                )
            yield handles
        finally:
            for h in handles.values():
                if isinstance(h, Remote):
                    h.kill()


def round_robin(
    handles: dict[str, Any], tasks: Sequence[tuple[str, dict[str, Any]]], reps: int, log=print
) -> dict[int, list[dict[str, Any]]]:
    """Run every task once per repetition, the order rotated each repetition so no task always
    follows the same one; returns ``{task index: [result per rep]}``. ``tasks`` are
    ``(handle name, call kwargs)``."""
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(tasks))}
    order = list(range(len(tasks)))
    for r in range(reps):
        k = r % len(order)
        for i in order[k:] + order[:k]:
            name, kwargs = tasks[i]
            out = handles[name].call(**kwargs)
            results[i].append(out)
            log(
                f"  rep {r + 1}/{reps} {name:<12s} {kwargs.get('task'):<10s} "
                + " ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("task", "steps"))
                + f"  {out['examples_per_s']:.2f} ex/s"
            )
    return results


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.workers --worker SPEC_JSON``."""
    import argparse

    ap = argparse.ArgumentParser(description="benchmark worker process (internal)")
    ap.add_argument("--worker", required=True)
    args = ap.parse_args(argv)
    _serve(json.loads(args.worker))


if __name__ == "__main__":
    main()
