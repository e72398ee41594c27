"""`distill train --student S [--teacher T]`: train a CLIP student with PyTorch Lightning.

Modes (chosen automatically from the data and `--teacher`, or forced with `--mode`):
- reinforced: shards from `distill build-data`; stored teacher embeddings are the targets, no teacher runs
  (MobileCLIP's multi-modal reinforced training).
- online: plain image-caption data and a live, frozen teacher (open_clip distillation, TinyCLIP).
- scratch: plain data, no teacher, CLIP contrastive loss (also how the demo trains its own tiny teacher).
Weight inheritance (TinyCLIP manual, or automatic L0 pruning) initialises the student from a larger model.
Outputs in `--trainer.default_root_dir`: Lightning checkpoints (exact resume), CSV/TensorBoard logs, the final
student in open_clip layout (`student/`), and `run.json` (config, versions, data fingerprint, metrics).
A run directory holds one run: resume checks the run identity (`distill.run_dir`, docs/GUARANTEES.md); SIGTERM
and Ctrl-C save a checkpoint of the current step and exit 128 + the signal number.

`train` reads as its table of contents: resolve (mode, data, run directory, checkpoint to resume), build
(student, objective, data, Lightning system, trainer), fit, finalize (save the student and run.json).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import open_clip
import pytorch_lightning as pl
import torch
from open_clip.model import convert_to_custom_text_state_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from distill.args import DataArgs, EvalArgs, InheritArgs, LockArgs, LossArgs, OptimArgs, TrainerArgs
from distill.callbacks import L0PruningCallback, SignalCheckpoint, StudentEMA, Throughput
from distill.curves import plot_learning_curves
from distill.data import DataSpec, DistillDataModule, resolve_data
from distill.logs import current_verbosity
from distill.losses import DistillLoss
from distill.module import DistillModule
from distill.progress import progress_callbacks
from distill.run_dir import (
    IDENTITY_KEY,
    AtomicCheckpointIO,
    HistoryCSVLogger,
    ResumePoint,
    check_schedule_change,
    default_run_dir,
    find_resume_point,
)
from mcd_common import UsageError
from mcd_common.files import atomic_write_json, git_sha
from mcd_common.jsonfmt import round_floats
from students import (
    CLIPStudent,
    InheritReport,
    StudentCfg,
    build_student,
    create_student,
    inherit_weights,
    load_student,
    lock_student,
    save_student,
)
from students.published import copy_student_weights
from teachers import TeacherEnsemble, WeightSpec, as_ensemble, create_teacher

_logger = logging.getLogger(__name__)

__all__ = ["DEPRECATED_FLAGS", "build_loss", "train", "validation_metrics"]

# NOTE: the old spellings of the retrieval set's captions and split files (now named as in --data.*), accepted for
# one release by distill.cli (flags and --config keys).
DEPRECATED_FLAGS: dict[str, str] = {
    "--val.retrieval_captions": "--val.captions",
    "--val.retrieval_split_file": "--val.split_file",
}

Mode = Literal["reinforced", "online", "scratch"]

_PRESETS: dict[str, dict[str, float]] = {
    "mobileclip": {"contrastive_weight": 0.0, "kd_weight": 1.0, "fd_weight": 0.0, "icl_weight": 0.0},
    "mobileclip_b": {"contrastive_weight": 0.25, "kd_weight": 0.75, "fd_weight": 0.0, "icl_weight": 0.0},
    "tinyclip": {"contrastive_weight": 0.0, "kd_weight": 1.0, "fd_weight": 0.0, "icl_weight": 0.0},
    "clip_kd": {"contrastive_weight": 1.0, "kd_weight": 1.0, "fd_weight": 2000.0, "icl_weight": 1.0},
    "contrastive": {"contrastive_weight": 1.0, "kd_weight": 0.0, "fd_weight": 0.0, "icl_weight": 0.0},
}
_VERSIONED = ("torch", "timm", "open_clip_torch", "pytorch-lightning", "webdataset", "transformers")


def build_loss(
    args: LossArgs,
    *,
    has_teacher: bool,
    teacher_scales: dict[str, float],
    teacher_dims: dict[str, int],
    student_dim: int,
) -> tuple[DistillLoss, dict[str, object]]:
    """Resolve the preset and overrides into a `DistillLoss`.

    Returns:
        The loss module and a plain dict describing it (weights, scales) for run.json.

    Raises:
        UsageError: a distillation preset or weight without a teacher, or every weight 0.
    """
    preset = _preset(args, has_teacher)
    if preset != "contrastive" and not has_teacher:
        raise UsageError(f"--loss.preset {preset} distils from a teacher: pass --teacher or reinforced data")
    weights = dict(_PRESETS[preset])
    for key in weights:
        override = getattr(args, key)
        if override is not None:
            weights[key] = override
    needs_teacher = [k for k in ("kd_weight", "fd_weight", "icl_weight") if weights[k] > 0]
    if needs_teacher and not has_teacher:
        raise UsageError(f"--loss.{needs_teacher[0]} > 0 distils from a teacher: pass --teacher or reinforced data")
    if not any(weights.values()):
        raise UsageError(
            f"--loss.preset {preset} with these --loss.*_weight overrides leaves every term at 0: nothing to train"
        )
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
    desc = {"preset": preset, **weights, "caption_weight": args.caption_weight, "teacher_logit_scales": scales}
    return loss, {**desc, "freeze_student_logit_scale": freeze}


def _preset(args: LossArgs, has_teacher: bool) -> str:
    if args.preset == "auto":
        return "mobileclip" if has_teacher else "contrastive"
    return args.preset


@dataclass
class _Run:
    """What `train` resolved before building anything: the data, the mode, the run and where it resumes."""

    mode: Mode
    spec: DataSpec
    model: CLIPStudent
    """The student as requested (before a resumed checkpoint's pruning or automatic inheritance)."""
    identity: dict[str, object]
    root: Path
    resume: ResumePoint | None

    @property
    def ckpt_path(self) -> str | None:
        return str(self.resume.path) if self.resume is not None else None


@dataclass
class _Objective:
    """The targets and the loss: a live teacher (online mode only), the loss module and its run.json description."""

    teacher: TeacherEnsemble | None
    loss: DistillLoss
    desc: dict[str, object]


# Over 80 lines on purpose: the signature and docstring are the flag reference of `distill train`; the body (~55
# lines) is the four phases resolve -> build -> fit -> finalize, each a call into the helpers below.
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
    lock: LockArgs = LockArgs(),
    student_weights: str | None = None,
    teacher_weights: str | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
    hf_text_dir: str | None = None,
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
        lock: Freeze the image and/or text tower (LiT-style), optionally but their last layer groups.
        student_weights: Initialise the student from these weights (saved student dir, safetensors or .ckpt).
        teacher_weights: Local weights file for a registered (hub) teacher in online mode.
        image_size: Override the student's input resolution.
        context_length: Override the student's text context length.
        hf_text_dir: Local Hugging Face encoder directory of a student with a pretrained text tower (`vit_minilm`,
            `test_tiny_hf`): its config, tokenizer and pretrained weights (e.g. a sentence-transformers model).

    Returns:
        A summary: output paths, steps, wall time, throughput and final validation metrics.
    """
    t0 = time.time()
    groups = {"data": data, "loss": loss, "optim": optim, "trainer": trainer, "inherit": inherit, "val": val}
    groups["lock"] = lock
    config = {"student": student, "teacher": teacher, "mode": mode, "image_size": image_size}
    config |= {"context_length": context_length, "hf_text_dir": hf_text_dir}
    config |= {k: asdict(v) for k, v in groups.items()}
    pl.seed_everything(trainer.seed, workers=True)
    # resolve
    _check_paths(student, student_weights, teacher_weights)
    model = _requested_student(student, image_size, context_length, hf_text_dir)
    run = _resolve(student, model, mode, teacher, teacher_weights, data, loss, trainer, inherit, lock)
    if run.resume is not None:
        check_schedule_change(run.resume, max_steps=trainer.max_steps, optim=asdict(optim))  # warns on a change
    # build
    model, inherit_report = _build_student(run, teacher, inherit, student_weights, teacher_weights)
    lock_report = lock_student(model, **asdict(lock))  # --lock.* (students.lock): before the optimizer sees them
    _log_parameters(model)
    objective = _build_objective(run, loss, teacher, teacher_weights, model.embed_dim)
    dm = DistillDataModule(
        run.spec, data, model, mode=run.mode, seed=trainer.seed, val=val, accumulate=trainer.accumulate_grad_batches
    )
    hparams = {"student_cfg": model.cfg.to_dict(), "student": student, "teacher_name": teacher, "mode": run.mode}
    hparams |= {"loss": objective.desc, "data": asdict(data), "trainer": asdict(trainer), IDENTITY_KEY: run.identity}
    hparams["schema_version"] = run.spec.schema_version
    _check_save_best(trainer, dm)
    module = _build_module(model, objective, dm, optim, loss, trainer, hparams)
    callbacks = _callbacks(trainer, inherit, run.root, dm.samples_per_step)
    quiet = current_verbosity() < 0  # -q: results and errors only
    progress, show_bar = progress_callbacks(trainer.enable_progress_bar and not quiet)  # TTY: a bar; else log lines
    callbacks += progress
    if not quiet and not sys.stdout.isatty():
        # Lightning's default model summary is a Rich table printed on stdout, into log files too; the plain one
        # logs at INFO (shown with -v; _log_parameters logs the counts)
        callbacks.append(pl.callbacks.ModelSummary())
    pl_trainer = _build_trainer(trainer, run, callbacks, show_bar, quiet=quiet)
    # fit
    fit_t0 = time.time()
    interrupted = _fit(pl_trainer, module, dm, run, callbacks)
    # finalize
    summary = _summary(run, pl_trainer, callbacks, objective, student, teacher, time.time() - fit_t0)
    if inherit_report is not None:
        summary["inheritance"] = inherit_report.summary()
    pruner_cb = _one(callbacks, L0PruningCallback)
    if pruner_cb is not None:
        summary["pruning"] = pruner_cb.report  # per-stage sparsity, parameter counts and time (docs/L0.md)
    if lock_report:
        summary["lock"] = lock_report
    summary["data"] = dm.data_stats()  # samples indexed / usable / skipped by reason (distill.data)
    if interrupted is not None:
        summary["interrupted"] = signal.Signals(interrupted).name
    if pl_trainer.is_global_zero:
        _save_outputs(run, module, callbacks, summary, config, model.cfg, t0, save_model=interrupted is None)
    if interrupted is not None:
        raise SystemExit(128 + interrupted)
    return summary


# ------------------------------------------------------------------------------------------------------- resolve


def _looks_like_path(name: str) -> bool:
    return name.startswith(("local-dir:", ".", "~", "/")) or os.sep in name


def _check_paths(student: str, student_weights: str | None, teacher_weights: str | None) -> None:
    """Paths the user typed exist (before anything is built), each error naming its flag."""
    if _looks_like_path(student) and not Path(student.removeprefix("local-dir:")).expanduser().exists():
        raise UsageError(f"--student {student}: no such directory (a saved student directory or a registered name)")
    for flag, value in (("--student_weights", student_weights), ("--teacher_weights", teacher_weights)):
        if value and not Path(value).expanduser().exists():
            raise UsageError(f"{flag} {value}: no such file or directory")


def _requested_student(
    student: str, image_size: int | None, context_length: int | None, hf_text_dir: str | None
) -> CLIPStudent:
    src = Path(student.removeprefix("local-dir:")).expanduser()
    if src.exists():
        return load_student(src)
    return create_student(student, image_size=image_size, context_length=context_length, hf_model_dir=hf_text_dir)


def _resolve(
    student: str,
    model: CLIPStudent,
    mode: str,
    teacher: str | None,
    teacher_weights: str | None,
    data: DataArgs,
    loss: LossArgs,
    trainer: TrainerArgs,
    inherit: InheritArgs,
    lock: LockArgs,
) -> _Run:
    """The data and the mode it implies, the run's identity, its directory and the checkpoint it resumes."""
    if (lock.image or lock.text) and inherit.source and inherit.mode == "auto":
        raise UsageError("--lock.* cannot be combined with --inherit.mode auto (pruning rebuilds the towers)")
    spec = resolve_data(data)
    if mode == "auto":
        mode = "reinforced" if spec.reinforced else ("online" if teacher else "scratch")
    if mode == "reinforced" and not spec.reinforced:
        raise UsageError(f"--mode reinforced needs shards written by `distill build-data`; {spec.describe()} has none")
    if mode == "online" and not teacher:
        raise UsageError("--mode online needs --teacher")
    if mode == "scratch" and teacher:
        _logger.warning("--mode scratch ignores --teacher %s", teacher)
    identity = _identity(student, model, mode, teacher, teacher_weights, spec, data, loss, trainer, inherit)
    if lock.image or lock.text:
        # NOTE: other locked tensors mean other optimizer groups: Lightning could not restore the optimizer state
        identity["lock"] = asdict(lock)
    if trainer.default_root_dir:
        root = Path(trainer.default_root_dir).expanduser()
    else:
        root = default_run_dir(identity, model.cfg.name, mode)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--trainer.default_root_dir {root}: is a file, not a directory; pass a directory")
    resume = find_resume_point(trainer.resume, root, identity)
    _logger.info("run directory: %s (%s)", root, f"resuming {resume.path}" if resume else "new run")
    return _Run(mode=mode, spec=spec, model=model, identity=identity, root=root, resume=resume)


def _identity(
    student: str,
    model: CLIPStudent,
    mode: str,
    teacher: str | None,
    teacher_weights: str | None,
    spec: DataSpec,
    data: DataArgs,
    loss: LossArgs,
    trainer: TrainerArgs,
    inherit: InheritArgs,
) -> dict[str, object]:
    """What makes a run this run: resuming a checkpoint with another identity would silently mix two runs."""
    if mode == "online":
        teacher_id: str | None = teacher + (f" ({Path(teacher_weights).resolve()})" if teacher_weights else "")
    elif mode == "reinforced":
        teacher_id = ",".join(sorted(spec.teacher_dims()))  # the shards' teachers, whatever --teacher says
    else:
        teacher_id = None
    src = Path(student.removeprefix("local-dir:")).expanduser()
    return {
        "student": str(src.resolve()) if src.exists() else student,
        "student_cfg": model.cfg.to_dict(),
        "mode": mode,
        "loss_preset": _preset(loss, has_teacher=mode != "scratch"),
        "teacher": teacher_id,
        "data_path": os.path.abspath(os.path.expanduser(data.path)) if data.path else f"embedded:{spec.source}",
        "data_fingerprint": spec.fingerprint(),
        "image_size": model.image_size,
        "context_length": model.context_length,
        "inherit": f"{inherit.mode}:{inherit.source}" if inherit.source else None,
        "seed": trainer.seed,
    }


# --------------------------------------------------------------------------------------------------------- build


def _build_student(
    run: _Run, teacher: str | None, inherit: InheritArgs, student_weights: str | None, teacher_weights: str | None
) -> tuple[CLIPStudent, InheritReport | None]:
    """The student to train (as requested, or as pruned in the checkpoint), and the manual-inheritance report."""
    model = run.model
    resumed_cfg = run.resume.hparams.get("student_cfg") if run.resume is not None else None
    if isinstance(resumed_cfg, dict) and resumed_cfg != model.cfg.to_dict():
        # The checkpoint holds a structurally different student (pruned by automatic inheritance): rebuild it.
        _logger.info("resuming a pruned student: %s", resumed_cfg.get("name"))
        model = build_student(StudentCfg.from_dict(resumed_cfg))
    if student_weights:
        copy_student_weights(model, load_student(Path(student_weights)))  # keeps Apple's ViT-B variant
    if not inherit.source or run.resume is not None:
        return model, None
    source = _inherit_source(inherit.source, teacher, teacher_weights)
    if inherit.mode == "auto":
        # Automatic inheritance starts from the (larger) source model itself and learns what to remove;
        # --student then only names the run.
        return source.train(), None
    report = inherit_weights(model, source.state_dict(), source_cfg=source.cfg)
    _logger.info("weight inheritance: %s", report.summary())
    return model, report


def _inherit_source(source: str, teacher: str | None, teacher_weights: str | None) -> CLIPStudent:
    """The model weights are inherited from: a saved student / checkpoint, or the (open_clip) teacher itself."""
    if source == "teacher":
        if not teacher:
            raise UsageError("--inherit.source teacher needs --teacher")
        path = Path(teacher.removeprefix("local-dir:")).expanduser()
        return load_student(path) if path.exists() else _teacher_as_student(teacher, teacher_weights)
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if not path.exists():
        raise UsageError(f"--inherit.source {source}: no such student directory or checkpoint")
    return load_student(path)


def _teacher_as_student(name: str, weights: str | None) -> CLIPStudent:
    """An open_clip teacher re-expressed as a student (same config and weights), to inherit from (TinyCLIP)."""
    t = create_teacher(name, weights=WeightSpec(file=weights) if weights else None)
    model = getattr(t, "model", None)  # NOTE: only single open_clip teachers wrap an open_clip model
    arch = getattr(t.cfg, "arch", None)
    model_cfg = open_clip.get_model_config(arch) if arch else None
    if model is None or model_cfg is None:
        raise UsageError(
            f"--inherit.source teacher: {name} is not a single open_clip teacher; pass a saved student "
            "directory to --inherit.source instead"
        )
    student = build_student(StudentCfg.from_open_clip(model_cfg, name=f"teacher:{name}"))
    state = model.state_dict()
    if "positional_embedding" in state:  # CLIP (non-custom-text) key layout -> CustomTextCLIP's `text.*`
        state = convert_to_custom_text_state_dict(state)
    student.load_state_dict(state, strict=False)
    return student


def _build_objective(
    run: _Run, args: LossArgs, teacher: str | None, teacher_weights: str | None, student_dim: int
) -> _Objective:
    """Targets (a live teacher online, the shards' teachers reinforced, none scratch) and the loss over them."""
    live = None
    if run.mode == "online":
        weights = WeightSpec(file=teacher_weights) if teacher_weights else None
        live = as_ensemble(create_teacher(teacher, weights=weights))
        scales, dims = dict(live.logit_scales), dict(live.embed_dims)
    elif run.mode == "reinforced":
        scales, dims = run.spec.teacher_scales(), run.spec.teacher_dims()
        if teacher:
            run.spec.check_teacher(teacher)
    else:
        scales, dims = {}, {}
    has_teacher = run.mode != "scratch"
    loss, desc = build_loss(
        args, has_teacher=has_teacher, teacher_scales=scales, teacher_dims=dims, student_dim=student_dim
    )
    return _Objective(teacher=live, loss=loss, desc=desc)


def _log_parameters(model: CLIPStudent) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("student %s: %.2f M parameters, %.2f M trainable", model.cfg.name, total / 1e6, trainable / 1e6)


def validation_metrics(zeroshot: bool, retrieval: bool) -> list[str]:
    """The metrics validation logs (`DistillModule.on_validation_epoch_end`) with a zero-shot and/or a retrieval
    set."""
    names = ["val/zeroshot_top1"] if zeroshot else []
    if retrieval:
        names += [f"val/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]  # distill.evaluate.retrieval_metrics
    return names


def _check_save_best(trainer: TrainerArgs, dm: DistillDataModule) -> None:
    """`--trainer.save_best` names a metric validation logs (a typo would fail only at the first validation)."""
    if trainer.save_best is None:
        return
    logged = validation_metrics(dm.zeroshot_set is not None, dm.retrieval_set is not None)
    if not logged:
        raise UsageError(
            f"--trainer.save_best {trainer.save_best}: this run has no validation set; pass --val.retrieval "
            "and/or --val.zeroshot"
        )
    if trainer.save_best not in logged:
        raise UsageError(f"--trainer.save_best {trainer.save_best}: validation logs {', '.join(logged)}")
    if trainer.val_check_interval is None:
        _logger.warning(
            "--trainer.save_best %s with validation only at the end keeps the final checkpoint; pass "
            "--trainer.val_check_interval N to validate (and keep the best) every N steps",
            trainer.save_best,
        )


def _build_module(
    model: CLIPStudent,
    objective: _Objective,
    dm: DistillDataModule,
    optim: OptimArgs,
    loss: LossArgs,
    trainer: TrainerArgs,
    hparams: dict[str, object],
) -> DistillModule:
    module = DistillModule(
        model,
        objective.teacher,
        objective.loss,
        optim,
        max_steps=trainer.max_steps,
        channels_last=trainer.channels_last,
        freeze_logit_scale=objective.desc["freeze_student_logit_scale"],
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
    return module


def _callbacks(args: TrainerArgs, inherit: InheritArgs, root: Path, samples_per_step: int) -> list[pl.Callback]:
    every = args.checkpoint_every_n_steps or max(50, args.max_steps // 10)
    cbs: list[pl.Callback] = [
        pl.callbacks.ModelCheckpoint(
            dirpath=root / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_last=True,
            save_top_k=1,
            monitor=None,
        ),
        pl.callbacks.LearningRateMonitor(logging_interval="step"),
        Throughput(samples_per_step),
        SignalCheckpoint(root / "checkpoints" / "last.ckpt"),
    ]
    if args.save_best is not None:
        # checkpoints/best.ckpt, rewritten (atomically, by AtomicCheckpointIO) whenever validation beats its best
        cbs.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=root / "checkpoints",
                filename="best",
                monitor=args.save_best,
                mode="max",  # NOTE: every validation metric (top-1, Recall@K) is higher-is-better
                save_top_k=1,
                save_last=False,
                auto_insert_metric_name=False,
                enable_version_counter=False,  # NOTE: a resumed run overwrites best.ckpt, never writes best-v1.ckpt
            )
        )
    if args.ema_decay is not None:
        cbs.append(StudentEMA(args.ema_decay))
    if inherit.source and inherit.mode == "auto":
        cbs.append(L0PruningCallback(inherit, max_steps=args.max_steps))
    return cbs


def _build_trainer(
    args: TrainerArgs, run: _Run, callbacks: list[pl.Callback], show_bar: bool, *, quiet: bool = False
) -> pl.Trainer:
    root = run.root
    loggers = [
        HistoryCSVLogger(root, start_step=run.resume.global_step if run.resume else 0),
        pl.loggers.TensorBoardLogger(root, name="tb", version=""),
    ]
    return pl.Trainer(
        max_steps=args.max_steps,
        precision=args.precision,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.gradient_clip_val,
        val_check_interval=args.val_check_interval or args.max_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=args.log_every_n_steps,
        default_root_dir=root,
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_bar,
        enable_model_summary=not quiet,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # NOTE: our resumable sampler shards by rank itself
        deterministic=False,
    )


# ----------------------------------------------------------------------------------------------------------- fit


def _fit(
    pl_trainer: pl.Trainer, module: DistillModule, dm: DistillDataModule, run: _Run, callbacks: list[pl.Callback]
) -> int | None:
    """Run Lightning's fit; returns the signal number when SIGTERM/SIGINT stopped it (after saving a checkpoint)."""
    guard = _one(callbacks, SignalCheckpoint)
    try:
        # NOTE: weights_only=True: resume never unpickles (our checkpoint I/O enforces it too).
        pl_trainer.fit(module, datamodule=dm, ckpt_path=run.ckpt_path, weights_only=True)
    except SIGTERMException:
        return guard.signum or signal.SIGTERM
    finally:
        guard.restore()  # NOTE: Lightning's own teardown re-installs the handlers it found, ours included
    return None


# ------------------------------------------------------------------------------------------------------ finalize


def _one(callbacks: list[pl.Callback], kind: type[pl.Callback]) -> pl.Callback | None:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def _summary(
    run: _Run,
    pl_trainer: pl.Trainer,
    callbacks: list[pl.Callback],
    objective: _Objective,
    student: str,
    teacher: str | None,
    fit_seconds: float,
) -> dict[str, object]:
    speed = _one(callbacks, Throughput)
    summary: dict[str, object] = {
        "out": str(run.root),
        "mode": run.mode,
        "student": student,
        "teacher": teacher,
        "steps": int(pl_trainer.global_step),
        "resumed_from": run.ckpt_path,
        "fit_seconds": round(fit_seconds, 2),
        "samples_per_second": round(speed.samples_per_second, 2) if speed.samples_per_second else None,
        "metrics": {k: float(v) for k, v in pl_trainer.callback_metrics.items() if k.startswith("val/")},
        "loss": objective.desc,
    }
    best = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor), None)
    if best is not None:  # --trainer.save_best
        summary["best_metric"] = best.monitor
        summary["best_checkpoint"] = best.best_model_path or None
        summary["best_score"] = float(best.best_model_score) if best.best_model_score is not None else None
    return summary


