"""``predict``: inputs to volumes, the predictor over them, the outputs into a new folder."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from unet_jax.predict.export import (
    check_output,
    output_errors,
    partial_output,
    write_settings,
    write_table,
    write_volume,
)
from unet_jax.predict.inputs import LoadedVolume, check_volume, discover, read_volume
from unet_jax.predict.predictor import Predictor, load_checkpoint

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


def predict(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    step: int | None = None,
    threshold: float | None = None,
    lcc: bool = True,
    batch_size: int = 16,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Segment ``inputs`` with ``checkpoint`` into the new folder ``output`` (see
    ``python -m unet_jax.predict --help``). Raises :class:`PredictError` for bad input; nothing
    is left at ``output`` (nor half-written beside it) when it fails.

    ``progress``: show a progress bar (default: when stderr is a terminal).
    ``log``: where notices and messages go (default: stderr).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    output = Path(output)
    volumes, notices = discover(inputs)
    out = check_output(output, [Path(p) for p in inputs], volumes)
    for v in volumes:
        check_volume(v)
    model, config, meta = load_checkpoint(checkpoint, step)
    predictor = Predictor(model, config, threshold=threshold, lcc=lcc, batch_size=batch_size)
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
                    rows += write_volume(result, partial)
        seconds = time.perf_counter() - t0
        with output_errors(out):
            write_table(rows, partial / "predictions.csv")
        settings = {
            "checkpoint": str(Path(checkpoint).absolute()),
            "step": meta.get("step"),
            "config": config.to_dict(),
            "threshold": predictor.threshold,
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
