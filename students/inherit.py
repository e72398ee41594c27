"""TinyCLIP manual weight inheritance: initialise a smaller student from a larger model of the same family.

Rules (TinyCLIP `weight_inherit.py`, ICCV'23, Sec. 3.2 "manual inheritance"):
- Depth: every block stack (`...resblocks.N`, `...blocks.N`) keeps evenly spaced source blocks,
  `step = T_depth // S_depth`, indices `0, step, 2*step, ...` ("interval_front").
- Width: every other tensor is front-sliced (`src[:s0, :s1, ...]`): first channels, first FFN neurons, first dims.
- Attention: fused q/k/v projections are viewed as `(3, heads, head_dim, width)` and sliced per (q, k, v) and per
  head, so the student keeps whole heads at a fixed head dim; output projections are sliced the same way per head.
- Beyond TinyCLIP: timm FastViT/MCi students inherit stage-wise (each `stages.S.blocks` stack is sampled on its own)
  with channel front slices of every re-parameterisation branch (MobileOne conv/scale/skip, RepMixer, RepCPE, BN
  statistics). A native ViT's positional embedding is resampled when the patch grid differs, and a patch-embedding
  kernel is resized when the patch size differs.

The source is a plain state dict (open_clip `CLIP`/`CustomTextCLIP` keys, a `CLIPStudent`, or a Lightning
checkpoint's `state_dict`), so `students` never imports `teachers`: the caller extracts the teacher's state dict.

References:
    TinyCLIP: https://arxiv.org/abs/2309.12314, https://github.com/microsoft/Cream/tree/main/TinyCLIP
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mcd_common import UsageError
from students.config import StudentCfg
from students.factory import build_student
from students.io import normalize_state_dict
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = ["InheritReport", "inherit_weights", "uniform_layer_indices"]

# NOTE: a block stack is a `resblocks.N` / `blocks.N` segment followed by more key; keys may nest several stacks.
_STACK = re.compile(r"(?:^|\.)(resblocks|blocks)\.(\d+)(?=\.)")
_QKV_SUFFIXES = ("attn.in_proj_weight", "attn.in_proj_bias", ".qkv.weight", ".qkv.bias")
_OUT_PROJ_SUFFIXES = ("attn.out_proj.weight", "attn.proj.weight", "token_mixer.proj.weight")


@dataclass
class InheritReport:
    """What `inherit_weights` did, key by key (student keys unless noted)."""

    inherited: list[str] = field(default_factory=list)
    """Copied unchanged (same shape)."""
    sliced: list[str] = field(default_factory=list)
    """Front-/per-head-sliced (or resampled) from a larger source tensor."""
    fresh: list[str] = field(default_factory=list)
    """No source tensor: left at the student's initialisation."""
    unused: list[str] = field(default_factory=list)
    """Source keys nothing was taken from (e.g. skipped layers)."""
    layer_maps: dict[str, list[int]] = field(default_factory=dict)
    """Per student block stack: the source block index each student block came from."""

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"inherited {len(self.inherited)}, sliced {len(self.sliced)}, fresh {len(self.fresh)}, "
            f"unused source {len(self.unused)}"
        )


def uniform_layer_indices(source_depth: int, student_depth: int) -> list[int]:
    """TinyCLIP "interval_front" layer choice: `[0, step, 2*step, ...]` with `step = source // student`."""
    if student_depth > source_depth:
        raise UsageError(f"student has {student_depth} blocks but the source only {source_depth}")
    step = source_depth // student_depth
    return [i * step for i in range(student_depth)]


