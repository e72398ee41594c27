"""Lightning callbacks: an EMA of the student's weights, and TinyCLIP automatic inheritance (L0 pruning).

`StudentEMA` averages the student only (Lightning's `WeightAveraging` would average the frozen teacher too).
`L0PruningCallback` drives `students.prune.L0Pruner` (TinyCLIP / CoFi hard-concrete masks under a Lagrangian
sparsity constraint): masks and multipliers train with the student until `prune_step`, then the masks are made
hard, the student is replaced by an ordinary smaller model, and the optimizer is rebuilt for it.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["L0PruningCallback", "StudentEMA", "Throughput"]


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
