"""Regenerate a run's report from its workdir alone.

    python -m experiments.report --workdir DIR

* ``DIR`` is a run workdir (it holds ``metrics.jsonl``/``config.json``/...): writes
  ``DIR/report/report.md`` and its figures.
* ``DIR`` is a parent of several runs (``ablation``, ``cv5``: ``DIR/<run>/...``): writes each
  run's report and the comparison ``DIR/report/comparison.md``. Runs are shown in the order of the
  experiment's ``get_configs()`` when their names match a registered multi-run experiment, else
  in natural name order.

Whatever is missing (no evaluation yet, no predictions) is listed in the report and printed;
the exit status is 0 when a report was written, 2 when ``DIR`` holds no run at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import configs as registry
from unet_jax import rundata, rundir
from unet_jax.compare import compare_runs
from unet_jax.report import write_run_report


def _registry_order(names: list[str]) -> tuple[str | None, list[str]]:
    """(experiment, ordered names) when ``names`` are sub-runs of one registered experiment."""
    if len(names) < 2:
        return None, names
    for exp in registry.EXPERIMENTS:
        module = registry.load(exp)
        if not hasattr(module, "get_configs"):
            continue
        keys = list(module.get_configs())
        if set(names) <= set(keys):
            return exp, [k for k in keys if k in names]
    return None, names


def regenerate(workdir: Path, title: str | None = None) -> list[Path]:
    """Write the report(s) for ``workdir``; return the markdown files written, print problems.

    Raises:
      FileNotFoundError: ``workdir`` is neither a run workdir nor a parent of any.
    """
    written: list[Path] = []
    if rundata.is_run_dir(workdir):
        run = rundata.load_run(workdir)
        written.append(write_run_report(run))
        for problem in run.problems:
            print(f"note: {problem}")
    runs = rundata.find_runs(workdir)
    if runs:
        experiment, order = _registry_order(list(runs))
        runs = {name: runs[name] for name in order}
        for name, run_dir in runs.items():
            run = rundata.load_run(run_dir)
            written.append(write_run_report(run))
            for problem in run.problems:
                print(f"note: {name}: {problem}")
        written.append(compare_runs(workdir, runs, title or experiment or workdir.name))
    if not written:
        raise FileNotFoundError(
            f"{workdir} holds no run: expected {', '.join(rundir.RUN_FILES)} in it or in its "
            "sub-folders"
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path, help="run or parent workdir")
    parser.add_argument(
        "--title",
        default=None,
        help="title of a comparison (default: the experiment name or folder name)",
    )
    args = parser.parse_args(argv)
    try:
        written = regenerate(args.workdir, args.title)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