def _final_student(module: DistillModule, callbacks: list[pl.Callback]) -> nn.Module:
    """The model to save: the EMA average when kept, else the trained student."""
    ema = _one(callbacks, StudentEMA)
    if ema is not None and ema.averaged_student is not None:
        return ema.averaged_student
    return module.student


def _save_outputs(
    run: _Run,
    module: DistillModule,
    callbacks: list[pl.Callback],
    summary: dict[str, object],
    config: dict[str, object],
    student_cfg: StudentCfg,
    t0: float,
    *,
    save_model: bool,
) -> None:
    """Rank zero: the final student in open_clip layout (not for an interrupted run) and run.json."""
    if save_model:
        save_student(_final_student(module, callbacks), run.root / "student")
        summary["student_dir"] = str(run.root / "student")
        summary["checkpoint"] = _one(callbacks, pl.callbacks.ModelCheckpoint).last_model_path or None
    else:
        summary["checkpoint"] = str(_one(callbacks, SignalCheckpoint).last_path)
    record = {
        **summary,
        "config": config,
        "identity": run.identity,
        "student_cfg": student_cfg.to_dict(),
        "data_fingerprint": run.spec.fingerprint(),
        "versions": _versions(),
        "git_sha": git_sha(),
        "device": _device_label(),
        "wall_seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(run.root / "run.json", round_floats(record))
    metrics_csv = run.root / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        plot_learning_curves(metrics_csv)  # logs/curves.png: loss terms, validation metrics, learning rate


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
