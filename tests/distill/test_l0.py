"""Automatic inheritance in training: the L0 callback's schedule, fp16 mask steps, the module contract, stages."""

from __future__ import annotations

import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

import students
from distill.args import InheritArgs, OptimArgs
from distill.callbacks import L0PruningCallback, L0Schedule
from distill.cli import main
from distill.losses import DistillLoss
from distill.module import DistillModule, cosine_with_warmup
from mcd_common import UsageError


def test_schedule_defaults_follow_tinyclip_and_fit_short_runs() -> None:
    long = L0Schedule.resolve(InheritArgs(), max_steps=100_000)
    assert (long.warmup_steps, long.prune_step, long.mask_lr) == (1000, 3000, 0.02)
    assert long.too_short() is None  # 1000 + 461 steps <= 3000
    short = L0Schedule.resolve(InheritArgs(), max_steps=600)
    assert (short.warmup_steps, short.prune_step) == (100, 300)
    assert "too short for the L0 masks to converge" in short.too_short()
    assert L0Schedule.resolve(InheritArgs(mask_lr=0.5), max_steps=600).too_short() is None
    with pytest.raises(UsageError, match="--inherit.prune_step 50 is past --trainer.max_steps 10"):
        L0Schedule.resolve(InheritArgs(prune_step=50), max_steps=10)
    with pytest.raises(UsageError, match="--inherit.sparsity_warmup_steps"):
        L0Schedule.resolve(InheritArgs(prune_step=5, sparsity_warmup_steps=8), max_steps=10)


def test_inherit_args_validate_the_stage() -> None:
    with pytest.raises(UsageError, match="--inherit.start_sparsity"):
        InheritArgs(start_sparsity=0.5, target_sparsity=0.5)
    with pytest.raises(UsageError, match="--inherit.mask_lr"):
        InheritArgs(mask_lr=0.0)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, student: students.CLIPStudent, n: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        size = student.image_size
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
        self.text = torch.randint(1, 400, (n, student.context_length), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.text[i]}


class _Record(pl.Callback):
    """What the L0 callback's mask optimizer and gates hold after the first step (before pruning)."""

    def __init__(self, l0: L0PruningCallback) -> None:
        self.l0 = l0
        self.seen: dict = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == 1:
            opt = self.l0._mask_opt
            gates = opt.param_groups[0]["params"]
            self.seen = {
                "exp_avg": [opt.state[p]["exp_avg"].clone() for p in gates if p in opt.state],
                "log_alpha": [p.detach().clone() for p in gates],
                "lambdas": [p.item() for p in opt.param_groups[1]["params"]],
                "main_state": len(trainer.optimizers[0].state),
            }


