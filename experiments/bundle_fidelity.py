"""Compare runs on the lossless data with runs on the travel bundle (see bundle_fidelity.sh).

    python -m experiments.bundle_fidelity RUNS_DIR SEED [SEED ...]

``RUNS_DIR`` holds ``lossless_seed<S>`` and ``bundle_seed<S>`` run folders. Prints a markdown
table: per seed, the best-epoch mean per-patient DSC (after the largest component) on each copy
and their difference; then the differences between seeds on the same copy (the seed noise the
bundle's effect is to be read against) and the per-patient differences of the same seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from unet_jax.rundata import load_run


def _best(workdir: Path) -> tuple[float, dict[str, float]]:
    run = load_run(workdir, predictions=False)
    per_patient = {r["patient"]: float(r["dsc_lcc"]) for r in run.per_patient}
    return float(np.mean(list(per_patient.values()))), per_patient


def compare(runs_dir: Path, seeds: list[str]) -> str:
    """The markdown report of the comparison."""
    best = {(d, s): _best(runs_dir / f"{d}_seed{s}") for d in ("lossless", "bundle") for s in seeds}
    lines = [
        "| seed | lossless DSC | bundle DSC | bundle - lossless |",
        "|---|---:|---:|---:|",
    ]
    for s in seeds:
        a, b = best["lossless", s][0], best["bundle", s][0]
        lines.append(f"| {s} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    if len(seeds) > 1:
        lines.append("")
        for d in ("lossless", "bundle"):
            values = [best[d, s][0] for s in seeds]
            lines.append(
                f"seed noise on {d}: {', '.join(f'{v:.4f}' for v in values)} "
                f"(range {max(values) - min(values):.4f})"
            )
    lines.append("")
    for s in seeds:
        a, b = best["lossless", s][1], best["bundle", s][1]
        diffs = {p: b[p] - a[p] for p in a if p in b}
        worst = max(diffs, key=lambda p: abs(diffs[p]))
        lines.append(
            f"seed {s}: per-patient |bundle - lossless| mean "
            f"{np.mean(np.abs(list(diffs.values()))):.4f}, largest {diffs[worst]:+.4f} ({worst})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(compare(Path(args[0]), args[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
