"""Training progress on every console: a Rich bar counted in optimizer steps on a terminal, log lines elsewhere.

`distill train` runs by steps (`max_steps`, `max_epochs=-1`), so Lightning 2.6's `RichProgressBar` labels the bar
"Epoch 0/-2" and counts batches of the current epoch (with gradient accumulation it shows 4/2 after two steps).
`StepProgressBar` shows "Training 120/1000" in optimizer steps over the whole run, resumed runs included.

When stdout is not a terminal (nohup, CI, SLURM) a live bar prints nothing until the end, so `ProgressLog` writes one
log line every N steps or S seconds instead: step/max_steps, loss, learning rate, samples/s, elapsed and ETA (time
spent in validation is excluded from the rates), plus one line of validation metrics after each validation.
`progress_callbacks` picks between them.

NOTE: `StepProgressBar` overrides private methods of Lightning's `RichProgressBar` (`_get_train_description`,
`_update`, `_initialize_train_progress_bar_id`, `_update_metrics`; read in pytorch-lightning 2.6.6). This module is
the only place that touches them, and tests/distill/test_progress.py renders a real bar, so a Lightning change that
breaks them fails there.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar

from distill.logs import current_verbosity

_logger = logging.getLogger(__name__)

__all__ = ["ProgressLog", "StepProgressBar", "format_duration", "progress_callbacks"]


def format_duration(seconds: float) -> str:
    """`75.2` -> `1m15s`, `7260` -> `2h01m`, `4.2` -> `4s` (a duration for a progress line)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    hours, rem = divmod(s, 3600)
    minutes, secs = divmod(rem, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, labelled "Training" and counted in optimizer steps up to `max_steps`."""

    def _get_train_description(self, current_epoch: int) -> str:
        # max_epochs is -1 for step-based runs: Lightning would print "Epoch 0/-2".
        description = "Training"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"  # same width: no flicker
        return description

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total: `max_steps` (whole run), or Lightning's batch count for epoch-based runs."""
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # NOTE: the parent resets the bar to 0 each epoch; a run by steps continues where it is (resume included).
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: torch.Tensor | Mapping[str, object] | None,
        batch: object,
        batch_idx: int,
    ) -> None:
        # Same as the parent, with the optimizer step (not the batch index within the epoch) as the position.
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def _batch_size(batch: object) -> int:
    """Samples in a batch: the leading size of its first tensor (dict, list or tuple batches)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        for item in batch:
            n = _batch_size(item)
            if n:
                return n
    return 0


def _scalar(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().float().item())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class ProgressLog(pl.Callback):
    """One INFO line every `every_n_steps` optimizer steps or `every_seconds` seconds, for consoles without a bar."""

    def __init__(
        self, every_n_steps: int | None = None, every_seconds: float = 60.0, loss_key: str = "train/loss"
    ) -> None:
        """Args:
        every_n_steps: Step interval; None picks `max_steps // 20` (about 20 lines a run, at least every step).
        every_seconds: Also log when this much time passed since the last line (long steps, slow machines).
        loss_key: The logged metric shown as the loss.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.every_seconds, self.loss_key = every_n_steps, every_seconds, loss_key
        self._interval = 1
        self._last_step = self._logged_step = 0
        self._t_last = self._paused = self._pause_start = 0.0
        self._samples = 0
        self._t_start = 0.0
        self._start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        self._interval = self.every_n_steps or max(1, max_steps // 20)
        self._t_start = self._t_last = time.perf_counter()
        self._start_step = self._last_step = self._logged_step = trainer.global_step
        self._samples, self._paused = 0, 0.0
        if trainer.is_global_zero:
            _logger.info(
                "training %s from step %d (a progress line every %d step(s) or %s)",
                f"to step {max_steps}" if max_steps else "",
                trainer.global_step,
                self._interval,
                format_duration(self.every_seconds),
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: torch.Tensor | Mapping[str, object] | None,
        batch: object,
        batch_idx: int,
    ) -> None:
        self._samples += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        now = time.perf_counter()
        done = bool(trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps)
        due = step % self._interval == 0 or now - self._t_last >= self.every_seconds or done
        if due and step != self._logged_step and trainer.is_global_zero:
            _logger.info("%s", self._line(trainer, outputs, now))
            self._logged_step, self._t_last = step, now

    def _line(self, trainer: pl.Trainer, outputs: torch.Tensor | Mapping[str, object] | None, now: float) -> str:
        step, max_steps = trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        elapsed = now - self._t_start
        busy = max(elapsed - self._paused, 1e-9)  # NOTE: rates exclude validation time
        steps_done = step - self._start_step
        parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps else f"step {step}"]
        loss = _scalar(trainer.callback_metrics.get(self.loss_key))
        if loss is None and isinstance(outputs, Mapping):
            loss = _scalar(outputs.get("loss"))
        elif loss is None:
            loss = _scalar(outputs)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts.append(f"{self._samples / busy:.1f} samples/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if max_steps and steps_done > 0:
            parts.append(f"ETA {format_duration((max_steps - step) * busy / steps_done)}")
        return "  ".join(parts)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        seconds = time.perf_counter() - self._pause_start
        self._paused += seconds
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if v is not None)
        if trainer.is_global_zero and shown:
            _logger.info("validation at step %d (%s): %s", trainer.global_step, format_duration(seconds), shown)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            elapsed = time.perf_counter() - self._t_start
            _logger.info(
                "trained %d steps in %s (%.1f samples/s outside validation)",
                trainer.global_step - self._start_step,
                format_duration(elapsed),
                self._samples / max(elapsed - self._paused, 1e-9),
            )


def progress_callbacks(
    enabled: bool = True,
    *,
    stream: TextIO | None = None,
    every_n_steps: int | None = None,
    every_seconds: float = 60.0,
) -> tuple[list[pl.Callback], bool]:
    """The progress callbacks for a `pl.Trainer`, and the `enable_progress_bar` value that goes with them.

    Args:
        enabled: `--trainer.enable_progress_bar`; False gives no bar and no progress lines.
        stream: The console to decide for (default: `sys.stdout`, where Rich draws); a terminal gets the bar.
        every_n_steps: `ProgressLog` step interval (None: about 20 lines a run).
        every_seconds: `ProgressLog` time interval.

    Returns:
        `(callbacks, enable_progress_bar)`: `[StepProgressBar]` and True on a terminal, else `[ProgressLog]` and
        False (Lightning refuses a progress-bar callback with `enable_progress_bar=False`, and `ProgressLog` is
        not one). Under `-q` a terminal gets neither bar nor lines.
    """
    if not enabled:
        return [], False
    console = sys.stdout if stream is None else stream
    if console.isatty():
        if current_verbosity() < 0:
            return [], False
        kwargs = {} if stream is None else {"console_kwargs": {"file": stream}}
        return [StepProgressBar(**kwargs)], True
    return [ProgressLog(every_n_steps=every_n_steps, every_seconds=every_seconds)], False
