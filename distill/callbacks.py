"""Lightning callbacks: throughput, an EMA of the student's weights, checkpoint on interrupt, TinyCLIP L0 pruning.

`SignalCheckpoint` makes SIGTERM and a first Ctrl-C stop at the next step boundary and save `last.ckpt`, and
does SLURM's requeue (`hpc_ckpt_N.ckpt` + `scontrol requeue`) at a step boundary instead of in the handler.
`StudentEMA` averages the student only (Lightning's `WeightAveraging` would average the frozen teacher too).
`L0PruningCallback` drives `students.prune.L0Pruner` (TinyCLIP / CoFi hard-concrete masks under a Lagrangian
sparsity constraint): masks and multipliers train with the student until `prune_step`, then the masks are made
hard, the student is replaced by an ordinary smaller model, and the optimizer is rebuilt for it.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from distill.run_dir import next_requeue_path

_logger = logging.getLogger(__name__)

__all__ = ["L0PruningCallback", "SignalCheckpoint", "StudentEMA", "Throughput"]


class Throughput(pl.Callback):
    """Training samples/s over optimizer steps, excluding the first `warmup` steps (loader start, compilation)."""

    def __init__(self, samples_per_step: int, warmup: int = 2) -> None:
        """Args:
        samples_per_step: Samples per optimizer step on one rank (batch size x accumulation).
        warmup: Steps excluded from the measurement.
        """
        self.samples_per_step, self.warmup = samples_per_step, warmup
        self._t0: float | None = None
        self._steps = 0
        self.samples_per_second: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if not trainer.fit_loop._should_accumulate():
            self._steps += 1
            if self._steps == self.warmup:
                self._t0 = time.perf_counter()
            elif self._steps > self.warmup and self._t0 is not None:
                dt = time.perf_counter() - self._t0
                world = trainer.world_size
                self.samples_per_second = (self._steps - self.warmup) * self.samples_per_step * world / dt
                pl_module.log("train/samples_per_sec", self.samples_per_second, batch_size=1)


class StudentEMA(pl.Callback):
    """Exponential moving average of `pl_module.student`, used for the final saved student."""

    def __init__(self, decay: float = 0.999) -> None:
        """Args:
        decay: EMA decay per optimizer step.
        """
        self.decay = decay
        self.averaged_student: nn.Module | None = None
        self._pending_state: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = getattr(pl_module.student, "_orig_mod", pl_module.student)
        self.averaged_student = copy.deepcopy(student).eval().requires_grad_(False)
        if self._pending_state is not None:
            self.averaged_student.load_state_dict(self._pending_state)
            self._pending_state = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        student = getattr(pl_module.student, "_orig_mod", pl_module.student)
        # Warm-up the decay like timm's ModelEmaV3, so early averages are not dominated by the random init.
        step = trainer.global_step
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = dict(self.averaged_student.named_parameters())
        if {k: v.shape for k, v in ema_params.items()} != {k: v.shape for k, v in student.named_parameters()}:
            # The student was replaced by a structurally different one (L0 pruning): restart the average.
            self.averaged_student = copy.deepcopy(student).eval().requires_grad_(False)
            return
        for name, p in student.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - decay)
        for (_, b_ema), (_, b) in zip(self.averaged_student.named_buffers(), student.named_buffers(), strict=False):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, object]:
        return {"averaged_student": self.averaged_student.state_dict() if self.averaged_student else None}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self._pending_state = state_dict.get("averaged_student")


class SignalCheckpoint(pl.Callback):
    """Signals stop or requeue a run at a step boundary, with a resumable checkpoint of that step.

    - SIGTERM (preemption, a SLURM time limit, `kill`): Lightning raises `SIGTERMException` at the next step
      boundary; this callback then saves `last_path` and `signum` tells the caller which signal stopped the run.
    - Ctrl-C: the first one takes the SIGTERM path; a second one aborts at once.
    - SLURM auto-requeue (`#SBATCH --signal=USR1@90`): Lightning's own handler flushes the loggers, saves
      `hpc_ckpt_N.ckpt` and calls `scontrol requeue` *inside* the signal handler, which deadlocks when the signal
      lands while TensorBoard is flushing (seen in tests) and can save a half-updated step. This callback takes the
      requeue signal first (Lightning then installs none) and does the same work at the next step boundary.
    """

    def __init__(self, last_path: Path) -> None:
        """Args:
        last_path: Where the stop checkpoint goes (`<run>/checkpoints/last.ckpt`, which resume picks up).
        """
        self.last_path = last_path
        self.signum: int | None = None
        self._pid: int | None = None
        self._previous: dict[int, signal.Handlers | None] = {}
        self._requeue_pending = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # NOTE: Lightning registers its signal handlers after on_fit_start and keeps (SIGTERM) or defers to
        # (the SLURM requeue signal) handlers already set.
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        self._install(signal.SIGINT, self._on_sigint)
        if SLURMEnvironment.detect():
            # NOTE: the trainer is built with Lightning's default SLURMEnvironment (auto_requeue, SIGUSR1).
            self._install(SLURMEnvironment().requeue_signal, self._on_requeue_signal)

    def _install(self, signum: int, handler: Callable[[int, FrameType | None], None]) -> None:
        self._previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    def restore(self) -> None:
        """Put back the handlers that were set before the fit (idempotent)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._previous.clear()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker (Ctrl-C reaches the whole process group): the main process stops the run
            # and shuts the workers down; a worker exiting on its own would crash the loader instead.
            return
        if self.signum is not None or signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt
        self.signum = signal.SIGINT
        _logger.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort at once)")
        signal.raise_signal(signal.SIGTERM)  # Lightning's own SIGTERM path: stop at the step boundary, all ranks

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid:
            self._requeue_pending = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self._requeue_pending:
            self._requeue_pending = False
            self._requeue(trainer)

    def _requeue(self, trainer: pl.Trainer) -> None:
        path = next_requeue_path(Path(trainer.default_root_dir))
        for lg in trainer.loggers:
            lg.save()
        trainer.save_checkpoint(path)
        _logger.warning("SLURM requeue signal: saved %s at step %d", path, trainer.global_step)
        if not trainer.is_global_zero:
            return
        array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
        job_id = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ.get("SLURM_JOB_ID")
        if not job_id or not re.fullmatch(r"[0-9_]+", job_id):
            _logger.warning("no SLURM job id to requeue (SLURM_JOB_ID=%r)", job_id)
            return
        try:
            res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
        except OSError as err:
            _logger.warning("requeuing SLURM job %s failed: %s", job_id, err)
            return
        if res.returncode:
            _logger.warning("requeuing SLURM job %s failed: %s", job_id, res.stderr.strip()[:200])
        else:
            _logger.info("requeued SLURM job %s", job_id)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore()
        if isinstance(exception, SIGTERMException):
            self.signum = self.signum or signal.SIGTERM
            trainer.save_checkpoint(self.last_path)
            _logger.warning(
                "stopped by %s at step %d; checkpoint %s (rerun the same command to resume)",
                signal.Signals(self.signum).name,
                trainer.global_step,
                self.last_path,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore()


class L0PruningCallback(pl.Callback):
    """Automatic weight inheritance (TinyCLIP): learn L0 masks, then prune at `prune_step` and continue.

    Runs on a single device: swapping the student for a smaller one after `prune_step` would invalidate a DDP
    wrapper's gradient buckets. Mask and multiplier optimiser moments are not checkpointed (the gates are).
    """

    def __init__(self, args: Any) -> None:
        """Args:
        args: `distill.args.InheritArgs` (target_sparsity, sparsity_warmup_steps, prune_step, mask_lr).
        """
        self.args = args
        self.pruner = None
        self.pruned = False
        self._pending: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from students.prune import L0Pruner

        if trainer.world_size > 1:
            raise ValueError(
                "--inherit.mode auto (L0 pruning) runs on one device; prune first, then scale out "
                "the continued training with --inherit.source <pruned student>"
            )
        if self.pruned:
            return
        self.pruner = L0Pruner(
            pl_module.student, target_sparsity=self.args.target_sparsity, warmup_steps=self.args.sparsity_warmup_steps
        )
        self.pruner.to(pl_module.device)
        if self._pending is not None:
            self.pruner.load_state_dict(self._pending)
            self._pending = None
        pl_module.pruner = self.pruner
        self._mask_opt = torch.optim.AdamW(list(self.pruner.parameters()), lr=self.args.mask_lr, weight_decay=0.0)
        # Lagrange multipliers are maximised (TinyCLIP trains them with lr -0.02).
        self._lambda_opt = torch.optim.AdamW(
            list(self.pruner.lambda_parameters()), lr=self.args.mask_lr, weight_decay=0.0, maximize=True
        )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.pruner is not None and not self.pruned:
            for opt in (self._mask_opt, self._lambda_opt):
                opt.step()
                opt.zero_grad(set_to_none=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.pruner is None or self.pruned or trainer.global_step < self.args.prune_step:
            return
        before = sum(p.numel() for p in pl_module.student.parameters())
        sparsity = self.pruner.deterministic_sparsity()
        pruned = self.pruner.prune().to(pl_module.device)
        pl_module.student = pruned
        pl_module.pruner = None
        # Checkpoints from now on describe the compact model, so resume and load_student rebuild it.
        pl_module.hparams["student_cfg"] = pruned.cfg.to_dict()
        self.pruned, self.pruner = True, None
        after = sum(p.numel() for p in pruned.parameters())
        _logger.info(
            "L0 pruning at step %d: %.2fM -> %.2fM parameters (sparsity %.3f of the prunable weights)",
            trainer.global_step,
            before / 1e6,
            after / 1e6,
            sparsity,
        )
        pl_module.log("train/pruned_params_m", after / 1e6, batch_size=1)
        # Rebuild optimizer + scheduler for the compact model; the cosine schedule continues from this step.
        trainer.strategy.setup_optimizers(trainer)
        import warnings

        for cfg in trainer.lr_scheduler_configs:
            cfg.scheduler.last_epoch = trainer.global_step - 1
            with warnings.catch_warnings():
                # Intended: advance the fresh scheduler to the current step before the new optimizer's first step.
                warnings.simplefilter("ignore", UserWarning)
                cfg.scheduler.step()

    def state_dict(self) -> dict:
        return {"pruned": self.pruned, "pruner": self.pruner.state_dict() if self.pruner is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pruned = bool(state_dict.get("pruned", False))
        self._pending = state_dict.get("pruner")
