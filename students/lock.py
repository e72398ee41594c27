"""Tower locking (LiT-style locked-tower tuning): freeze a student's image or text tower.

The last N layer groups can stay trainable, as open_clip's `lock_image_tower(unlocked_groups, freeze_bn_stats)` and
`lock_text_tower(unlocked_layers, freeze_layer_norm)` allow.

A tower is split into layer groups, first to last, the way open_clip 3.3.0 splits it (read in the pinned wheel:
`transformer.py` `VisionTransformer.lock` and `lock_text_tower`, `timm_model.py` `TimmModel.lock`,
`hf_model.py` `HFTextEncoder.lock`):
- open_clip ViT: [conv1, class_embedding, positional_embedding, ln_pre], one group per residual block but the last,
  [last block, ln_post (and an attentional pooler)], [proj].
- timm tower: timm's own `group_matcher` groups of the trunk (`timm.models.group_parameters`); open_clip's extra
  projection head (`visual.head`) is never locked.
- open_clip text transformer and MCt: [token_embedding, positional_embedding, cls_emb / the first RepMixer], one
  group per block but the last, [last block, ln_final (MCt: and the last RepMixer)], [text_projection].
- Hugging Face encoder: [embeddings], one group per encoder layer (anything else joins the last); the projection to
  the joint space is never locked.
`unlocked` = N keeps the last N groups trainable (0 locks the whole tower). Frozen parameters get
`requires_grad=False`, so the optimizer never sees them (`distill`'s AdamW takes only trainable parameters, which
also keeps them out of weight decay). Unlike open_clip, BatchNorm statistics are frozen without replacing modules
(open_clip's `freeze_batch_norm_2d` swaps in `FrozenBatchNorm2d`, which drops `num_batches_tracked` from the
state dict): the locked part's modules are listed in `CLIPStudent.locked_eval_modules`, which `train()` keeps in
eval mode (BatchNorm statistics fixed, dropout off). That happens for the image tower with `freeze_bn_stats`, and
always for the text tower (a locked encoder is a fixed function, as in LiT). `freeze_layer_norm=False` leaves the
LayerNorm weights of the locked text layers trainable (open_clip's Hugging Face towers; its own transformer only
allows True).

A lock is not stored in the student: training applies it again from its flags on every (resumed) run.

References:
    LiT: Zhai et al. 2022, https://arxiv.org/abs/2111.07991
    open_clip: https://github.com/mlfoundations/open_clip (src/open_clip/transformer.py, timm_model.py, hf_model.py)
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Literal

from open_clip.timm_model import TimmModel
from timm.models import group_parameters
from torch import nn

from mcd_common import UsageError
from students.hf_text import HFTextTower
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = ["TowerLock", "lock_image_tower", "lock_student", "lock_text_tower", "tower_groups"]

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_VIT_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb", "mixer_in")


@dataclass(frozen=True)
class TowerLock:
    """What a tower lock did (plain data, for logs and run.json)."""

    tower: Literal["image", "text"]
    """The locked tower."""
    groups: int
    """Layer groups of the tower."""
    unlocked_groups: int
    """Trailing groups left trainable."""
    frozen_params: int
    """Parameters (elements) frozen."""
    trainable_params: int
    """Parameters (elements) of the tower still trainable."""
    eval_modules: int
    """Submodules kept in eval mode while training (frozen statistics, no dropout)."""


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _block_groups(names: list[str], stem: tuple[str, ...], proj: str | None) -> tuple[list[list[str]], list[str]]:
    """open_clip's grouping of a `transformer.resblocks` tower: stem, blocks but the last, last block + rest, proj."""
    depth = 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)
    groups: list[list[str]] = [[] for _ in range(max(depth, 1) + 2)]  # stem, blocks..., projection
    for name in names:
        block = _BLOCK.match(name)
        if _starts(name, stem):
            groups[0].append(name)
        elif proj is not None and _starts(name, (proj,)):
            groups[-1].append(name)
        elif block is not None:
            groups[1 + int(block.group(1))].append(name)
        else:  # ln_post / ln_final / attn_pool / the last RepMixer: with the last block, as open_clip
            groups[-2].append(name)
    return [g for g in groups if g], []


def _timm_groups(tower: TimmModel) -> tuple[list[list[str]], list[str]]:
    grouped = group_parameters(tower.trunk, tower.trunk.group_matcher())
    groups = [[f"trunk.{n}" for n in grouped[k]] for k in sorted(grouped)]
    return groups, [n for n, _ in tower.head.named_parameters(prefix="head")]


def _hf_groups(tower: HFTextTower) -> tuple[list[list[str]], list[str]]:
    layers_name, layers = tower.encoder_layers()
    prefix = f"transformer.{layers_name}."
    groups: list[list[str]] = [[] for _ in range(len(layers) + 1)]
    for name, _ in tower.transformer.named_parameters(prefix="transformer"):
        if name.startswith(prefix):
            groups[1 + int(name[len(prefix) :].split(".")[0])].append(name)
        elif _starts(name, ("transformer.embeddings",)):
            groups[0].append(name)
        else:  # final norms or a pooler: with the last layer
            groups[-1].append(name)
    return [g for g in groups if g], [n for n, _ in tower.proj.named_parameters(prefix="proj")]