def _fit(plugin: MixedPrecision | None, *, max_steps: int = 3, prune_step: int = 2) -> tuple:
    torch.manual_seed(0)
    student = students.create_student("test_tiny")
    loss = DistillLoss(contrastive_weight=1.0, kd_weight=0.0, student_dim=student.embed_dim)
    optim = OptimArgs(lr=1e-3, warmup_steps=0)
    module = DistillModule(
        student,
        None,
        loss,
        optim,
        max_steps=max_steps,
        freeze_logit_scale=50.0,
        hparams={"student_cfg": student.cfg.to_dict()},
    )
    l0 = L0PruningCallback(InheritArgs(target_sparsity=0.4, mask_lr=0.1, prune_step=prune_step), max_steps=max_steps)
    record = _Record(l0)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        plugins=[plugin] if plugin is not None else None,
        callbacks=[l0, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    data = torch.utils.data.DataLoader(_Batches(student), batch_size=4, shuffle=False)
    trainer.fit(module, data)
    return module, trainer, l0, record.seen


def test_fp16_mask_gradients_are_unscaled_and_overflow_steps_skipped() -> None:
    # `16-mixed` on CPU: Lightning swaps the flag for bf16, so pass its fp16 MixedPrecision plugin directly.
    _, _, _, fp32 = _fit(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _, _, l0, fp16 = _fit(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert l0.skipped_mask_steps == 0
    # AdamW's first moment after one step is 0.1 * grad: the masks saw unscaled gradients (not 4096x)
    for a, b in zip(fp16["exp_avg"], fp32["exp_avg"], strict=True):
        ratio = a.norm() / b.norm()
        assert 0.5 < ratio < 2.0, ratio
    # an overflowing scale: the main step and the mask step are both skipped, the gates are only clamped
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    _, _, l0, over = _fit(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert over["main_state"] == 0 and over["exp_avg"] == [] and l0.skipped_mask_steps >= 1
    assert all(torch.all(la == math.log(100.0)) for la in over["log_alpha"])
    assert over["lambdas"] == [10.0, 10.0]


def test_callback_and_module_contract_prune_swap_and_schedule() -> None:
    module, trainer, l0, _ = _fit(None, max_steps=4, prune_step=2)
    assert l0.pruned and module.pruner is None
    assert not module.student.logit_scale.requires_grad  # frozen parameters stay frozen across the swap
    assert module.hparams["student_cfg"] == module.student.cfg.to_dict() != students.get_student_cfg("test_tiny")
    report = l0.report
    assert report["pruned_at_step"] == 2 and abs(report["sparsity"] - 0.4) <= 0.02
    assert report["params"]["after"] == sum(p.numel() for p in module.student.parameters()) < report["params"]["before"]
    # the rebuilt optimizer holds the new student's parameters and the schedule went on from step 2
    new_params = {id(p) for p in module.student.parameters()}
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} <= new_params | {
        id(p) for p in module.loss.parameters()
    }
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 4
    # a resumed run after the prune step keeps the report and does not prune again
    resumed = L0PruningCallback(InheritArgs(prune_step=2), max_steps=4)
    resumed.load_state_dict(l0.state_dict())
    assert resumed.pruned and resumed.report == report and resumed._pending is None
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * cosine_with_warmup(4, 0, 4))


def _stage_args(root, corpus, source, start: float, target: float) -> list[str]:  # noqa: ANN001
    return [
        "train", "--student", "tiny_vit", "--data.path", str(corpus / "train"), "--data.batch_size", "8",
        "--data.num_workers", "0", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "130", "--optim.lr", "1e-4",
        "--inherit.source", str(source), "--inherit.mode", "auto", "--inherit.start_sparsity", str(start),
        "--inherit.target_sparsity", str(target), "--inherit.mask_lr", "0.1", "--inherit.sparsity_warmup_steps",
        "20", "--inherit.prune_step", "120", "--trainer.checkpoint_every_n_steps", "1000",
    ]  # fmt: skip


def _prunable(cfg: dict) -> int:
    total = 0
    for tower in (cfg["image"], cfg["text"]):
        mlp = int(tower["width"] * tower["mlp_ratio"])
        total += tower["layers"] * tower["width"] * (4 * tower["width"] + 2 * mlp)
    return total


@pytest.mark.slow
def test_progressive_stages_land_on_their_targets(tmp_path, tiny_corpus) -> None:  # noqa: ANN001
    original = students.create_student("tiny_vit")
    students.save_student(original, tmp_path / "original")
    source, start = tmp_path / "original", 0.0
    for target in (0.25, 0.5, 0.75):
        root = tmp_path / f"stage_{target}"
        assert main(_stage_args(root, tiny_corpus, source, start, target)) == 0
        run = json.loads((root / "run.json").read_text())
        pruning = run["pruning"]
        pruned = students.load_student(root / "student")
        reached = 1 - _prunable(pruned.cfg.to_dict()) / _prunable(original.cfg.to_dict())
        assert abs(reached - target) <= 0.02, (target, reached)
        assert abs(pruning["expected_sparsity"] - target) <= 0.03  # the masks themselves (nearly) converged there
        assert pruning["sparsity"] == pytest.approx(reached, abs=1e-3)
        assert pruning["params"]["after"] == sum(p.numel() for p in pruned.parameters())
        assert pruning["mask_seconds"] > 0 and pruning["seconds_after_prune"] > 0
        with open(root / "logs" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
        lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows}
        warmup = min(1000, 130 // 5)
        for step in (119, 121):  # the cosine goes on across the rebuild at step 120
            assert lrs[step] == pytest.approx(1e-4 * cosine_with_warmup(step, warmup, 130), rel=1e-4)
        source, start = root / "student", target
