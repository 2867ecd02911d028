"""Facts about the machine and the process a benchmark ran on, and the summaries of its timings.

Every benchmark prints :func:`format_machine` above its table and stores :func:`machine_info`
(taken before and after the run) with its results, so a number can be read against the load,
cores and library versions it was measured under.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The repository root: worker processes and sub-benchmarks run from it.
REPO = Path(__file__).resolve().parent.parent


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (in measurement order)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def fmt_summary(s: dict[str, Any] | None, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`summarize` dict, or ``-``."""
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def rss_mb() -> float:
    """Current resident set size of this process in MiB (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS in MiB (``ru_maxrss`` is KiB on Linux). For ``RUSAGE_CHILDREN``: the largest
    waited-for child's peak."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (plus the AVX-512/AMX features that matter for bf16)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    for line in text.splitlines():
        if line.startswith("model name") and name in ("unknown", platform.processor()):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} [{', '.join(extras)}]" if extras else name


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Date, CPU model, core counts, memory, load average and library versions."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": round(mem, 1) if mem else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "scikit-image")
        },
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def format_machine(info: dict[str, Any]) -> str:
    """One line describing the machine, for the top of a printed table."""
    v = info["versions"]
    return (
        f"{info['date']}; {info['cpu']}, {info['cores_usable']} usable cores "
        f"(cpu_count {info['cpu_count']}), {info['mem_total_gib']} GiB; load avg "
        f"{info['loadavg']}; python {info['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
        f"flax {v['flax']}, torch {v['torch']}, scikit-image {v['scikit-image']}, "
        f"numpy {v['numpy']}"
    )