def tower_groups(student: CLIPStudent, tower: Literal["image", "text"]) -> tuple[list[list[str]], list[str]]:
    """The layer groups of a tower, first to last, as parameter names relative to the tower, and the names that
    are never locked (open_clip's extra timm head, a Hugging Face tower's projection)."""
    module = student.visual if tower == "image" else student.text
    names = [n for n, _ in module.named_parameters()]
    if isinstance(module, TimmModel):
        return _timm_groups(module)
    if isinstance(module, HFTextTower):
        return _hf_groups(module)
    if tower == "image":
        return _block_groups(names, _VIT_STEM, "proj")
    return _block_groups(names, _TEXT_STEM, "text_projection")


def _eval_modules(tower: nn.Module, locked: set[str], prefix: str) -> list[str]:
    """The largest submodules of `tower` all of whose (>= 1) parameters are locked, as student-level names."""
    out: list[str] = []

    def walk(module: nn.Module, name: str) -> None:
        params = [n for n, _ in module.named_parameters(prefix=name)]  # tower-relative names
        if params and all(p in locked for p in params):
            out.append(f"{prefix}.{name}" if name else prefix)
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(tower, "")
    return out


def _lock(
    student: CLIPStudent, tower: Literal["image", "text"], unlocked: int, *, freeze_stats: bool, keep_norms: bool
) -> TowerLock:
    module = student.visual if tower == "image" else student.text
    groups, _never = tower_groups(student, tower)
    what = "unlocked_groups" if tower == "image" else "unlocked_layers"
    if not 0 <= unlocked <= len(groups):
        raise UsageError(f"{tower} tower lock: {what}={unlocked}, but the tower has {len(groups)} layer groups")
    locked = {n for g in groups[: len(groups) - unlocked] for n in g}
    norms = {
        f"{m_name}.{p_name}" if m_name else p_name
        for m_name, m in module.named_modules()
        if isinstance(m, nn.LayerNorm)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    frozen = 0
    for name, param in module.named_parameters():
        if name in locked and not (keep_norms and name in norms):
            param.requires_grad_(False)
            frozen += param.numel()
    prefix = "visual" if tower == "image" else "text"
    eval_modules = _eval_modules(module, locked, prefix) if freeze_stats else []
    student.locked_eval_modules = tuple(sorted({*student.locked_eval_modules, *eval_modules}))
    student.train(student.training)  # apply the eval modes now if the student is training
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    report = TowerLock(tower, len(groups), unlocked, frozen, trainable, len(eval_modules))
    _logger.info(
        "locked the %s tower: %d of %d groups frozen (%.2f M parameters), %.2f M trainable",
        tower, len(groups) - unlocked, len(groups), frozen / 1e6, trainable / 1e6,
    )  # fmt: skip
    return report


def lock_image_tower(student: CLIPStudent, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> TowerLock:
    """Freeze the image tower but its last `unlocked_groups` layer groups (open_clip `lock_image_tower`).

    Args:
        student: The student, changed in place.
        unlocked_groups: Trailing layer groups left trainable (0: the whole tower; open_clip's timm head stays
            trainable).
        freeze_bn_stats: Keep the locked part in eval mode while training (BatchNorm statistics fixed).

    Raises:
        UsageError: `unlocked_groups` negative or more than the tower's groups.
    """
    return _lock(student, "image", unlocked_groups, freeze_stats=freeze_bn_stats, keep_norms=False)


def lock_text_tower(student: CLIPStudent, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> TowerLock:
    """Freeze the text tower but its last `unlocked_layers` layer groups (open_clip `lock_text_tower`).

    The locked part stays in eval mode while training (MCt BatchNorm statistics fixed, dropout off).

    Args:
        student: The student, changed in place.
        unlocked_layers: Trailing layer groups left trainable (0: the whole tower; a Hugging Face tower's
            projection always stays trainable).
        freeze_layer_norm: Also freeze the LayerNorm weights of the locked layers (False leaves them trainable).

    Raises:
        UsageError: `unlocked_layers` negative or more than the tower's groups.
    """
    return _lock(student, "text", unlocked_layers, freeze_stats=True, keep_norms=not freeze_layer_norm)


def lock_student(
    student: CLIPStudent,
    *,
    image: bool = False,
    image_unlocked_groups: int = 0,
    image_freeze_bn_stats: bool = False,
    text: bool = False,
    text_unlocked_layers: int = 0,
    text_freeze_layer_norm: bool = True,
) -> dict[str, dict[str, object]]:
    """Apply the tower locks that are switched on (the fields of `distill train --lock.*`); returns their reports.

    Raises:
        UsageError: an option for a tower that is not locked, or an invalid group count.
    """
    if not image and (image_unlocked_groups or image_freeze_bn_stats):
        raise UsageError("--lock.image_unlocked_groups / --lock.image_freeze_bn_stats need --lock.image true")
    if not text and text_unlocked_layers:
        raise UsageError("--lock.text_unlocked_layers needs --lock.text true")
    out: dict[str, dict[str, object]] = {}
    if image:
        out["image"] = asdict(lock_image_tower(student, image_unlocked_groups, image_freeze_bn_stats))
    if text:
        out["text"] = asdict(lock_text_tower(student, text_unlocked_layers, text_freeze_layer_norm))
    return out
