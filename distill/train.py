"""`distill train --student S [--teacher T]`: train a CLIP student with PyTorch Lightning.

Modes (chosen automatically from the data and `--teacher`, or forced with `--mode`):
- reinforced: shards from `distill build-data`; stored teacher embeddings are the targets, no teacher runs
  (MobileCLIP's multi-modal reinforced training).
- online: plain image-caption data and a live, frozen teacher (open_clip distillation, TinyCLIP).
- scratch: plain data, no teacher, CLIP contrastive loss (also how the demo trains its own tiny teacher).
Weight inheritance (TinyCLIP manual, or automatic L0 pruning) initialises the student from a larger model.
Outputs in `--trainer.default_root_dir`: Lightning checkpoints (exact resume), CSV/TensorBoard logs, the final
student in open_clip layout (`student/`), and `run.json` (config, versions, data fingerprint, metrics).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from distill.args import DataArgs, EvalArgs, InheritArgs, LossArgs, OptimArgs, TrainerArgs

_logger = logging.getLogger(__name__)

__all__ = ["build_loss", "train"]

_PRESETS: dict[str, dict[str, float]] = {
    "mobileclip": {"contrastive_weight": 0.0, "kd_weight": 1.0, "fd_weight": 0.0, "icl_weight": 0.0},
    "mobileclip_b": {"contrastive_weight": 0.25, "kd_weight": 0.75, "fd_weight": 0.0, "icl_weight": 0.0},
    "tinyclip": {"contrastive_weight": 0.0, "kd_weight": 1.0, "fd_weight": 0.0, "icl_weight": 0.0},
    "clip_kd": {"contrastive_weight": 1.0, "kd_weight": 1.0, "fd_weight": 2000.0, "icl_weight": 1.0},
    "contrastive": {"contrastive_weight": 1.0, "kd_weight": 0.0, "fd_weight": 0.0, "icl_weight": 0.0},
}


def build_loss(
    args: LossArgs,
    *,
    has_teacher: bool,
    teacher_scales: dict[str, float],
    teacher_dims: dict[str, int],
    student_dim: int,
) -> tuple[Any, dict[str, Any]]:
    """Resolve the preset and overrides into a `DistillLoss`.

    Returns:
        The loss module and a plain dict describing it (weights, scales) for run.json.
    """
    from distill.losses import DistillLoss

    preset = args.preset
    if preset == "auto":
        preset = "mobileclip" if has_teacher else "contrastive"
    if preset != "contrastive" and not has_teacher:
        raise ValueError(f"--loss.preset {preset} distils from a teacher: pass --teacher or reinforced data")
    weights = dict(_PRESETS[preset])
    for key in weights:
        override = getattr(args, key)
        if override is not None:
            weights[key] = override
    scales = dict(teacher_scales)
    freeze = args.freeze_student_logit_scale
    if preset == "tinyclip":
        # TinyCLIP fixes both temperatures at 50 (its --logit-scale 50).
        scales = {k: 50.0 for k in scales}
        freeze = 50.0 if freeze is None else freeze
    if args.teacher_logit_scale is not None:
        scales = {k: args.teacher_logit_scale for k in scales}
    loss = DistillLoss(
        **weights,
        teacher_logit_scales=scales if has_teacher else None,
        teacher_dims=teacher_dims if has_teacher else None,
        student_dim=student_dim,
    )
    return loss, {
        "preset": preset,
        **weights,
        "caption_weight": args.caption_weight,
        "teacher_logit_scales": scales,
        "freeze_student_logit_scale": freeze,
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "open_clip_torch", "pytorch-lightning", "webdataset", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _git_sha() -> str | None:
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def train(
    student: str,
    teacher: str | None = None,
    mode: Literal["auto", "reinforced", "online", "scratch"] = "auto",
    data: DataArgs = DataArgs(),
    loss: LossArgs = LossArgs(),
    optim: OptimArgs = OptimArgs(),
    trainer: TrainerArgs = TrainerArgs(),
    inherit: InheritArgs = InheritArgs(),
    val: EvalArgs = EvalArgs(),
    student_weights: str | None = None,
    teacher_weights: str | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
) -> dict:
    """Train a student by distillation (reinforced or online) or from scratch.

    Args:
        student: Registered student name (see `distill zoo`), or a saved student directory to continue from.
        teacher: Teacher for online distillation (registered name, `local-dir:PATH`, `hf:DIR`, or a comma list).
            With reinforced data it is optional and only checked against the shards' `teach.json`.
        mode: `auto` picks reinforced for build-data shards, online with a teacher, scratch otherwise.
        data: Training data.
        loss: Loss preset and weights.
        optim: Optimiser and LR schedule.
        trainer: Lightning trainer settings (steps, precision, devices, strategy, output dir, resume).
        inherit: Weight inheritance from a larger model.
        val: Validation sets (defaults to the embedded corpus's splits when training on it).
        student_weights: Initialise the student from these weights (saved student dir, safetensors or .ckpt).
        teacher_weights: Local weights file for a registered (hub) teacher in online mode.
        image_size: Override the student's input resolution.
        context_length: Override the student's text context length.

    Returns:
        A summary: output paths, steps, wall time, throughput and final validation metrics.
    """
    import pytorch_lightning as pl
    import torch

    from distill.data import DistillDataModule, resolve_data
    from distill.module import DistillModule
    from students import create_student, inherit_weights, load_student, save_student

    t0 = time.time()
    root = Path(trainer.default_root_dir).expanduser()
    pl.seed_everything(trainer.seed, workers=True)

    spec = resolve_data(data)
    if mode == "auto":
        mode = "reinforced" if spec.reinforced else ("online" if teacher else "scratch")
    if mode == "reinforced" and not spec.reinforced:
        raise ValueError(f"--mode reinforced needs shards written by `distill build-data`; {spec.describe()} has none")
    if mode == "online" and not teacher:
        raise ValueError("--mode online needs --teacher")
    if mode == "scratch" and teacher:
        _logger.warning("--mode scratch ignores --teacher %s", teacher)

    # --- student (+ inheritance) ---
    overrides = {"image_size": image_size, "context_length": context_length}
    src = Path(student.removeprefix("local-dir:")).expanduser()
    model = load_student(src) if src.exists() else create_student(student, **overrides)
    ckpt_path = _resume_path(trainer.resume, root)
    resumed_cfg = _checkpoint_student_cfg(ckpt_path) if ckpt_path else None
    if resumed_cfg is not None and resumed_cfg != model.cfg.to_dict():
        # The checkpoint holds a structurally different student (pruned by automatic inheritance): rebuild it.
        from students import CLIPStudent, StudentCfg

        _logger.info("resuming a pruned student: %s", resumed_cfg.get("name"))
        model = CLIPStudent(StudentCfg.from_dict(resumed_cfg))
    if student_weights:
        model.load_state_dict(load_student(Path(student_weights)).state_dict())
    if inherit.source and inherit.mode == "auto" and ckpt_path is None:
        # Automatic inheritance starts from the (larger) source model itself and learns what to remove;
        # --student then only names the run.
        model = _inherit_source(inherit.source, teacher, teacher_weights)
        model.train()
    inherit_report = None
    if inherit.source and inherit.mode == "manual" and ckpt_path is None:
        source = _inherit_source(inherit.source, teacher, teacher_weights)
        inherit_report = inherit_weights(model, source.state_dict(), source_cfg=getattr(source, "cfg", None))
        _logger.info("weight inheritance: %s", inherit_report.summary() if hasattr(inherit_report, "summary") else "")

    # --- teacher / targets ---
    live_teacher = None
    if mode == "online":
        from teachers import WeightSpec, as_ensemble, create_teacher

        weights = WeightSpec(file=teacher_weights) if teacher_weights else None
        live_teacher = as_ensemble(create_teacher(teacher, weights=weights))
        teacher_scales, teacher_dims = dict(live_teacher.logit_scales), dict(live_teacher.embed_dims)
    elif mode == "reinforced":
        teacher_scales, teacher_dims = spec.teacher_scales(), spec.teacher_dims()
        if teacher:
            spec.check_teacher(teacher)
    else:
        teacher_scales, teacher_dims = {}, {}
    has_teacher = mode != "scratch"
    loss_module, loss_desc = build_loss(
        loss,
        has_teacher=has_teacher,
        teacher_scales=teacher_scales,
        teacher_dims=teacher_dims,
        student_dim=model.embed_dim,
    )

    # --- data ---
    dm = DistillDataModule(
        spec, data, model, mode=mode, seed=trainer.seed, val=val, accumulate=trainer.accumulate_grad_batches
    )
    pruner_cb = None
    if inherit.source and inherit.mode == "auto":
        from distill.callbacks import L0PruningCallback

        pruner_cb = L0PruningCallback(inherit)

    hparams = {
        "student_cfg": model.cfg.to_dict(),
        "student": student,
        "teacher_name": teacher,
        "mode": mode,
        "loss": loss_desc,
        "data": asdict(data),
        "trainer": asdict(trainer),
        "schema_version": spec.schema_version,
    }
    module = DistillModule(
        model,
        live_teacher,
        loss_module,
        optim,
        max_steps=trainer.max_steps,
        channels_last=trainer.channels_last,
        freeze_logit_scale=loss_desc["freeze_student_logit_scale"],
        caption_weight=loss.caption_weight,
        zeroshot_classes=dm.zeroshot_classes,
        zeroshot_templates=dm.zeroshot_templates,
        hparams=hparams,
    )
    if trainer.compile:
        # NOTE: compile each tower in place. `torch.compile(student)` only wraps `student.__call__`, which
        # DistillModule never calls (it uses normalize/encode_image/encode_text), so it compiled nothing and renamed
        # every checkpoint key to `student._orig_mod.*`. `Module.compile()` keeps the keys; deepcopies are eager.
        for tower in (module.student.visual, module.student.text):
            tower.compile()

    callbacks, ckpt_cb = _callbacks(trainer, root)
    from distill.callbacks import Throughput

    speed = Throughput(dm.samples_per_step)
    callbacks.append(speed)
    if pruner_cb is not None:
        callbacks.append(pruner_cb)
    loggers = [
        pl.loggers.CSVLogger(root, name="logs", version=""),
        pl.loggers.TensorBoardLogger(root, name="tb", version=""),
    ]
    pl_trainer = pl.Trainer(
        max_steps=trainer.max_steps,
        precision=trainer.precision,
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=trainer.gradient_clip_val,
        val_check_interval=trainer.val_check_interval or trainer.max_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=trainer.log_every_n_steps,
        default_root_dir=root,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=trainer.enable_progress_bar,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # NOTE: our resumable sampler shards by rank itself
        deterministic=False,
    )
    if ckpt_path:
        _logger.info("resuming from %s", ckpt_path)
    fit_t0 = time.time()
    pl_trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.time() - fit_t0

    metrics = {k: float(v) for k, v in pl_trainer.callback_metrics.items() if k.startswith("val/")}
    final = module.student
    final = getattr(final, "_orig_mod", final)  # unwrap torch.compile
    ema = next((c for c in callbacks if hasattr(c, "averaged_student")), None)
    if ema is not None and ema.averaged_student is not None:
        final = ema.averaged_student
    summary: dict[str, Any] = {
        "out": str(root),
        "mode": mode,
        "student": student,
        "teacher": teacher,
        "steps": int(pl_trainer.global_step),
        "resumed_from": ckpt_path,
        "fit_seconds": round(fit_seconds, 2),
        "samples_per_second": round(speed.samples_per_second, 2) if speed.samples_per_second else None,
        "metrics": metrics,
        "loss": loss_desc,
    }
    if inherit_report is not None:
        summary["inheritance"] = inherit_report.summary() if hasattr(inherit_report, "summary") else str(inherit_report)
    if pl_trainer.is_global_zero:
        save_student(final.cpu() if not isinstance(final, torch.nn.Module) else final, root / "student")
        summary["student_dir"] = str(root / "student")
        summary["checkpoint"] = ckpt_cb.last_model_path or None
        run = {
            **summary,
            "config": {
                "student": student,
                "teacher": teacher,
                "mode": mode,
                "data": asdict(data),
                "loss": asdict(loss),
                "optim": asdict(optim),
                "trainer": asdict(trainer),
                "inherit": asdict(inherit),
                "val": asdict(val),
                "image_size": image_size,
                "context_length": context_length,
            },
            "student_cfg": model.cfg.to_dict(),
            "data_fingerprint": spec.fingerprint(),
            "versions": _versions(),
            "git_sha": _git_sha(),
            "device": _device_label(),
            "wall_seconds": round(time.time() - t0, 2),
        }
        _write_json(root / "run.json", run)
    return summary


def _inherit_source(source: str, teacher: str | None, teacher_weights: str | None = None) -> Any:
    """The model weights are inherited from: a saved student / checkpoint, or the (open_clip) teacher itself."""
    from students import load_student

    if source == "teacher":
        if not teacher:
            raise ValueError("--inherit.source teacher needs --teacher")
        path = Path(teacher.removeprefix("local-dir:")).expanduser()
        return load_student(path) if path.exists() else _teacher_as_student(teacher, teacher_weights)
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--inherit.source {source}: no such student directory or checkpoint")
    return load_student(path)


def _teacher_as_student(name: str, weights: str | None) -> Any:
    """An open_clip teacher re-expressed as a student (same config and weights), to inherit from (TinyCLIP)."""
    import open_clip
    from open_clip.model import convert_to_custom_text_state_dict

    from students import CLIPStudent, StudentCfg
    from teachers import WeightSpec, create_teacher

    t = create_teacher(name, weights=WeightSpec(file=weights) if weights else None)
    model = getattr(t, "model", None)
    arch = getattr(t.cfg, "arch", None)
    model_cfg = open_clip.get_model_config(arch) if arch else None
    if model is None or model_cfg is None:
        raise ValueError(
            f"--inherit.source teacher: {name} is not a single open_clip teacher; pass a saved student "
            "directory to --inherit.source instead"
        )
    student = CLIPStudent(StudentCfg.from_open_clip(model_cfg, name=f"teacher:{name}"))
    state = model.state_dict()
    if "positional_embedding" in state:  # CLIP (non-custom-text) key layout -> CustomTextCLIP's `text.*`
        state = convert_to_custom_text_state_dict(state)
    student.load_state_dict(state, strict=False)
    return student


def _checkpoint_student_cfg(path: str) -> dict | None:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (ckpt.get("hyper_parameters") or {}).get("student_cfg")


def _callbacks(args: TrainerArgs, root: Path) -> tuple[list, Any]:
    import pytorch_lightning as pl

    every = args.checkpoint_every_n_steps or max(50, args.max_steps // 10)
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=root / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_last=True,
        save_top_k=1,
        monitor=None,
    )
    cbs: list = [ckpt, pl.callbacks.LearningRateMonitor(logging_interval="step")]
    if args.ema_decay is not None:
        from distill.callbacks import StudentEMA

        cbs.append(StudentEMA(args.ema_decay))
    return cbs, ckpt


def _resume_path(resume: str, root: Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        last = root / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--trainer.resume {resume}: no such checkpoint")
    return str(path)


def _device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def steps_for(samples: int, batch_size: int) -> int:
    """Steps needed to see `samples` samples at `batch_size` (helper for recipes)."""
    return max(1, math.ceil(samples / batch_size))
