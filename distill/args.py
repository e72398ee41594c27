"""Run-argument groups of `distill train` and `distill eval` (litgpt `args.py` style).

Each dataclass becomes a `--group.field` flag group through jsonargparse; attribute docstrings are the `--help`
text, and `__post_init__` validates values, raising `mcd_common.UsageError` that names the flag (the CLI prints
it and exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcd_common import UsageError

__all__ = ["DataArgs", "EvalArgs", "InheritArgs", "LockArgs", "LossArgs", "OptimArgs", "TrainerArgs"]


@dataclass
class TrainerArgs:
    """A curated subset of `pytorch_lightning.Trainer` arguments."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    """Lightning precision; `bf16-mixed` on GPUs."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """Lightning accelerator."""
    devices: int | str = "auto"
    """Devices per node (an int, "auto", or a list string such as "0,1")."""
    num_nodes: int = 1
    """Nodes (multi-node DDP/FSDP under torchrun or SLURM)."""
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "fsdp", "deepspeed"] = "auto"
    """Lightning strategy."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation (the effective batch is batch_size x this x devices x nodes)."""
    gradient_clip_val: float | None = 1.0
    """Clip the global gradient norm (MobileCLIP: 1.0; TinyCLIP: 5.0); null disables."""
    val_check_interval: int | None = None
    """Run zero-shot/retrieval validation every N steps (null: only at the end)."""
    log_every_n_steps: int = 10
    """Logging interval in steps."""
    checkpoint_every_n_steps: int | None = None
    """Save a resumable checkpoint every N steps (null: max(50, max_steps // 10))."""
    default_root_dir: str | None = None
    """Output directory: checkpoints, logs, the final student and run.json. null: `runs/<student>-<mode>-<hash of
    the run identity>`, so rerunning the same command resumes it and a changed run gets a directory of its own."""
    seed: int = 0
    """Global seed (model init, data order, augmentation sampling)."""
    compile: bool = False
    """`torch.compile` the student (GPU speed-up; slow to warm up on CPU)."""
    channels_last: bool = False
    """Run the image tower in channels-last memory format (faster convs on GPU)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); null disables."""
    resume: Literal["auto", "never"] | str = "auto"
    """`auto`: resume from the newest readable checkpoint in the run directory (last.ckpt, step*.ckpt, SLURM
    hpc_ckpt_*.ckpt) if it belongs to the same run (student, mode, loss preset, data, image size, teacher, seed),
    else refuse; `never`: start over; or a .ckpt path (checked the same way)."""
    enable_progress_bar: bool = True
    """Show Lightning's progress bar."""
    save_best: str | None = None
    """Also keep `checkpoints/best.ckpt`, the checkpoint that scored best on this validation metric (e.g.
    `val/t2i_R@1`, `val/zeroshot_top1`; higher is better), beside last.ckpt; null keeps only last.ckpt."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise UsageError(f"--trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.accumulate_grad_batches < 1:
            raise UsageError(f"--trainer.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"--trainer.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.save_best is not None and not self.save_best.startswith("val/"):
            raise UsageError(
                f"--trainer.save_best {self.save_best}: name a validation metric, e.g. val/t2i_R@1 or val/zeroshot_top1"
            )


@dataclass
class OptimArgs:
    """AdamW with linear warm-up and cosine decay (MobileCLIP recipe defaults)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.2
    """Decoupled weight decay, applied only to >= 2-D parameters (no biases, norms, logit scale)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (MobileCLIP: beta2 0.95)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 1000
    """Linear warm-up steps (clipped to max_steps // 5 on short runs)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise UsageError(f"--optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise UsageError(f"--optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class DataArgs:
    """Training data. Reinforced shards (built by `distill build-data`) train without a teacher; plain image-caption
    data (webdataset shards, an image folder + captions file, or the embedded corpus) trains online or from scratch."""

    path: str | None = None
    """Reinforced dataset root or shards, plain shards (brace patterns allowed), an image folder, or null for the
    embedded shapes corpus."""
    captions: str | None = None
    """Captions file (CSV `image,caption` or JSONL) when `path` is an image folder."""
    split_file: str | None = None
    """Images to keep, one name per line (e.g. flickr8k splits/train.txt)."""
    batch_size: int = 256
    """Per-device batch size (affinity losses want many negatives: >= 128 recommended)."""
    num_workers: int = 2
    """DataLoader worker processes (decode + augmentation replay)."""
    use_syn: bool = True
    """Add one synthetic caption per sample (MobileCLIP default) when the shards have them."""
    p_syn_swap: float = 0.0
    """Instead replace the real caption with a synthetic one with this probability (0 = off)."""
    augment: bool = True
    """Scratch/online mode: sample DR-style RandomResizedCrop + RandAugment on the fly."""
    rrc_scale_min: float = 0.08
    """Scratch/online mode: smallest RandomResizedCrop area fraction."""
    teacher_dims: tuple[int, ...] | None = None
    """Per-teacher embedding dims for DataCompDR shards without teach.json (e.g. [768, 768])."""
    trust_pickle: bool = False
    """Allow reading `pth.gz` (pickle) embeddings. Pickles run code: only for data you trust."""
    corpus_dir: str = "~/.cache/mobileclip-distill/shapes"
    """Where the embedded corpus is generated when `path` is null."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.p_syn_swap <= 1.0:
            raise UsageError(f"--data.p_syn_swap must be in [0, 1], got {self.p_syn_swap}")
        if not 0.0 < self.rrc_scale_min <= 1.0:
            raise UsageError(f"--data.rrc_scale_min must be in (0, 1], got {self.rrc_scale_min}")


@dataclass
class LossArgs:
    """Loss weights. `preset` fills the weights a recipe uses; explicit weights override it."""

    preset: Literal["auto", "mobileclip", "mobileclip_b", "tinyclip", "clip_kd", "contrastive"] = "auto"
    """auto: `mobileclip` with a teacher (or reinforced data), `contrastive` without. `mobileclip`: w_con 0, w_kd 1.
    `mobileclip_b`: 0.25/0.75. `tinyclip`: affinity mimicking at scale 50, student scale frozen at 50.
    `clip_kd`: contrastive 1 + feature KD 2000 + ICL 1 + KD at each model's own scale. `contrastive`: CLIP only."""
    contrastive_weight: float | None = None
    """w_con override."""
    kd_weight: float | None = None
    """w_kd (MobileCLIP affinity KD) override."""
    fd_weight: float | None = None
    """CLIP-KD feature-distillation weight override (recipe: 2000)."""
    icl_weight: float | None = None
    """CLIP-KD interactive contrastive weight override (recipe: 1)."""
    teacher_logit_scale: float | None = None
    """Override every teacher's KD logit scale (MobileCLIP v1: 100; TinyCLIP: 50)."""
    freeze_student_logit_scale: float | None = None
    """Fix the student's logit scale to this value (TinyCLIP: 50); null keeps it learnable (clamped at 100)."""
    caption_weight: float = 2.0
    """Weight of the captioning loss of CoCa students (open_clip's `--coca-caption-loss-weight`)."""

    def __post_init__(self) -> None:
        for name in ("contrastive_weight", "kd_weight", "fd_weight", "icl_weight", "caption_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--loss.{name} must be >= 0, got {value}")


@dataclass
class InheritArgs:
    """TinyCLIP weight inheritance: initialise the student from a larger model of the same family."""

    source: str | None = None
    """A saved student directory / .ckpt, or `teacher` to inherit from the live teacher's weights (it must be a
    student-format open_clip model). null: no inheritance."""
    mode: Literal["manual", "auto"] = "manual"
    """manual: uniform layer selection + front slicing. auto: start from the source itself and learn L0 masks that
    prune it to the target sparsity (then continue training the pruned model)."""
    target_sparsity: float = 0.5
    """auto: fraction of the ORIGINAL model's prunable weights (attention + MLP of the transformer layers, both
    towers) removed at the end of this stage (TinyCLIP stages: 0.25, 0.5, 0.75)."""
    start_sparsity: float = 0.0
    """auto: how sparse --inherit.source already is relative to the original model: the previous stage's target in
    a progressive schedule (TinyCLIP's --start-sparsity), 0 when the source is the original."""
    sparsity_warmup_steps: int | None = None
    """auto: steps of the linear target ramp from start_sparsity (null: TinyCLIP's 1000, or prune_step // 3 when
    that is shorter)."""
    prune_step: int | None = None
    """auto: step at which the masks are made hard and the model is pruned (null: TinyCLIP's 3000, or
    max_steps // 2 on shorter runs; TinyCLIP's later stages prune at 5000 and 8000)."""
    mask_lr: float = 0.02
    """auto: AdamW learning rate of the mask parameters (the Lagrange multipliers are maximised at the same rate,
    TinyCLIP's -0.02). A gate needs about 9.2 / mask_lr steps to close."""
    constraint: Literal["two_sided", "lower"] = "two_sided"
    """auto: two_sided penalises any gap to the ramped target, so a stage cannot overshoot; lower is TinyCLIP's
    one-sided max(0, target - expected)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise UsageError(f"--inherit.target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if not 0.0 <= self.start_sparsity < self.target_sparsity:
            raise UsageError(
                f"--inherit.start_sparsity must be in [0, --inherit.target_sparsity={self.target_sparsity}), "
                f"got {self.start_sparsity}"
            )
        if self.sparsity_warmup_steps is not None and self.sparsity_warmup_steps < 0:
            raise UsageError(f"--inherit.sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")
        if self.prune_step is not None and self.prune_step < 1:
            raise UsageError(f"--inherit.prune_step must be >= 1, got {self.prune_step}")
        if self.mask_lr <= 0:
            raise UsageError(f"--inherit.mask_lr must be > 0, got {self.mask_lr}")


@dataclass
class LockArgs:
    """LiT-style tower locking (open_clip's `--lock-image*` / `--lock-text*`; `students.lock`). Frozen weights are
    left out of the optimizer (so also out of weight decay); a resumed run applies the same flags again."""

    image: bool = False
    """Freeze the image tower (open_clip `--lock-image`)."""
    image_unlocked_groups: int = 0
    """Leave the last N layer groups of the image tower trainable (`--lock-image-unlocked-groups`)."""
    image_freeze_bn_stats: bool = False
    """Keep the locked image layers in eval mode: BatchNorm statistics frozen (`--lock-image-freeze-bn-stats`)."""
    text: bool = False
    """Freeze the text tower (open_clip `--lock-text`); its locked layers always run in eval mode (no dropout)."""
    text_unlocked_layers: int = 0
    """Leave the last N layer groups of the text tower trainable (`--lock-text-unlocked-layers`)."""
    text_freeze_layer_norm: bool = True
    """Also freeze the LayerNorm weights of the locked text layers (`--lock-text-freeze-layer-norm`; open_clip's
    flag is off by default, its function's default is on)."""

    def __post_init__(self) -> None:
        if self.image_unlocked_groups < 0:
            raise UsageError(f"--lock.image_unlocked_groups must be >= 0, got {self.image_unlocked_groups}")
        if self.text_unlocked_layers < 0:
            raise UsageError(f"--lock.text_unlocked_layers must be >= 0, got {self.text_unlocked_layers}")


@dataclass
class EvalArgs:
    """Evaluation sets used by `distill eval` and by periodic validation during training."""

    zeroshot: str | None = None
    """Image-folder classification set (`<root>/<class name>/*.jpg`, e.g. cifar10/test); null skips."""
    templates: tuple[str, ...] | None = None
    """Prompt templates with `{}` for the class name; null: the set's own (`corpus.json`) or CLIP's ensemble."""
    retrieval: str | None = None
    """Image-caption set for image<->text retrieval: shards, a directory holding `images/` + `captions.csv`
    (flickr8k), or an image folder with `captions`."""
    captions: str | None = None
    """Captions file (CSV `image,caption` or JSONL) of the retrieval set when `retrieval` is an image folder (was
    `retrieval_captions`)."""
    split_file: str | None = None
    """Images of the retrieval set to keep, one name per line (e.g. flickr8k splits/test.txt; was
    `retrieval_split_file`)."""
    max_images: int | None = None
    """Cap the number of images per set (quick checks)."""
    batch_size: int = 128
    """Encoding batch size."""
