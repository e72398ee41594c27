"""Lightning callbacks: throughput, an EMA of the student's weights, checkpoint on interrupt, TinyCLIP L0 pruning.

`SignalCheckpoint` makes SIGTERM and a first Ctrl-C stop at the next step boundary and save `last.ckpt`, and
does SLURM's requeue (`hpc_ckpt_N.ckpt` + `scontrol requeue`) at a step boundary instead of in the handler.
`StudentEMA` averages the student only (Lightning's `WeightAveraging` would average the frozen teacher too).
`L0PruningCallback` drives `students.prune.L0Pruner` (TinyCLIP / CoFi hard-concrete masks under a Lagrangian
sparsity constraint): masks and multipliers train with the student until `prune_step`, then the masks are made
hard and the student is replaced by an ordinary smaller model through `DistillModule.replace_student` (which
rebuilds the optimizer; the LR schedule continues). docs/L0.md compares it with TinyCLIP.

The callback <-> module contract: the callback sets `DistillModule.pruner` (a declared attribute whose
`sparsity_loss(step)` the module adds to its loss) while masks train, and calls `replace_student(pruned)` once.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from distill.args import InheritArgs
from distill.run_dir import next_requeue_path
from mcd_common import UsageError
from students.prune import LOG_ALPHA_RANGE, L0Pruner

_logger = logging.getLogger(__name__)

__all__ = ["L0PruningCallback", "L0Schedule", "SignalCheckpoint", "StudentEMA", "Throughput"]


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
        student = pl_module.student
        self.averaged_student = copy.deepcopy(student).eval().requires_grad_(False)
        if self._pending_state is not None:
            self.averaged_student.load_state_dict(self._pending_state)
            self._pending_state = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        student = pl_module.student
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


@dataclass(frozen=True)
class L0Schedule:
    """Step counts and learning rate of one automatic-inheritance stage (resolved from `InheritArgs`)."""

    warmup_steps: int
    """Steps of the linear target ramp."""
    prune_step: int
    """Step at which the masks are made hard and the student is replaced."""
    mask_lr: float
    """AdamW lr of the gates and (maximised) of the multipliers."""

    @classmethod
    def resolve(cls, args: InheritArgs, max_steps: int) -> L0Schedule:
        """TinyCLIP's lengths (ramp 1000, prune at 3000), shortened to fit `max_steps` when not given.

        A short run prunes at max_steps // 2 (half the run learns masks, half trains the pruned model) with the ramp
        over the first third of that (TinyCLIP's 1000 : 3000).
        """
        prune = args.prune_step if args.prune_step is not None else min(3000, max(1, max_steps // 2))
        warmup = args.sparsity_warmup_steps if args.sparsity_warmup_steps is not None else min(1000, prune // 3)
        if prune > max_steps:
            raise UsageError(
                f"--inherit.prune_step {prune} is past --trainer.max_steps {max_steps}: prune earlier or train longer"
            )
        if warmup > prune:
            raise UsageError(
                f"--inherit.sparsity_warmup_steps {warmup} is past --inherit.prune_step {prune}: the target would "
                "not be reached before pruning"
            )
        return cls(warmup_steps=warmup, prune_step=prune, mask_lr=args.mask_lr)

    @property
    def crossing_steps(self) -> int:
        """Steps AdamW needs to move a gate across the whole clamp range (an Adam step is about lr)."""
        return math.ceil((LOG_ALPHA_RANGE[1] - LOG_ALPHA_RANGE[0]) / self.mask_lr)

    def too_short(self) -> str | None:
        """Why this schedule is too short for the masks to converge, or None."""
        needed = self.warmup_steps + self.crossing_steps
        if self.prune_step >= needed:
            return None
        return (
            f"--inherit.prune_step {self.prune_step} is too short for the L0 masks to converge: at --inherit.mask_lr "
            f"{self.mask_lr:g} a gate needs {self.crossing_steps} steps to close, after the {self.warmup_steps}-step "
            f"ramp (prune at >= {needed}, or raise --inherit.mask_lr). The kept structure is still sized to the "
            "target, but the masks will barely have chosen what to keep."
        )


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The fp16 GradScaler of the run's precision plugin (`16-mixed`), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class L0PruningCallback(pl.Callback):
    """Automatic weight inheritance (TinyCLIP): learn L0 masks, then prune at `prune_step` and continue.

    The masks' AdamW steps after the main optimizer's: under fp16 (`16-mixed`) their gradients are unscaled by the
    run's GradScaler, and the step is skipped whenever the scaler found an overflow (its scale dropped), as the main
    step is (TinyCLIP syncs `found_inf` over all its optimizers the same way). Log-odds are clamped after every step.
    Runs on a single device: swapping the student for a smaller one would invalidate a DDP wrapper's buckets.
    """

    def __init__(self, args: InheritArgs, max_steps: int) -> None:
        """Args:
        args: `distill.args.InheritArgs` (target/start sparsity, schedule, mask lr, constraint).
        max_steps: The run's optimizer steps (default schedule lengths are fitted to it).
        """
        self.args = args
        self.schedule = L0Schedule.resolve(args, max_steps)
        self.pruner: L0Pruner | None = None
        self.pruned = False
        self.report: dict = {}
        """What run.json records under `pruning` (plain data; filled when the student is pruned)."""
        self.skipped_mask_steps = 0
        self._mask_opt: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self._scale_before: float | None = None
        self._step_pending = False
        self._t0 = self._t_pruned = 0.0
        reason = self.schedule.too_short()
        if reason:
            _logger.warning(reason)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise UsageError(
                "--inherit.mode auto (L0 pruning) runs on one device; prune first, then scale out "
                "the continued training with --inherit.source <pruned student>"
            )
        self._t0 = time.perf_counter()
        if self.pruned:
            return
        student = pl_module.student
        self.pruner = L0Pruner(
            student,
            target_sparsity=self.args.target_sparsity,
            start_sparsity=self.args.start_sparsity,
            warmup_steps=self.schedule.warmup_steps,
            constraint=self.args.constraint,
        ).to(pl_module.device)
        self._mask_opt = torch.optim.AdamW(self.pruner.param_groups(self.schedule.mask_lr))
        if self._pending is not None:
            self.pruner.load_state_dict(self._pending["pruner"])
            if self._pending.get("mask_optimizer"):
                self._mask_opt.load_state_dict(self._pending["mask_optimizer"])
            self._pending = None
        pl_module.pruner = self.pruner

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # NOTE: Lightning has unscaled the main optimizer's gradients just before this hook; the masks' are
        # unscaled here (the scaler records their overflow too) and stepped after the main step, once known.
        if self.pruner is None or self.pruned:
            return
        scaler = _grad_scaler(trainer)
        self._scale_before = None
        if scaler is not None:
            self._scale_before = scaler.get_scale()
            scaler.unscale_(self._mask_opt)
        self._step_pending = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self.pruner is None or self.pruned:
            return
        if self._step_pending:
            self._step_masks(trainer)
            pl_module.log("train/expected_sparsity", self.pruner.expected_sparsity().detach(), batch_size=1)
            pl_module.log("train/target_sparsity", self.pruner.target_at(trainer.global_step), batch_size=1)
        if trainer.global_step >= self.schedule.prune_step:
            self._prune(trainer, pl_module)

    def _step_masks(self, trainer: pl.Trainer) -> None:
        """Step gates and multipliers unless the scaler (or the gradients) overflowed; then clamp the gates."""
        assert self._mask_opt is not None and self.pruner is not None
        self._step_pending = False
        grads = [p.grad for g in self._mask_opt.param_groups for p in g["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else False
        scaler = _grad_scaler(trainer)
        overflow = scaler is not None and self._scale_before is not None and scaler.get_scale() < self._scale_before
        if finite and not overflow:
            self._mask_opt.step()
        else:
            self.skipped_mask_steps += 1
        self._mask_opt.zero_grad(set_to_none=True)
        self.pruner.constrain_()

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        t = time.perf_counter()
        masks = self.pruner.summary()
        before = _param_count(pl_module.student)
        pruned = self.pruner.prune().to(pl_module.device)
        kept = self.pruner.reference_size * (1.0 - masks["sparsity"])
        pl_module.pruner = None
        pl_module.replace_student(pruned)
        self._t_pruned = time.perf_counter()
        self.report = {
            "stage": {**asdict(self.schedule), "start_sparsity": self.args.start_sparsity,
                      "target_sparsity": self.args.target_sparsity, "constraint": self.args.constraint},
            "pruned_at_step": trainer.global_step,
            "expected_sparsity": masks["expected_sparsity"],
            "sparsity": masks["sparsity"],
            "stage_sparsity": round(1.0 - kept / self.pruner.full_size, 5),
            "lambda_1": masks["lambda_1"],
            "lambda_2": masks["lambda_2"],
            "structure": masks["structure"],
            "params": {"before": before, "after": _param_count(pruned)},
            "prunable_params": {"original": round(self.pruner.reference_size), "before": self.pruner.full_size,
                                "after": round(kept)},
            "skipped_mask_steps": self.skipped_mask_steps,
            "mask_seconds": round(t - self._t0, 3),
            "prune_seconds": round(self._t_pruned - t, 3),
        }  # fmt: skip
        self.pruned, self.pruner, self._mask_opt = True, None, None
        _logger.info(
            "L0 pruning at step %d: %.2fM -> %.2fM parameters, sparsity %.3f of the original prunable weights "
            "(masks expected %.3f, target %.3f)",
            trainer.global_step,
            before / 1e6,
            self.report["params"]["after"] / 1e6,
            masks["sparsity"],
            masks["expected_sparsity"],
            self.args.target_sparsity,
        )
        pl_module.log("train/pruned_params_m", self.report["params"]["after"] / 1e6, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report and self._t_pruned:
            self.report["seconds_after_prune"] = round(time.perf_counter() - self._t_pruned, 3)

    def state_dict(self) -> dict:
        return {
            "pruned": self.pruned,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "mask_optimizer": self._mask_opt.state_dict() if self._mask_opt is not None else None,
            "report": self.report,
            "skipped_mask_steps": self.skipped_mask_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.pruned = bool(state_dict.get("pruned", False))
        self.report = dict(state_dict.get("report") or {})
        self.skipped_mask_steps = int(state_dict.get("skipped_mask_steps", 0))
        if state_dict.get("pruner") is not None:
            self._pending = {"pruner": state_dict["pruner"], "mask_optimizer": state_dict.get("mask_optimizer")}