def _stack_depths(keys: list[str]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in keys:
        prefix_end = 0
        prefix = ""
        for m in _STACK.finditer(key):
            # NOTE: prefixes are taken in the key's own index space, so nested stacks are counted per parent block.
            prefix = prefix + key[prefix_end : m.end(1)]
            depths[prefix] = max(depths.get(prefix, 0), int(m.group(2)) + 1)
            prefix = prefix + "." + m.group(2)
            prefix_end = m.end(2)
    return depths


def _heads_of(model: torch.nn.Module | None, module_path: str) -> int | None:
    if model is None:
        return None
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    heads = getattr(module, "num_heads", None)
    return int(heads) if heads is not None else None


def _front_slice(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def _check_fits(key: str, student: torch.Size, source: torch.Size) -> None:
    if len(student) != len(source):
        raise UsageError(f"{key}: student tensor has rank {len(student)} but the source has rank {len(source)}")
    if any(s > t for s, t in zip(student, source, strict=True)):
        raise UsageError(
            f"{key}: student tensor {tuple(student)} is larger than its source {tuple(source)}; "
            "inheritance only shrinks (pick a larger source or a smaller student)"
        )


def _slice_qkv(key: str, src: torch.Tensor, shape: torch.Size, heads_s: int, heads_t: int) -> torch.Tensor:
    rows_s, rows_t = shape[0] // 3, src.shape[0] // 3
    hd_s, hd_t = rows_s // heads_s, rows_t // heads_t
    if heads_s > heads_t or hd_s > hd_t:
        raise UsageError(f"{key}: student attention ({heads_s} heads x {hd_s}) is larger than the source's "
                         f"({heads_t} x {hd_t})")  # fmt: skip
    rest = src.shape[1:]
    # [3*H_t*hd_t, ...] -> [3, H_t, hd_t, ...]: q/k/v blocks, then heads, then dims within a head
    view = src.reshape(3, heads_t, hd_t, *rest)
    out = view[:, :heads_s, :hd_s][(slice(None),) * 3 + tuple(slice(0, n) for n in shape[1:])]
    return out.reshape(shape)


def _slice_out_proj(key: str, src: torch.Tensor, shape: torch.Size, heads_s: int, heads_t: int) -> torch.Tensor:
    hd_s, hd_t = shape[1] // heads_s, src.shape[1] // heads_t
    if heads_s > heads_t or hd_s > hd_t:
        raise UsageError(
            f"{key}: student attention ({heads_s} x {hd_s}) is larger than the source's ({heads_t} x {hd_t})"
        )
    # [D_t, H_t*hd_t] -> [D_t, H_t, hd_t]: input columns grouped by head
    view = src.reshape(src.shape[0], heads_t, hd_t)
    return view[: shape[0], :heads_s, :hd_s].reshape(shape)


def _resample_pos_embed(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # [1 + g_t^2, D] -> [1 + g_s^2, D]: class token kept, patch grid resized bicubically (open_clip resize_pos_embed)
    g_t, g_s = math.isqrt(src.shape[0] - 1), math.isqrt(shape[0] - 1)
    cls_tok, grid = src[:1], src[1:]
    grid = grid.reshape(1, g_t, g_t, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_s, g_s), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(g_s * g_s, -1).to(src.dtype)
    return torch.cat([cls_tok, grid], dim=0)[:, : shape[1]]


def _resize_patch_kernel(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # [D, 3, p_t, p_t] -> [D_s, 3, p_s, p_s]; rescaled so a flat patch keeps its response (sum of the kernel)
    out = F.interpolate(
        src[: shape[0], : shape[1]].float(), size=tuple(shape[2:]), mode="bilinear", align_corners=False
    )
    scale = (src.shape[-1] * src.shape[-2]) / (shape[-1] * shape[-2])
    return (out * scale).to(src.dtype)


class _LayerMap:
    """Maps a student key to the source key it inherits from (TinyCLIP's evenly spaced blocks, per stack)."""

    def __init__(self, student_keys: list[str], source_keys: list[str], layer_maps: dict[str, list[int]]) -> None:
        self.s_depths, self.t_depths = _stack_depths(student_keys), _stack_depths(source_keys)
        self.layer_maps = layer_maps
        """Filled as keys are mapped: per student block stack, the source block of each student block."""

    def source_key(self, key: str) -> str | None:
        """The source key for student `key` (None when the source lacks one of its block stacks)."""
        out, pos, stud_prefix = "", 0, ""
        for m in _STACK.finditer(key):
            stud_prefix = stud_prefix + key[pos : m.end(1)]
            src_prefix = out + key[pos : m.end(1)]
            depth_s, depth_t = self.s_depths[stud_prefix], self.t_depths.get(src_prefix)
            if depth_t is None:
                return None
            if depth_s > depth_t:
                raise UsageError(f"{stud_prefix}: student has {depth_s} blocks but the source only {depth_t}")
            indices = uniform_layer_indices(depth_t, depth_s)
            self.layer_maps.setdefault(stud_prefix, indices)
            out = src_prefix + "." + str(indices[int(m.group(2))])
            stud_prefix = stud_prefix + "." + m.group(2)
            pos = m.end(2)
        return out + key[pos:]


def _qkv_heads(
    key: str, src_key: str, target: torch.Size, src: torch.Size, student: CLIPStudent, source: CLIPStudent | None
) -> tuple[int, int]:
    """(student heads, source heads) of a fused q/k/v projection."""
    # in_proj_* live on nn.MultiheadAttention itself; timm's `qkv` is a Linear inside the attention module
    depth = 1 if ".attn.in_proj_" in "." + key else 2
    heads_s = _heads_of(student, key.rsplit(".", depth)[0])
    heads_t = _heads_of(source, src_key.rsplit(".", depth)[0])
    if heads_s is None:  # unknown module type: plain front slice of each of q, k, v
        return 1, 1
    if heads_t is None:  # TinyCLIP assumption: the source has the student's head dim
        hd_s = target[0] // 3 // heads_s
        if (src[0] // 3) % hd_s:
            raise UsageError(f"{key}: cannot infer source heads at head dim {hd_s}; pass source_cfg")
        heads_t = src[0] // 3 // hd_s
    return heads_s, heads_t


def _out_proj_heads(
    key: str, src_key: str, target: torch.Size, src: torch.Size, student: CLIPStudent, source: CLIPStudent | None
) -> tuple[int, int]:
    """(student heads, source heads) of an attention output projection."""
    heads_s = _heads_of(student, key.rsplit(".", 2)[0]) or 1
    heads_t = _heads_of(source, src_key.rsplit(".", 2)[0])
    if heads_t is None:
        hd_s = target[1] // heads_s
        heads_t = src[1] // hd_s if src[1] % hd_s == 0 else heads_s
    return heads_s, heads_t


def _shrink(
    key: str, src_key: str, src: torch.Tensor, shape: torch.Size, student: CLIPStudent, source: CLIPStudent | None
) -> torch.Tensor:
    """The slice (or resampling) of a larger source tensor that becomes student tensor `key` of `shape`."""
    if key == "visual.positional_embedding" and src.ndim == 2 and src.shape[0] != shape[0]:
        _check_fits(key, shape[1:], src.shape[1:])
        return _resample_pos_embed(src, shape)
    if key == "visual.conv1.weight" and src.ndim == 4 and src.shape[2:] != shape[2:]:
        _check_fits(key, shape[:2], src.shape[:2])
        return _resize_patch_kernel(src, shape)
    _check_fits(key, shape, src.shape)
    if key.endswith(_QKV_SUFFIXES):
        heads_s, heads_t = _qkv_heads(key, src_key, shape, src.shape, student, source)
        return _slice_qkv(key, src, shape, heads_s, heads_t)
    if key.endswith(_OUT_PROJ_SUFFIXES) and src.ndim == 2:
        heads_s, heads_t = _out_proj_heads(key, src_key, shape, src.shape, student, source)
        return _slice_out_proj(key, src, shape, heads_s, heads_t)
    return _front_slice(src, shape)


@torch.no_grad()
def inherit_weights(
    student: CLIPStudent,
    source_state_dict: dict[str, torch.Tensor],
    *,
    source_cfg: StudentCfg | None = None,
) -> InheritReport:
    """Copy (slices of) `source_state_dict` into `student` in place, TinyCLIP style.

    Args:
        student: the smaller student (its current values are kept for keys without a source).
        source_state_dict: the larger model's state dict (open_clip keys; `module.`/`student.` prefixes and the
            flat open_clip `CLIP` text layout are handled).
        source_cfg: the source's architecture. Needed only when the source's attention head dim differs from the
            student's; without it the student's head dim is assumed (TinyCLIP's fixed head dim).

    Returns:
        The report.

    Raises:
        UsageError: a student tensor is larger than its source, or a block stack deeper than the source's
            (naming the key).
    """
    source = normalize_state_dict(dict(source_state_dict))
    own = student.state_dict()
    report = InheritReport()
    layer_map = _LayerMap(list(own), list(source), report.layer_maps)
    source_model = None
    if source_cfg is not None:
        with torch.device("meta"):  # only the modules' head counts are read
            source_model = build_student(source_cfg)
    used: set[str] = set()
    new_state: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        src_key = layer_map.source_key(key)
        if src_key is None or src_key not in source:
            report.fresh.append(key)
            continue
        src = source[src_key].to(device=target.device, dtype=target.dtype)
        used.add(src_key)
        if src.shape == target.shape:
            new_state[key] = src.clone()
            report.inherited.append(key)
        elif src.numel() == target.numel() and src.ndim != target.ndim:  # e.g. scalar vs [1] logit_scale
            new_state[key] = src.reshape(target.shape).clone()
            report.inherited.append(key)
        else:
            new_state[key] = _shrink(key, src_key, src, target.shape, student, source_model).clone().contiguous()
            report.sliced.append(key)
    report.unused = sorted(set(source) - used)
    student.load_state_dict(new_state, strict=False)
    _logger.info("weight inheritance into %s: %s", student.cfg.name, report.summary())
    return report
