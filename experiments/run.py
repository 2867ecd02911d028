"""Run an experiment: ``python -m experiments.run --exp=NAME``.

    python -m experiments.run --exp=NAME [--workdir DIR] [--data_dir D] [--manual_dir M]
                              [--set key=value ...] [--seeds S1,S2,..] [--restart]
                              [--distributed]
                              [--compile_cache DIR|none]

Experiments live in ``experiments/configs/`` (one module each; its docstring says what it
reproduces and what we measured). Each run is announced in one line naming the fields that
differ from the experiment's config; the whole resolved config is saved as
``<workdir>/config.json``. Training prints a progress bar on a terminal, else (a log file, a
scheduler) one line per evaluated epoch and a heartbeat line within long epochs. Re-running
the same command resumes an interrupted run; a different config on an existing workdir is
refused unless ``--restart`` is given. Multi-run experiments (``ablation``, ``cv5``) put each
run in ``<workdir>/<run>`` and write a comparison report; their runs share compiled programs
through the persistent compilation cache (on by default, :mod:`unet_jax.compile_cache`).
``--seeds 0,1,2`` repeats every run once per seed (sub-folders ``seed<N>``; the comparison
report shows the seed-to-seed spread of each setting); with ``--set pack_runs=true`` a run's
seeds train side by side in one program (:func:`unet_jax.train.train_runs`; it pays on
accelerators: ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import sys
from pathlib import Path

from experiments import configs
from unet_jax.config import Config, field_names, override, packable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--exp",
        default="smoke",
        help=f"experiment name: {', '.join(configs.EXPERIMENTS)} (default: smoke)",
    )
    parser.add_argument("--workdir", help="output directory (default: runs/<exp>)")
    parser.add_argument("--data_dir", help="TFDS data directory (built data set)")
    parser.add_argument(
        "--manual_dir", help="where the Kaggle download is (zip or kaggle_3m folder)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), e.g. --set epochs=3",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="RUN",
        help="multi-run experiments: run only these sub-runs (repeatable)",
    )
    parser.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="train every (sub-)run once per seed, in <workdir>[/<run>]/seed<S> (the "
        "comparison shows the seed-to-seed spread); with --set pack_runs=true the seeds of a "
        "run train side by side in one program",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="delete an existing run in the workdir instead of resuming it",
    )
    parser.add_argument(
        "--compile_cache",
        metavar="DIR",
        help="persistent XLA compilation cache folder, or 'none' or '' to turn it off (default: "
        "$UNET_JAX_COMPILE_CACHE, else ~/.cache/unet_jax/xla)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host runs; on SLURM, Open MPI, "
        "Kubernetes and Cloud TPU it finds its peers by itself, elsewhere give the next three)",
    )
    parser.add_argument(
        "--coordinator_address", metavar="HOST:PORT", help="with --distributed: process 0's address"
    )
    parser.add_argument("--num_processes", type=int, help="with --distributed: how many processes")
    parser.add_argument("--process_id", type=int, help="with --distributed: this process's index")
    return parser.parse_args(argv)


def resolve(name: str, args: argparse.Namespace) -> dict[str, Config]:
    """The experiment's configs with the command line's overrides applied."""
    changes: dict[str, str] = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(
                f"--set needs KEY=VALUE, got {item!r}; valid keys: {', '.join(field_names())}"
            )
        key, value = item.split("=", 1)
        changes[key.strip()] = value.strip()
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.manual_dir:
        changes["manual_dir"] = args.manual_dir
    runs = configs.get_configs(name)
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            raise ValueError(f"unknown sub-run(s) {unknown} of {name}; valid: {', '.join(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only}
    runs = {k: override(c, changes) for k, c in runs.items()}
    if args.seeds is not None:
        if not args.seeds.strip(" ,"):
            raise ValueError(
                f"--seeds needs at least one integer (e.g. --seeds 0,1,2), got {args.seeds!r}"
            )
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"--seeds needs integers separated by commas, got {args.seeds!r}"
            ) from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds needs distinct integers, got {args.seeds!r}")
        multi = configs.is_multi_run(name)
        runs = {
            f"{k}/seed{s}" if multi else f"seed{s}": c.replace(name=f"{c.name}-seed{s}", seed=s)
            for k, c in runs.items()
            for s in seeds
        }
    return runs


def groups(runs: dict[str, Config]) -> list[list[str]]:
    """The sub-runs in order, those to be packed together (``pack_runs``: runs that differ only
    in their seed, on data that does not depend on the seed: :func:`unet_jax.config.packable`)
    in one group."""
    out: list[list[str]] = []
    for name, config in runs.items():
        last = out[-1] if out else None
        if last and config.pack_runs and packable([*(runs[n] for n in last), config]):
            last.append(name)
        else:
            out.append([name])
    return out


def config_line(exp: str, run_name: str, config: Config, workdir: Path, multi: bool) -> str:
    """The one line that introduces a run: where it goes and the fields in which its config
    differs from the experiment's (``--set``, ``--seeds``, ``--data_dir``, ``--manual_dir``);
    the whole config is in ``<workdir>/config.json``."""
    setting = run_name.rsplit("/seed", 1)[0] if configs.is_multi_run(exp) else exp
    default = configs.get_configs(exp)[setting].to_dict()
    # The name follows the seed; the seed itself is listed.
    changed = [
        f"{k}={json.dumps(v)}"
        for k, v in config.to_dict().items()
        if k != "name" and json.dumps(v) != json.dumps(default.get(k))
    ]
    what = f"with {', '.join(changed)}" if changed else "unchanged"
    label = f"{exp}/{run_name}" if multi else exp
    defined = exp if setting == exp else f"{exp}/{setting}"
    full = workdir / "config.json"
    return f"=== {label} -> {workdir}: the {defined} config {what} (all fields: {full})"


def _write_report(config: Config, workdir: Path) -> None:
    """Write a finished run's report (``config.write_report``; process 0 only)."""
    import jax

    if not config.write_report or jax.process_index() != 0:
        return
    try:
        from unet_jax.report import write_report

        write_report(workdir)
    except Exception as e:  # a figure must not lose a finished run
        print(f"warning: report not written: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = resolve(args.exp, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from unet_jax import compile_cache

    compile_cache.enable(args.compile_cache)
    if args.distributed:
        import jax

        # Cross-process collectives on CPU devices (GPUs use NCCL whatever this says).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )

    from experiments.data import load_run_data
    from unet_jax.train import train_runs

    root = Path(args.workdir or Path("runs") / args.exp)
    multi = configs.is_multi_run(args.exp) or args.seeds is not None
    run_dirs = {name: root / name if multi else root for name in runs}
    grouped = groups(runs)
    if any(c.pack_runs for c in runs.values()) and all(len(g) == 1 for g in grouped):
        print(
            "pack_runs: nothing to pack (only runs that differ in their seed alone pack, and "
            "not on synthetic data, which is generated from the seed)"
        )
    for group in grouped:
        for run_name in group:
            print(config_line(args.exp, run_name, runs[run_name], run_dirs[run_name], multi))
        if len(group) > 1:
            print(f"=== packed: {', '.join(group)} train side by side in one program")
        group_configs = [runs[n] for n in group]
        group_dirs = [run_dirs[n] for n in group]
        try:
            # Built (if needed) and read once the workdirs are prepared; one copy for the group.
            data = functools.partial(load_run_data, group_configs[0], group_dirs[0])
            train_runs(group_configs, group_dirs, restart=args.restart, data=data)
            for config, workdir in zip(group_configs, group_dirs):
                _write_report(config, workdir)
        except KeyboardInterrupt:
            return 130
        except Exception as e:
            return report_failure(e, group_dirs)
    if multi:
        from unet_jax.compare import compare_runs

        try:
            out = compare_runs(root, run_dirs, title=args.exp)
            print(f"comparison: {out}")
        except OSError as e:  # the runs are complete; only their comparison is missing
            print(f"warning: comparison not written: {_one_line(e)}", file=sys.stderr)
    return 0


#: errno values of a write that found no room: a full disk, a quota, a file-size limit.
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_STORAGE_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def _causes(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += list(getattr(e, "exceptions", ()))  # ExceptionGroup


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _latest_steps(workdirs: list[Path]) -> str:
    """What a full disk left safe: each run's newest complete ``latest`` checkpoint."""
    from unet_jax.checkpoint import latest_step

    parts = []
    for w in workdirs:
        step = latest_step(w)
        folder = Path(w) / "checkpoints" / "latest"
        parts.append(f"no checkpoint in {w}" if step is None else f"step {step} in {folder}")
    return "; ".join(parts)


def report_failure(exc: Exception, workdirs: list[Path]) -> int:
    """Print a known failure's one line and return its exit code; re-raise anything else (a
    bug: its traceback is what a report needs)."""
    known = failure(exc, workdirs)
    if known is None:
        raise exc
    print(f"error: {known[0]}", file=sys.stderr)
    return known[1]


def failure(exc: BaseException, workdirs: list[Path]) -> tuple[str, int] | None:
    """The one-line message and exit code for a failure the user can act on (bad input: 2; a
    diverged run or a full disk: 1), or None for anything else (a bug keeps its traceback)."""
    from experiments.data import BadDataError
    from unet_jax.checkpoint import CheckpointError
    from unet_jax.data import DataNotFoundError
    from unet_jax.rundir import RunFolderError
    from unet_jax.train import DivergedError

    for e in _causes(exc):
        text = str(e)
        if (isinstance(e, OSError) and e.errno in _STORAGE_FULL) or any(
            t in text for t in _STORAGE_FULL_TEXT
        ):
            # Orbax/TensorStore errors carry the file and errno only in their text.
            found = re.search(r'(?:Failed writing|local file): "([^"]+)"', text)
            where = getattr(e, "filename", None) or (found and found[1]) or workdirs[0]
            reason = next((t for t in _STORAGE_FULL_TEXT if t in text), None)
            reason = reason or os.strerror(e.errno) if isinstance(e, OSError) else reason
            return (
                f"writing {where} failed: {reason} (the disk or your quota is full): the run "
                f"stopped. Safe: {_latest_steps(workdirs)} (a checkpoint is complete or absent, "
                "never half written). Free space and run the same command again to resume",
                1,
            )
    if isinstance(exc, (DataNotFoundError, BadDataError)):
        return str(exc), 2  # one line naming the file (missing data: then how to download it)
    if isinstance(exc, (RunFolderError, CheckpointError)):
        return _one_line(exc), 2
    if isinstance(exc, DivergedError):
        return _one_line(exc), 1
    if isinstance(exc, (PermissionError, NotADirectoryError, IsADirectoryError)):
        return f"{exc.strerror}: {exc.filename}", 2
    return None


if __name__ == "__main__":
    sys.exit(main())
