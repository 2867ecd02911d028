"""What a run reports while it trains: the train lines of its log (:class:`StepLosses`, which
also stops a run at its first non-finite loss) and its progress on the terminal or in a log file
(:class:`Progress`: a bar, or plain lines with a heartbeat).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from unet_jax import rundir
from unet_jax.compile_cache import compile_seconds
from unet_jax.config import Config
from unet_jax.run_state import NonFiniteLossError, RunState

if TYPE_CHECKING:
    from unet_jax.train_steps import Trainer

__all__ = ["HEARTBEAT_SECONDS", "Progress", "StepLosses", "progress_mode"]


#: Seconds between heartbeat lines within an epoch when the output is not a terminal (see
#: :class:`Progress`); read when a run checks, so a test can shorten it.
HEARTBEAT_SECONDS = 60.0


def _output_is_terminal() -> bool:
    """Whether stderr, where the progress bar draws, is a terminal."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, OSError, ValueError):  # a replaced or closed stream
        return False


def _duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """What a run shows while it trains (process 0 only).

    ``mode`` ``"bar"`` (the default on a terminal): a tqdm bar on stderr with the loss,
    images/s and ETA. ``"lines"`` (the default when stderr is not a terminal: a log file,
    nohup, a scheduler, CI, a notebook): plain lines on stdout, one per evaluated epoch once
    its evaluation is complete (epoch, step, the epoch's mean training loss, validation DSC, best
    so far, images/s, elapsed time, ETA) and, within epochs, a heartbeat line when none was
    printed for :data:`HEARTBEAT_SECONDS` (on the host loop, where steps go one by one; a
    whole-epoch dispatch is one step for it). ``None``: nothing (tests).

    Rates leave out compile time (JAX's compile events), so the first epoch's images/s and the
    ETA do not count the one-off compilation.
    """

    def __init__(
        self,
        mode: str | None,
        *,
        name: str,
        total: int,
        initial: int,
        steps_per_epoch: int,
        batch_size: int,
        started: float,
    ):
        self.mode, self.name, self.total = mode, name, total
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.started = started  # perf_counter() when the command's training call began
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0
            )
        now, compiled = time.perf_counter(), compile_seconds()
        # This call's training (for the ETA) and the current epoch (for its images/s).
        self.run_start = (now, compiled, initial)
        self.epoch_start = (now, compiled, initial)
        self.last_line = now

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def _rate(self, start: tuple[float, float, int], step: int, now: float) -> float | None:
        """Steps per second since ``start`` (compile time left out), or None before a step."""
        t0, compiled, step0 = start
        seconds = now - t0 - (compile_seconds() - compiled)
        if seconds <= 0:  # compiles on another thread overlapped this one's time
            seconds = now - t0
        return (step - step0) / seconds if step > step0 and seconds > 0 else None

    def _eta(self, step: int, now: float) -> float | None:
        """Seconds left after step ``step`` at this call's pace so far, or None before a step."""
        rate = self._rate(self.run_start, step, now)
        return (self.total - step) / rate if rate else None

    def _timing(self, now: float, eta: float | None) -> str:
        return (
            f"elapsed {_duration(now - self.started)}, ETA {'?' if eta is None else _duration(eta)}"
        )

    def _print(self, text: str) -> None:
        # One write per line: epoch lines come from the epoch-end thread.
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()  # a log file sees each line at once
        self.last_line = time.perf_counter()

    def tick(self, step: int, loss: float | None) -> None:
        """After step ``step`` within an epoch: a heartbeat line when one is due."""
        now = time.perf_counter()
        if self.mode != "lines" or now - self.last_line < HEARTBEAT_SECONDS:
            return
        epochs = -(-self.total // self.steps_per_epoch)
        rate = self._rate(self.epoch_start, step, now)
        images = "?" if rate is None else f"{rate * self.batch_size:.1f}"
        self._print(
            f"{self.name}: epoch {(step - 1) // self.steps_per_epoch + 1}/{epochs} in "
            f"progress, step {step}/{self.total}: train loss "
            f"{'?' if loss is None else f'{loss:.4f}'} (last fetched), {images} images/s, "
            f"{self._timing(now, self._eta(step, now))}"
        )

    def epoch_ended(self, done: int, loss: float | None) -> dict[str, Any]:
        """At an epoch's end (step ``done``, ``loss`` the epoch's mean training loss): the
        numbers of its line (:meth:`evaluated`), taken now: the line comes once the evaluation
        is complete, while the next epoch trains."""
        now = time.perf_counter()
        rate = self._rate(self.epoch_start, done, now)
        self.epoch_start = (now, compile_seconds(), done)
        return {
            "step": done,
            "loss": loss,
            "images_per_s": None if rate is None else rate * self.batch_size,
            "time": now,
            "eta": self._eta(done, now),
        }

    def evaluated(self, ended: dict[str, Any], record: dict[str, Any], best: float | None) -> None:
        """The line of an evaluated epoch (``ended`` from :meth:`epoch_ended`, ``record`` its
        evaluation's log record, ``best`` the best validation DSC so far)."""
        if self.mode != "lines":
            return
        now = time.perf_counter()
        step, epochs = ended["step"], -(-self.total // self.steps_per_epoch)
        loss, images, dsc = ended["loss"], ended["images_per_s"], record.get("val_dsc")
        best_text = "n/a" if best is None else f"{best:.4f}"
        if record.get("best"):
            best_text += " (this epoch)"
        eta = ended["eta"]
        self._print(
            f"{self.name}: epoch {step // self.steps_per_epoch}/{epochs}, step "
            f"{step}/{self.total}: train loss {'?' if loss is None else f'{loss:.4f}'}, val DSC "
            f"{'n/a' if dsc is None else f'{dsc:.4f}'}, best {best_text}, "
            f"{'?' if images is None else f'{images:.1f}'} images/s, "
            f"{self._timing(now, None if eta is None else max(0.0, eta - (now - ended['time'])))}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepLosses:
    """The train steps' outputs not yet fetched from the device.

    Fetching every step would make the host wait for the device each step; instead the outputs
    are collected and fetched together (every ``log_every_steps`` steps and at each epoch's
    end), then logged and checked: the first non-finite loss stops the run.
    """

    def __init__(
        self,
        config: Config,
        trainer: Trainer,
        log: rundir.RunLog,
        progress: Progress,
        saved: RunState,
        workdir: Path,
    ):
        self.config = config
        self.trainer = trainer
        self.log = log
        self.progress = progress
        self.saved = saved
        self.workdir = workdir
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step index, outputs)
        self.first_loss: float | None = None  # this call's first loss (the exploding check)
        self.warned = False
        self.last_loss: float | None = None  # the newest loss fetched (heartbeat lines)
        self.loss_sum, self.loss_count = 0.0, 0  # this epoch's losses fetched so far
        # Start of the throughput window and the steps run since (reset by each flush).
        self.window_start = time.perf_counter()
        self.window_steps = 0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, out: dict[str, jax.Array]) -> None:
        """Record the outputs of step index ``step`` (0-based: the step count before it)."""
        self.pending.append((step, out))
        self.window_steps += 1

    def add_stacked(self, first_step: int, outs: dict[str, jax.Array]) -> None:
        """Record the stacked outputs of :meth:`Trainer.train_steps` from step ``first_step``."""
        num = int(outs["loss"].shape[0])
        self.pending.append((first_step, outs))
        self.window_steps += num

    def logged(self, step: int) -> bool:
        """Whether the loss of step number ``step`` (1-based) gets a train line: every
        ``log_every_steps``-th step, each epoch's last and each ``checkpoint_every_steps``-th.
        Where a run stops (Ctrl-C) adds no line, so a resumed run logs the lines of the
        uninterrupted one."""
        config = self.config
        every = config.checkpoint_every_steps
        return (
            step % config.log_every_steps == 0
            or step % self.trainer.steps_per_epoch == 0
            or bool(every and step % every == 0)
        )

    def epoch_loss(self) -> float | None:
        """The mean training loss of the steps fetched since the last call (an epoch's)."""
        mean = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        return mean

    def flush(self) -> None:
        """Fetch the pending losses, log those of :meth:`logged` steps, and raise
        :class:`NonFiniteLossError` on the first non-finite one. The lines logged do not depend
        on when flushes happen (every few steps, or once per one-dispatch epoch)."""
        if not self.pending:
            return
        steps_per_epoch = self.trainer.steps_per_epoch
        fetched = jax.device_get([out for _, out in self.pending])
        # One (step, outputs) pair per step, whether it was fetched alone or stacked.
        steps, outs = [], []
        for (first, _), out in zip(self.pending, fetched):
            if np.ndim(out["loss"]) == 0:
                steps.append(first)
                outs.append(out)
                continue
            for i in range(len(out["loss"])):
                steps.append(first + i)
                outs.append({k: v[i] for k, v in out.items()})
        now = time.perf_counter()
        images_per_s = (
            self.window_steps * self.config.batch_size / max(now - self.window_start, 1e-9)
        )
        for step, out in zip(steps, outs):
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {step} "
                    f"(epoch {step // steps_per_epoch}); the run stopped without saving it. The "
                    f"last good checkpoint is step {self.saved.latest_step()} in "
                    f"{self.workdir / rundir.CHECKPOINTS_DIRNAME}."
                )
            self.last_loss = loss
            self.loss_sum += loss
            self.loss_count += 1
            if self.first_loss is None:
                self.first_loss = loss
            elif not self.warned and loss > max(100 * self.first_loss, 10.0):
                # Finite but exploding (a Dice loss stays below 1; BCE can grow without bound).
                self.warned = True
                print(
                    f"warning: {self.workdir.name}: training loss {loss:.3g} at step {step + 1} "
                    f"is over 100x the first ({self.first_loss:.3g}): the run is diverging "
                    f"(learning_rate {self.config.learning_rate})",
                    file=sys.stderr,
                )
            if self.logged(step + 1):
                self.log.write(
                    {
                        "type": "train",
                        "step": step + 1,
                        "epoch": (step + 1) / steps_per_epoch,
                        "loss": loss,
                        "grad_norm": float(out["grad_norm"]),
                        "lr": float(self.trainer.schedule(step)),
                        "images_per_s": images_per_s,
                    }
                )
        self.progress.update(
            len(steps), loss=f"{float(outs[-1]['loss']):.4f}", img_s=f"{images_per_s:.1f}"
        )
        self.pending.clear()
        self.window_start, self.window_steps = now, 0


def progress_mode(progress: bool | str | None) -> str | None:
    """``train_runs``'s ``progress`` as a :class:`Progress` mode."""
    if progress is None:
        return "bar" if _output_is_terminal() else "lines"
    if progress in ("bar", "lines"):
        return progress
    if isinstance(progress, bool):
        return "bar" if progress else None
    raise ValueError(f"progress must be None, a bool, 'bar' or 'lines', got {progress!r}")
