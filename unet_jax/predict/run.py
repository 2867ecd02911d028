"""``predict``: inputs to volumes, the predictor over them, the outputs into a new folder."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from unet_jax.overlays import write_legend
from unet_jax.predict.export import (
    FORMATS,
    check_output,
    output_errors,
    partial_output,
    require_nibabel,
    write_settings,
    write_table,
    write_volume,
)
from unet_jax.predict.inputs import (
    LoadedVolume,
    PredictError,
    check_volume,
    discover,
    read_volume,
)
from unet_jax.predict.predictor import Predictor, load_checkpoints

__all__ = ["PredictSummary", "predict"]


@dataclasses.dataclass
class PredictSummary:
    """What :func:`predict` did: the output folder, the CSV rows, notices and timings."""

    output: Path
    rows: list[dict[str, Any]]
    notices: list[str]
    volumes: int
    slices: int
    seconds: float
    device: str


def _steps(
    step: int | None | Sequence[int | None], checkpoints: Sequence[str | os.PathLike]
) -> list[int | None]:
    """One step per checkpoint from ``step``: one value for all, or one each."""
    if step is None or isinstance(step, int):
        return [step] * len(checkpoints)
    steps = list(step)
    if len(steps) == 1:
        return steps * len(checkpoints)
    if len(steps) != len(checkpoints):
        raise PredictError(
            f"{len(steps)} steps given for {len(checkpoints)} checkpoints: give one step for "
            "all, or one per checkpoint (best for a workdir's best)"
        )
    return steps


def _repeated(checkpoints: Sequence[str | os.PathLike], steps: Sequence[int | None]) -> list[str]:
    """Notices for a checkpoint given more than once: it weighs more in the average."""
    counts: dict[tuple[Path, int | None], list[str]] = {}
    for c, s in zip(checkpoints, steps):
        counts.setdefault((Path(c).absolute().resolve(), s), []).append(str(c))
    return [
        f"checkpoint {given[0]}{'' if s is None else f' (step {s})'} given {len(given)} times: "
        f"it weighs {len(given)}/{len(checkpoints)} in the ensemble's average"
        for (_, s), given in counts.items()
        if len(given) > 1
    ]


def predict(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    step: int | None | Sequence[int | None] = None,
    threshold: float | None = None,
    lcc: bool = True,
    tta: bool = False,
    format: str = "png",
    batch_size: int = 16,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Segment ``inputs`` into the new folder ``output`` (see ``python -m unet_jax.predict
    --help``). Raises :class:`PredictError` for bad input; nothing is left at ``output`` (nor
    half-written beside it) when it fails.

    ``checkpoint``: one checkpoint, or several (an ensemble: their probabilities are averaged;
    they must preprocess alike). ``step``: for all of them, or one per checkpoint (None: a
    workdir's best). ``tta``: average each model's probabilities over the image and its
    left-right mirror. ``format``: ``png``, or ``nifti`` (also NIfTI volumes; needs nibabel).
    ``progress``: show a progress bar (default: when stderr is a terminal).
    ``log``: where notices and messages go (default: stderr).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    if format not in FORMATS:
        raise PredictError(f"unknown format {format!r} (expected one of {', '.join(FORMATS)})")
    if format == "nifti":
        require_nibabel()
    checkpoints = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
    if not checkpoints:
        raise PredictError("no checkpoint given")
    steps = _steps(step, checkpoints)
    output = Path(output)
    volumes, notices = discover(inputs)
    out = check_output(output, [Path(p) for p in inputs], volumes)
    for v in volumes:
        check_volume(v)
    models, config, metas = load_checkpoints(checkpoints, steps, threshold)
    predictor = Predictor(
        models, config, threshold=threshold, lcc=lcc, batch_size=batch_size, tta=tta
    )
    notices += _repeated(checkpoints, steps)
    for s in notices:
        log(f"notice: {s}")

    def note(s: str) -> None:
        notices.append(s)
        log(f"notice: {s}")

    total = sum(len(v.slices) for v in volumes)
    t0 = time.perf_counter()
    with partial_output(out) as partial:
        from tqdm import tqdm

        rows: list[dict[str, Any]] = []
        with tqdm(
            total=total,
            unit="slice",
            desc="predict",
            dynamic_ncols=True,
            disable=(not sys.stderr.isatty()) if progress is None else not progress,
        ) as bar:

            def loaded_volumes() -> Iterator[LoadedVolume]:
                for v in volumes:
                    loaded, notes = read_volume(v)
                    for s in notes:
                        note(s)
                    yield loaded

            for result in predictor.predict_volumes(loaded_volumes(), bar.update, note):
                with output_errors(out):
                    rows += write_volume(result, partial, nifti=format == "nifti")
        seconds = time.perf_counter() - t0
        with output_errors(out):
            write_table(rows, partial / "predictions.csv")
            write_legend(partial / "legend.png")
        settings = {
            # Each member's own config (they agree on the preprocessing: see ENSEMBLE_FIELDS).
            "checkpoints": [
                {
                    "path": m.get("file") or str(Path(c).absolute()),
                    **({"model": m["name"], "sha256": m["sha256"]} if "sha256" in m else {}),
                    "step": m.get("step"),
                    "config": m["config"],
                }
                for c, m in zip(checkpoints, metas)
            ],
            "threshold": predictor.threshold,
            "tta": predictor.tta,
            "format": format,
            "lcc": lcc,
            "batch_size": batch_size,
            "device": predictor.device,
            "volumes": len(volumes),
            "slices": total,
            "seconds": seconds,
            "notices": notices,
            "inputs": [str(Path(p).absolute()) for p in inputs],
        }
        with output_errors(out):
            write_settings(settings, partial / "predict.json")
    return PredictSummary(out, rows, notices, len(volumes), total, seconds, predictor.device)
