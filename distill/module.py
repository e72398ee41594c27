"""The Lightning system that trains a CLIP student: contrastive and distillation objectives, three data modes.

Models are injected (Lightning's "system" style): `DistillModule(student, teacher, loss, optim)`.
- reinforced (offline): `teacher=None`; targets are the stored teacher embeddings carried by the batch.
- online: a frozen teacher (or ensemble) computes targets on the same images and captions under `no_grad`, kept in
  eval mode, with its own preprocessing (open_clip `DistillCLIPTask`, timm `DistillationTeacher`).
- scratch: no teacher and no targets; the loss is contrastive only.
Validation encodes a zero-shot set and a retrieval set and logs top-1 and Recall@K (see `distill.evaluate`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from distill.args import OptimArgs
from distill.evaluate import retrieval_metrics, zeroshot_classifier
from students import CLIPStudent, L0Pruner

_logger = logging.getLogger(__name__)

__all__ = ["TARGET_PREFIX", "DistillModule", "cosine_with_warmup"]

TARGET_PREFIX = "teacher_"
"""Batch keys starting with this are teacher targets and go to the loss by name (`teacher_image_features`, ...)."""

TeacherFeatures = Mapping[str, Tensor]
"""Teacher targets of one kind: `{member name: [B, D_k]}`."""

_MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learnable temperature at 100


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DistillModule(pl.LightningModule):
    """Trains `student` against `loss`, with targets from the batch (reinforced), a live `teacher`, or none."""

    def __init__(
        self,
        student: CLIPStudent,
        teacher: nn.Module | None,
        loss: nn.Module,
        optim: OptimArgs,
        *,
        max_steps: int,
        channels_last: bool = False,
        freeze_logit_scale: float | None = None,
        caption_weight: float = 2.0,
        zeroshot_classes: list[str] | None = None,
        zeroshot_templates: list[str] | None = None,
        hparams: dict[str, object] | None = None,
    ) -> None:
        """Args:
        student: A `students.CLIPStudent`.
        teacher: A `teachers.TeacherEnsemble` for online distillation, or None.
        loss: A `distill.losses.DistillLoss` (returns a dict of `*_loss`).
        optim: Optimiser and schedule.
        max_steps: Total optimizer steps (the cosine schedule's horizon).
        channels_last: Feed the image tower channels-last tensors.
        freeze_logit_scale: Fix the student's logit scale to this value (TinyCLIP: 50).
        caption_weight: Weight of a CoCa student's captioning loss (open_clip's CoCa default: 2).
        zeroshot_classes: Class names of validation dataloader 0 (when validating).
        zeroshot_templates: Prompt templates with `{}` for those classes.
        hparams: Plain-data hyper-parameters to store in checkpoints (student cfg, teacher name, data, ...).
        """
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.loss = loss
        self.optim = optim
        self.max_steps = max_steps
        self.channels_last = channels_last
        self.caption_weight = caption_weight
        self.zeroshot_classes = zeroshot_classes
        self.zeroshot_templates = zeroshot_templates
        if freeze_logit_scale is not None:
            with torch.no_grad():
                student.logit_scale.fill_(math.log(freeze_logit_scale))
            student.logit_scale.requires_grad_(False)
        # NOTE: only plain data goes into hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"optim": asdict(optim), "max_steps": max_steps, **(hparams or {})})
        self.pruner: L0Pruner | None = None
        """Automatic inheritance: the L0 masks being learned (set and cleared by `L0PruningCallback`); while set,
        its Lagrangian sparsity term joins the loss."""
        self._val_store: dict[str, list[tuple[Tensor, ...]]] = {}

    def forward(self, image: Tensor, text: Tensor, syn_text: Tensor | None = None) -> dict[str, Tensor]:
        """Student embeddings for a batch. `image` is uint8 or [0, 1] at the student's size (normalised here).

        CoCa students (`caption_loss_enabled`) also return their captioning loss on the real caption, computed in
        the same tower passes (`forward_train`).
        """
        pixels = self.student.normalize(image)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.student.caption_loss_enabled:
            out = self.student.forward_train(pixels, text)
            if syn_text is not None:
                out["syn_text_features"] = self.student.encode_text(syn_text, normalize=True, trim_padding=True)
            return out
        image_features = self.student.encode_image(pixels, normalize=True)
        out = {"image_features": image_features, "logit_scale": self.student.logit_scale.exp()}
        if syn_text is None:
            out["text_features"] = self.student.encode_text(text, normalize=True, trim_padding=True)
        else:
            # One text-tower pass for real and synthetic captions ([2B, L]), split afterwards (MobileCLIP); the
            # padding after the longest caption is not computed (causal towers: the same features, see encode_text).
            both = self.student.encode_text(torch.cat([text, syn_text]), normalize=True, trim_padding=True)
            out["text_features"], out["syn_text_features"] = both.split(text.shape[0])
        return out

    def training_step(self, batch: dict[str, object], batch_idx: int) -> Tensor:
        out = self(batch["image"], batch["text"], batch.get("syn_text"))
        caption_loss = out.pop("caption_loss", None)
        losses = self._loss_terms(out, batch)
        if caption_loss is not None and self.caption_weight > 0:
            losses["caption_loss"] = self.caption_weight * caption_loss
        if self.pruner is not None:
            # Automatic inheritance: the Lagrangian sparsity term of the L0 masks (distill.callbacks).
            losses["sparsity_loss"] = self.pruner.sparsity_loss(self.global_step)
        total = sum(losses.values())
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", out["logit_scale"].detach(), batch_size=bs)
        return total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats = self.student.encode_image(self.student.normalize(batch["image"]), normalize=True).float()
        if "label" in batch:
            self._val_store.setdefault("zeroshot", []).append((feats, batch["label"]))
        else:
            texts = self.student.encode_text(batch["text"], normalize=True, trim_padding=True).float()  # [M, D]
            self._val_store.setdefault("retrieval", []).append((feats, texts, batch["owner"]))

    def on_validation_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        if "zeroshot" in self._val_store and self.zeroshot_classes:
            feats = torch.cat([f for f, _ in self._val_store["zeroshot"]])
            labels = torch.cat([lab for _, lab in self._val_store["zeroshot"]]).to(feats.device)
            classifier = zeroshot_classifier(
                lambda t: self.student.encode_text(self.student.tokenize(t).to(feats.device), normalize=True),
                self.zeroshot_classes,
                self.zeroshot_templates or ["a photo of a {}."],
            )
            metrics["val/zeroshot_top1"] = 100.0 * float(((feats @ classifier).argmax(-1) == labels).float().mean())
        if "retrieval" in self._val_store:
            owners, seen = [], 0
            for f, _, own in self._val_store["retrieval"]:
                owners.append(own.to(f.device) + seen)  # batch-local image index -> global index
                seen += f.shape[0]
            images = torch.cat([f for f, _, _ in self._val_store["retrieval"]])
            texts = torch.cat([t for _, t, _ in self._val_store["retrieval"]])
            for k, v in retrieval_metrics(images, texts, torch.cat(owners)).items():
                metrics[f"val/{k}"] = v
        self._val_store.clear()
        if metrics:
            self.log_dict(metrics, sync_dist=True)

    def configure_optimizers(self) -> dict[str, object]:
        params = [p for p in list(self.student.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        # nanoGPT rule: decay matrices/convs only; biases, norms and the logit scale (ndim < 2) are not decayed.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        # fused AdamW: one kernel for every tensor, CPU included (tiny_vit_s on 1 CPU thread: 2.6 ms per step against
        # 19.9 ms for the per-tensor loop). Not under mixed precision: Lightning's amp plugin refuses gradient
        # clipping with an optimizer that could unscale internally (fp16 and bf16 alike); sharded (DTensor)
        # parameters keep the default implementation.
        precision = str(getattr(self._trainer, "precision", "32-true"))
        fused = "mixed" not in precision and all(
            p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor for p in params
        )
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=self.optim.betas,
            eps=self.optim.eps,
            fused=fused or None,
            foreach=None if fused else True,  # multi-tensor kernels where fused is not taken
        )
        warmup = min(self.optim.warmup_steps, self.max_steps // 5)
        # NOTE: an optimizer rebuilt mid-run (replace_student) continues the schedule at the current step
        start = self.global_step
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, warmup, self.max_steps, self.optim.min_lr_ratio), last_epoch=start - 1
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def replace_student(self, student: CLIPStudent) -> None:
        """Swap in a structurally different student mid-fit (L0 pruning) and rebuild the optimizer for it.

        Frozen parameters stay frozen (by name), the checkpointed `student_cfg` follows the new student so resume
        and `students.load_student` rebuild it, the pruner is dropped, and the LR schedule continues at the current
        step.
        """
        frozen = {n for n, p in self.student.named_parameters() if not p.requires_grad}
        for name, p in student.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self.student = student
        self.pruner = None
        self.hparams["student_cfg"] = student.cfg.to_dict()
        if self._trainer is not None:
            self.trainer.strategy.setup_optimizers(self.trainer)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.student.logit_scale.requires_grad:
            with torch.no_grad():
                self.student.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)

    def train(self, mode: bool = True) -> DistillModule:
        """Switch the student's mode; the teacher always stays in eval (dropout/BN frozen)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _loss_terms(self, out: dict[str, Tensor], batch: dict[str, object]) -> dict[str, Tensor]:
        """The one place where a batch meets the loss: student outputs and teacher targets, passed by name.

        The loss signature is strict, so a target key the loss does not know (a misspelt `teacher_*` key in the
        data) raises `TypeError` here instead of silently switching a term off.
        """
        return self.loss(**out, **self._targets(batch))

    @torch.no_grad()
    def _targets(self, batch: dict[str, object]) -> dict[str, TeacherFeatures]:
        """Teacher targets: the batch's `teacher_*` entries (reinforced), the live teacher's (online), or none."""
        if self.teacher is None:
            return {k: v for k, v in batch.items() if k.startswith(TARGET_PREFIX)}
        targets = {
            "teacher_image_features": self.teacher.encode_image(batch["image"]),
            "teacher_text_features": self.teacher.encode_texts(list(batch["caption"])),
        }
        if batch.get("syn_caption") is not None and batch.get("syn_text") is not None:
            targets["teacher_syn_text_features"] = self.teacher.encode_texts(list(batch["syn_caption"]))
        return targets
