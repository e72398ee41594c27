"""Automatic weight inheritance: L0 hard-concrete structured pruning of a student's transformer towers.

TinyCLIP's "auto inheritance" (adapted from CoFi): hard-concrete gates (Louizos et al., L0 regularisation) on
- `hidden`: the residual-stream width of a tower (one gate vector shared by all its layers),
- `heads`: attention heads, per layer,
- `mlp`: MLP neurons, per layer,
trained jointly with the student under a Lagrangian constraint that drives the expected sparsity to a target
(linear ramp). `prune()` then turns the gates into an ORDINARY, smaller open_clip config and copies the kept weights.

Design decisions (this module's contract with `distill/`):
- Pure torch, no Lightning. `L0Pruner` is not an `nn.Module`, so its gates and multipliers never reach the student
  optimiser by accident: `param_groups(lr)` feeds one extra AdamW (gates minimised, multipliers `maximize=True`, i.e.
  TinyCLIP's lr -0.02). `constrain_()` clamps the gate log-odds to [log 1e-2, log 1e2] after every step, as
  TinyCLIP's `constrain_parameters()` does. `state_dict()` / `load_state_dict()` for checkpoints.
- Sparsity is measured as TinyCLIP does (attention and MLP weights of the transformer layers, both towers pooled)
  and is relative to the ORIGINAL model of a progressive schedule: a student that is already `start_sparsity`
  sparse has a reference size of its own size / (1 - start_sparsity).
- Two-sided constraint (default): `lambda1 * |gap| + lambda2 * gap**2`, the form TinyCLIP has commented out in
  `l0module.py`, so a stage cannot overshoot its target; `constraint="lower"` is TinyCLIP's `max(0, gap)`.
- Masks act during the towers' forward: while attached, the pruner replaces `student.visual.forward` /
  `student.text.forward` (instance attributes) with a masked re-implementation of open_clip's `VisionTransformer` /
  `TextTransformer` forward. Training mode samples gates; eval mode uses exactly the structure `prune()` will keep, so
  validation measures the pruned model. `detach()` restores the original forwards; a `deepcopy` of an attached
  student (EMA) stays masked by the same gates, computed with the copy's weights.
- LayerNorms normalise over the kept hidden dims only (CoFi), so a model with zeroed hidden dims computes exactly
  what the smaller model computes.
- Uniform structure (docs/L0.md): open_clip towers have one width W, one head count H and one MLP width F for all
  layers, and tie W = H x head_dim. TinyCLIP's pruned towers are custom modules with a width per layer. We keep
  what open_clip can express: the head dim (TinyCLIP keeps it too), H' heads, W' = H' * head_dim, F' neurons in
  every layer. The masks' expected size `L * E[W] * (4 * head_dim * E[H] + 2 * E[F])` equals the size of a uniform
  tower of width sqrt(E[W] * head_dim * E[H]) (the attention term is 4 * W'^2 once W' is tied), so `plan()` picks
  the H' whose width is nearest that value and the F' that makes the tower's size equal the masks' expected size:
  the sparsity the Lagrangian constrains is the sparsity that `prune()` keeps. The kept size is the masks' expected
  sparsity clipped to `target +- tolerance` (a warning says when the masks had not converged). Which heads, neurons
  and hidden dims = the top gate log-odds (TinyCLIP's deterministic scores rank the same), near-ties (the gates
  that sit at the upper clamp) broken by weight magnitude.
- Gate values at kept positions (sigmoid(log_alpha / beta * 0.8), ~1 when open) are folded into the pruned weights.

Supported towers: open_clip native `VisionTransformer` (no attentional pooling) and `TextTransformer` (no CLS/pad
mask), i.e. every native-ViT / transformer-text student; others raise `UsageError`.

References:
    TinyCLIP: https://arxiv.org/abs/2309.12314 (microsoft/Cream TinyCLIP/src/open_clip/l0module.py and
    src/training/train.py, read at commit 4a13c4091e78)
    CoFi pruning: https://arxiv.org/abs/2204.00408 ; L0 / hard concrete: https://arxiv.org/abs/1712.01312
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from mcd_common import UsageError
from mcd_common._open_clip import vision_global_pool
from students.factory import build_student
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = ["L0Pruner", "TowerPlan"]

Tower = Literal["image", "text"]
Constraint = Literal["two_sided", "lower"]
_LIMIT_L, _LIMIT_R, _EPS = -0.1, 1.1, 1e-6
_MAGIC = 0.8  # deterministic score sharpening, Wang et al. 2020 / CoFi / TinyCLIP
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
"""TinyCLIP's `constrain_parameters()` clamp of the gate log-odds, applied after every mask step."""
_TIE = 1e-3  # log-odds closer than this count as tied (e.g. both at the upper clamp): weight magnitude decides
_SIZE_TOL = 2e-3  # a uniform structure "matches" a size when it is within this fraction of the reference size


@dataclass(frozen=True)
class _TowerShape:
    width: int
    layers: int
    heads: int
    head_dim: int
    mlp: int

    @property
    def size(self) -> int:
        """Prunable weights (TinyCLIP's measure): per layer 4 * W^2 attention + 2 * W * F MLP."""
        return self.layers * self.width * (4 * self.head_dim * self.heads + 2 * self.mlp)


@dataclass(frozen=True)
class TowerPlan:
    """The structure `prune()` keeps for one tower (indices sorted ascending)."""

    hidden: torch.Tensor
    """Kept residual dims `[W']`."""
    heads: torch.Tensor
    """Kept heads per layer `[L, H']`."""
    mlp: torch.Tensor
    """Kept MLP neurons per layer `[L, F']`."""
    hidden_z: torch.Tensor
    """Dense deterministic hidden gate `[W]` (0 where pruned)."""
    heads_z: torch.Tensor
    """Dense deterministic head gates `[L, H]`."""
    mlp_z: torch.Tensor
    """Dense deterministic MLP gates `[L, F]`."""


def _masked_layer_norm(ln: nn.LayerNorm, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm over the kept dims only (`keep` is a 0/1 vector `[W]`); pruned dims come out as 0."""
    if keep is None:
        return ln(x)
    keep = keep.to(x.dtype)
    n = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / n
    centred = (x - mean) * keep
    var = (centred * centred).sum(-1, keepdim=True) / n
    y = centred * torch.rsqrt(var + ln.eps)
    return (y * ln.weight + ln.bias) * keep


def _masked_attention(
    mha: nn.MultiheadAttention, x: torch.Tensor, head_z: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    batch, length, width = x.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out * head_z.view(1, heads, 1, 1)  # gate whole heads before the output projection
    out = out.transpose(1, 2).reshape(batch, length, width)  # [B, H, L, hd] -> [B, L, H*hd]
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _masked_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    hidden_z: torch.Tensor,
    keep: torch.Tensor | None,
    head_z: torch.Tensor,
    mlp_z: torch.Tensor,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    h = _masked_layer_norm(block.ln_1, x, keep)
    x = x + block.ls_1(_masked_attention(block.attn, h, head_z, attn_mask) * hidden_z)
    h = _masked_layer_norm(block.ln_2, x, keep)
    h = block.mlp.gelu(block.mlp.c_fc(h)) * mlp_z
    return x + block.ls_2(block.mlp.c_proj(h) * hidden_z)


def _mlp_ratio(mlp: int, width: int) -> float:
    # open_clip builds int(width * mlp_ratio) neurons: pick a ratio that reproduces `mlp` exactly
    ratio = mlp / width
    if int(width * ratio) != mlp:
        ratio = (mlp + 0.5) / width
    if int(width * ratio) != mlp:  # pragma: no cover - arithmetic guard
        raise ArithmeticError(f"no mlp_ratio gives {mlp} neurons at width {width}")
    return ratio


def _uniform_structure(s: _TowerShape, remaining: float, width_hint: float, reference: float) -> tuple[int, int]:
    """Heads H' and MLP width F' of the uniform tower (W' = H' * head_dim) that best realises `remaining` weights.

    Among the H' whose tower can hold `remaining` weights to within `_SIZE_TOL` of the reference size (F' solves
    the size, clamped to [1, F]), the one whose width is nearest `width_hint`; if none can, the closest size.
    """
    best: tuple[tuple[bool, float], int, int] | None = None
    for heads in range(1, s.heads + 1):
        width = heads * s.head_dim
        mlp_exact = (remaining / s.layers - 4 * width * width) / (2 * width)
        mlp = int(min(s.mlp, max(1, round(mlp_exact))))
        size = s.layers * width * (4 * width + 2 * mlp)
        err = abs(size - remaining) / reference
        key = (err > _SIZE_TOL, err if err > _SIZE_TOL else abs(width - width_hint))
        if best is None or key < best[0]:
            best = (key, heads, mlp)
    assert best is not None
    return best[1], best[2]


def _share(remaining: float, expected: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Split `remaining` weights over towers in proportion to their expected sizes, none above its full size."""
    out: dict[str, float] = {}
    free = dict(expected)
    left = remaining
    while free:
        total = sum(free.values())
        scale = left / total if total > 0 else 0.0
        over = [t for t, v in free.items() if v * scale > caps[t]]
        if not over:
            out.update({t: v * scale for t, v in free.items()})
            break
        for t in over:  # a tower cannot grow past its full size: it keeps all, the others share the rest
            out[t] = caps[t]
            left -= caps[t]
            del free[t]
    return out


def _importance(module: nn.Module, s: _TowerShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared weight norms touching each hidden dim `[W]`, head `[L, H]` and MLP neuron `[L, F]` (tie-breaks)."""
    hidden = torch.zeros(s.width)
    heads, mlp = [], []
    for block in module.transformer.resblocks:
        w_in = block.attn.in_proj_weight.detach().float().cpu()  # [3 * H * hd, W]
        w_out = block.attn.out_proj.weight.detach().float().cpu()  # [W, H * hd]
        w_fc = block.mlp.c_fc.weight.detach().float().cpu()  # [F, W]
        w_proj = block.mlp.c_proj.weight.detach().float().cpu()  # [W, F]
        hidden += (w_in**2).sum(0) + (w_out**2).sum(1) + (w_fc**2).sum(0) + (w_proj**2).sum(1)
        per_head_in = (w_in**2).sum(1).view(3, s.heads, s.head_dim).sum((0, 2))  # [3*H*hd] -> [H]
        per_head_out = (w_out**2).sum(0).view(s.heads, s.head_dim).sum(1)  # [H*hd] -> [H]
        heads.append(per_head_in + per_head_out)
        mlp.append((w_fc**2).sum(1) + (w_proj**2).sum(0))
    return hidden, torch.stack(heads), torch.stack(mlp)


def _top(log_alpha: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted) of the k largest gates per row; gates within `_TIE` of each other ranked by importance."""
    tie = importance.to(log_alpha.device) / importance.max().clamp_min(1e-12)  # [0, 1]
    key = torch.floor(log_alpha / _TIE) * 2.0 + tie  # NOTE: bins of _TIE, importance decides inside a bin
    return key.topk(k, dim=-1).indices.sort(dim=-1).values


class L0Pruner:
    """Hard-concrete gates over a native-transformer student, with TinyCLIP's Lagrangian sparsity constraint.

    Args:
        student: the student to prune (attached on construction; its towers' forwards become masked).
        target_sparsity: final fraction of the ORIGINAL model's transformer-layer weights to remove (0..1).
        towers: which towers to gate.
        start_sparsity: how sparse `student` already is relative to the original model (a progressive schedule's
            previous target; 0 for the original itself). The target ramp starts there.
        warmup_steps: steps of the linear ramp from `start_sparsity` to `target_sparsity`.
        init_log_alpha: initial gate log-odds (10: every gate fully open; the first `constrain_()` makes it log 100).
        temperature: hard-concrete beta (2/3).
        init_lambda: initial Lagrange multipliers lambda1 = lambda2.
        constraint: `two_sided` (penalise any gap to the target) or `lower` (TinyCLIP: only sparsity below it).
        tolerance: the kept structure's sparsity is the masks' expected sparsity clipped to target +- this;
            None follows the masks exactly (TinyCLIP).
    """

    def __init__(
        self,
        student: CLIPStudent,
        target_sparsity: float,
        *,
        towers: Sequence[Tower] = ("image", "text"),
        start_sparsity: float = 0.0,
        warmup_steps: int = 1000,
        init_log_alpha: float = 10.0,
        temperature: float = 2.0 / 3.0,
        init_lambda: float = 10.0,
        constraint: Constraint = "two_sided",
        tolerance: float | None = 0.01,
    ) -> None:
        if not 0.0 <= start_sparsity < 1.0:
            raise UsageError(f"start_sparsity must be in [0, 1), got {start_sparsity}")
        if not start_sparsity <= target_sparsity < 1.0:
            raise UsageError(f"target_sparsity must be in [start_sparsity={start_sparsity}, 1), got {target_sparsity}")
        if constraint not in ("two_sided", "lower"):
            raise UsageError(f"constraint must be 'two_sided' or 'lower', got {constraint!r}")
        self.student = student
        self.target_sparsity = float(target_sparsity)
        self.start_sparsity = float(start_sparsity)
        self.warmup_steps = int(warmup_steps)
        self.temperature = float(temperature)
        self.constraint: Constraint = constraint
        self.tolerance = tolerance
        self.towers: tuple[Tower, ...] = tuple(towers)
        self.shapes: dict[str, _TowerShape] = {t: self._check_tower(t) for t in self.towers}
        device = student.logit_scale.device
        self.log_alpha = nn.ParameterDict()
        for t, s in self.shapes.items():
            self.log_alpha[f"{t}_hidden"] = nn.Parameter(torch.full((s.width,), init_log_alpha, device=device))
            self.log_alpha[f"{t}_heads"] = nn.Parameter(torch.full((s.layers, s.heads), init_log_alpha, device=device))
            self.log_alpha[f"{t}_mlp"] = nn.Parameter(torch.full((s.layers, s.mlp), init_log_alpha, device=device))
        self.lambdas = nn.ParameterDict(
            {
                "lambda_1": nn.Parameter(torch.tensor(float(init_lambda), device=device)),
                "lambda_2": nn.Parameter(torch.tensor(float(init_lambda), device=device)),
            }
        )
        self._plan_cache: tuple[tuple, dict[str, TowerPlan]] | None = None
        self._attached = False
        self.attach()

    # -- set-up -------------------------------------------------------------------------------------------------------
    def _tower_module(self, tower: Tower) -> nn.Module:
        return self.student.visual if tower == "image" else self.student.text

    def _check_tower(self, tower: Tower) -> _TowerShape:
        module = self._tower_module(tower)
        if tower == "image":
            if not isinstance(module, VisionTransformer):
                raise UsageError(
                    f"L0 pruning needs a native open_clip ViT image tower, got {type(module).__name__}: "
                    "use --inherit.mode manual for this student"
                )
            if module.attn_pool is not None or module.final_ln_after_pool or module.output_tokens:
                raise UsageError("L0 pruning does not support attentional pooling / final_ln_after_pool / tokens")
        elif tower == "text":
            if not isinstance(module, TextTransformer):
                raise UsageError(
                    f"L0 pruning needs an open_clip TextTransformer text tower, got {type(module).__name__}: "
                    "use --inherit.mode manual for this student"
                )
            if module.cls_emb is not None or module.use_pad_mask or module.output_tokens:
                raise UsageError("L0 pruning does not support text towers with a CLS embedding, pad mask or tokens")
        else:
            raise UsageError(f"unknown tower {tower!r} (use 'image' or 'text')")
        blocks = module.transformer.resblocks
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise UsageError(f"L0 pruning supports open_clip's default ResidualAttentionBlock only ({tower} tower)")
        attn = blocks[0].attn
        return _TowerShape(
            width=module.transformer.width,
            layers=len(blocks),
            heads=attn.num_heads,
            head_dim=attn.head_dim,
            mlp=blocks[0].mlp.c_fc.out_features,
        )

    def attach(self) -> None:
        """Route the gated towers' forwards through the masked implementation."""
        if self._attached:
            return
        for tower in self.towers:
            module = self._tower_module(tower)

            def _forward(tower_module: nn.Module, x: torch.Tensor, _tower: Tower = tower) -> torch.Tensor:
                return self._masked_forward(_tower, tower_module, x)

            # NOTE: an instance attribute shadows the class forward (detach() deletes it). It is a bound method, so
            # `copy.deepcopy(student)` (e.g. an EMA copy) rebinds it to the copy's own weights while sharing the gates.
            module.forward = types.MethodType(_forward, module)
        self._attached = True

    def detach(self) -> None:
        """Restore the towers' own forwards (the gates stay, `attach()` re-applies them)."""
        for tower in self.towers:
            module = self._tower_module(tower)
            if "forward" in module.__dict__:
                del module.forward
        self._attached = False

    def to(self, device: torch.device | str) -> L0Pruner:
        """Move gates and multipliers (call after moving the student)."""
        self.log_alpha.to(device)
        self.lambdas.to(device)
        return self

    # -- optimisation API ---------------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """Gate log-odds, for the mask optimiser (minimised)."""
        return iter(self.log_alpha.values())

    def lambda_parameters(self) -> Iterator[nn.Parameter]:
        """Lagrange multipliers lambda1, lambda2 (to be MAXIMISED: `maximize=True` or a negative lr)."""
        return iter(self.lambdas.values())

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW parameter groups: gates at `lr`, multipliers at `lr` maximised (TinyCLIP: 0.02 and -0.02)."""
        return [
            {"params": list(self.parameters()), "lr": lr, "weight_decay": 0.0},
            {"params": list(self.lambda_parameters()), "lr": lr, "weight_decay": 0.0, "maximize": True},
        ]

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp the gate log-odds to `LOG_ALPHA_RANGE` (TinyCLIP, after every optimiser step)."""
        for p in self.log_alpha.values():
            p.clamp_(*LOG_ALPHA_RANGE)

    def state_dict(self) -> dict:
        """Gates, multipliers and settings, for checkpoints (plain tensors and numbers)."""
        return {
            "log_alpha": {k: v.detach().cpu() for k, v in self.log_alpha.items()},
            "lambdas": {k: v.detach().cpu() for k, v in self.lambdas.items()},
            "target_sparsity": self.target_sparsity,
            "start_sparsity": self.start_sparsity,
            "warmup_steps": self.warmup_steps,
            "constraint": self.constraint,
            "tolerance": self.tolerance,
            "towers": list(self.towers),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output (same student architecture and towers)."""
        if list(state["towers"]) != list(self.towers):
            raise UsageError(f"pruner state is for towers {state['towers']}, this pruner gates {list(self.towers)}")
        with torch.no_grad():
            for k, v in state["log_alpha"].items():
                self.log_alpha[k].copy_(v)
            for k, v in state["lambdas"].items():
                self.lambdas[k].copy_(v)
        self.target_sparsity = float(state["target_sparsity"])
        self.start_sparsity = float(state["start_sparsity"])
        self.warmup_steps = int(state["warmup_steps"])
        self.constraint = state.get("constraint", self.constraint)
        self.tolerance = state.get("tolerance", self.tolerance)
        self._plan_cache = None

    # -- gates --------------------------------------------------------------------------------------------------------
    def _sample(self, log_alpha: torch.Tensor) -> torch.Tensor:
        u = torch.empty_like(log_alpha).uniform_(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
        return (s * (_LIMIT_R - _LIMIT_L) + _LIMIT_L).clamp(0.0, 1.0)  # stretched, then hard-clipped

    def keep_probability(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(gate != 0) = 1 - Q(0) for each gate (differentiable)."""
        q0 = torch.sigmoid(self.temperature * math.log(-_LIMIT_L / _LIMIT_R) - log_alpha)
        return 1.0 - q0.clamp(_EPS, 1.0 - _EPS)

    def _score(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(log_alpha / self.temperature * _MAGIC)

    def _expected_counts(self, tower: Tower) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E[kept hidden dims], E[kept heads] per layer (mean), E[kept neurons] per layer (mean)."""
        hidden = self.keep_probability(self.log_alpha[f"{tower}_hidden"]).sum()
        heads = self.keep_probability(self.log_alpha[f"{tower}_heads"]).sum(1).mean()
        mlp = self.keep_probability(self.log_alpha[f"{tower}_mlp"]).sum(1).mean()
        return hidden, heads, mlp

    def _expected_size(self, tower: Tower) -> torch.Tensor:
        # TinyCLIP/CoFi: per head 4 * head_dim * width (q, k, v, out), per MLP neuron 2 * width; norms/biases ignored
        s = self.shapes[tower]
        hidden, heads, mlp = self._expected_counts(tower)
        return s.layers * hidden * (4 * s.head_dim * heads + 2 * mlp)

    @property
    def full_size(self) -> int:
        """Prunable weights of the gated towers as they are now."""
        return sum(s.size for s in self.shapes.values())

    @property
    def reference_size(self) -> float:
        """Prunable weights of the original model (sparsities are relative to it)."""
        return self.full_size / (1.0 - self.start_sparsity)

    # -- sparsity -----------------------------------------------------------------------------------------------------
    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of the original model's attention+MLP weights removed (differentiable scalar)."""
        remaining = sum(self._expected_size(t) for t in self.towers)
        return 1.0 - remaining / self.reference_size

    def kept_sparsity(self, expected: float) -> float:
        """The sparsity the kept structure realises for masks at `expected`: clipped to target +- tolerance."""
        if self.tolerance is None:
            return expected
        return min(max(expected, self.target_sparsity - self.tolerance), self.target_sparsity + self.tolerance)

    def target_at(self, step: int) -> float:
        """Linearly ramped target sparsity at `step`."""
        frac = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.start_sparsity + (self.target_sparsity - self.start_sparsity) * frac

    def lagrangian(self, target: float) -> torch.Tensor:
        """`lambda1 * v + lambda2 * v**2` with v = |target - expected| (two-sided) or max(0, target - expected).

        Minimise it over the gates (and the student), maximise it over the multipliers.
        """
        gap = target - self.expected_sparsity()
        violation = gap.abs() if self.constraint == "two_sided" else torch.relu(gap)
        return self.lambdas["lambda_1"] * violation + self.lambdas["lambda_2"] * violation * violation

    def sparsity_loss(self, step: int) -> torch.Tensor:
        """`lagrangian(target_at(step))`: add it to the training loss."""
        return self.lagrangian(self.target_at(step))

    # -- the kept structure -------------------------------------------------------------------------------------------
    def _cache_key(self) -> tuple:
        # NOTE: `_version` counts in-place updates (optimiser steps, fill_): a changed gate or weight invalidates it
        gates = tuple(p._version for p in self.log_alpha.values())
        weights = sum(p._version for p in self.student.parameters())
        return gates, weights, self.target_sparsity, self.start_sparsity, self.tolerance

    @torch.no_grad()
    def plans(self) -> dict[str, TowerPlan]:
        """The uniform structure `prune()` keeps, per tower (eval-mode masks use it too)."""
        key = self._cache_key()
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        expected = {t: float(self._expected_size(t)) for t in self.towers}
        ref = self.reference_size
        kept = self.kept_sparsity(1.0 - sum(expected.values()) / ref)
        share = _share((1.0 - kept) * ref, expected, {t: float(s.size) for t, s in self.shapes.items()})
        out = {}
        for t in self.towers:
            s = self.shapes[t]
            hidden, heads, _ = (float(x) for x in self._expected_counts(t))
            scale = share[t] / expected[t] if expected[t] > 0 else 1.0
            hint = math.sqrt(max(0.0, hidden * s.head_dim * heads * scale))  # width of the equal-size uniform tower
            n_heads, n_mlp = _uniform_structure(s, share[t], hint, ref)
            out[t] = self._select(t, n_heads, n_mlp)
        self._plan_cache = (key, out)
        return out

    def plan(self, tower: Tower) -> TowerPlan:
        """`plans()[tower]`."""
        return self.plans()[tower]

    def _select(self, tower: Tower, n_heads: int, n_mlp: int) -> TowerPlan:
        s = self.shapes[tower]
        imp_hidden, imp_heads, imp_mlp = _importance(self._tower_module(tower), s)
        la = {g: self.log_alpha[f"{tower}_{g}"].detach() for g in ("hidden", "heads", "mlp")}
        hidden = _top(la["hidden"], imp_hidden, n_heads * s.head_dim)  # open_clip ties width to heads x head_dim
        heads = _top(la["heads"], imp_heads, n_heads)
        mlp = _top(la["mlp"], imp_mlp, n_mlp)

        def dense(g: str, idx: torch.Tensor) -> torch.Tensor:
            score = self._score(la[g])
            return torch.zeros_like(score).scatter(-1, idx, score.gather(-1, idx))

        return TowerPlan(hidden, heads, mlp, dense("hidden", hidden), dense("heads", heads), dense("mlp", mlp))

    def _gates(self, tower: Tower, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if training:
            return tuple(self._sample(self.log_alpha[f"{tower}_{g}"]) for g in ("hidden", "heads", "mlp"))  # type: ignore[return-value]
        p = self.plan(tower)
        return p.hidden_z, p.heads_z, p.mlp_z

    @torch.no_grad()
    def deterministic_sparsity(self) -> float:
        """Sparsity (same measure, relative to the original model) of the structure `prune()` would keep now."""
        kept = 0
        for t, p in self.plans().items():
            s = self.shapes[t]
            width, heads, mlp = p.hidden.numel(), p.heads.shape[1], p.mlp.shape[1]
            kept += s.layers * width * (4 * s.head_dim * heads + 2 * mlp)
        return 1.0 - kept / self.reference_size

    def structure(self) -> dict[str, dict[str, int]]:
        """Per tower, the layers / width / heads / head width / MLP neurons that `prune()` would keep now."""
        out = {}
        for t, p in self.plans().items():
            s = self.shapes[t]
            out[t] = {
                "layers": s.layers,
                "width": p.hidden.numel(),
                "heads": p.heads.shape[1],
                "head_width": s.head_dim,
                "mlp": p.mlp.shape[1],
            }
        return out

    @torch.no_grad()
    def summary(self) -> dict[str, float | str | dict]:
        """Plain numbers for logs and run.json: sparsities, multipliers, the structure that would be kept."""
        return {
            "target_sparsity": self.target_sparsity,
            "start_sparsity": self.start_sparsity,
            "constraint": self.constraint,
            "expected_sparsity": round(float(self.expected_sparsity()), 5),
            "sparsity": round(self.deterministic_sparsity(), 5),
            "lambda_1": round(float(self.lambdas["lambda_1"]), 4),
            "lambda_2": round(float(self.lambdas["lambda_2"]), 4),
            "structure": self.structure(),
        }

    # -- masked forward -----------------------------------------------------------------------------------------------
    def _masked_forward(self, tower: Tower, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hidden_z, heads_z, mlp_z = self._gates(tower, module.training)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        cast = dtype or (x.dtype if x.is_floating_point() else module.transformer.get_cast_dtype())
        hidden_z, heads_z, mlp_z = hidden_z.to(cast), heads_z.to(cast), mlp_z.to(cast)
        # NOTE: training always takes the masked LayerNorm (no host sync per step); eval skips it when nothing is cut
        keep = hidden_z != 0
        if not module.training and bool(keep.all()):
            keep = None
        if tower == "image":
            return self._vit_forward(module, x, hidden_z, keep, heads_z, mlp_z)
        return self._text_forward(module, x, hidden_z, keep, heads_z, mlp_z)

    @staticmethod
    def _vit_forward(
        vit: VisionTransformer,
        image: torch.Tensor,
        hidden_z: torch.Tensor,
        keep: torch.Tensor | None,
        heads_z: torch.Tensor,
        mlp_z: torch.Tensor,
    ) -> torch.Tensor:
        x = vit.conv1(image)
        x = x.flatten(2).transpose(1, 2)  # [B, W, g, g] -> [B, g*g, W]
        cls_tok = vit.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls_tok, x], dim=1) + vit.positional_embedding.to(x.dtype)
        x = vit.patch_dropout(x) * hidden_z
        if not isinstance(vit.ln_pre, nn.Identity):
            x = _masked_layer_norm(vit.ln_pre, x, keep) * hidden_z
        for i, block in enumerate(vit.transformer.resblocks):
            x = _masked_block(block, x, hidden_z, keep, heads_z[i], mlp_z[i], None)
        x = _masked_layer_norm(vit.ln_post, x, keep)
        pooled, _ = vision_global_pool(vit, x)
        return pooled @ vit.proj if vit.proj is not None else pooled

    @staticmethod
    def _text_forward(
        tt: TextTransformer,
        text: torch.Tensor,
        hidden_z: torch.Tensor,
        keep: torch.Tensor | None,
        heads_z: torch.Tensor,
        mlp_z: torch.Tensor,
    ) -> torch.Tensor:
        seq_len = text.shape[1]
        x = tt.token_embedding(text) + tt.positional_embedding[:seq_len]
        x = x * hidden_z
        attn_mask = tt.attn_mask[:seq_len, :seq_len].to(x.dtype) if tt.attn_mask is not None else None
        for i, block in enumerate(tt.transformer.resblocks):
            x = _masked_block(block, x, hidden_z, keep, heads_z[i], mlp_z[i], attn_mask)
        x = _masked_layer_norm(tt.ln_final, x, keep)
        pooled = text_global_pool(x, text, pool_type=tt.pool_type, eos_token_id=getattr(tt, "eos_id", None))
        if tt.text_projection is None:
            return pooled
        if isinstance(tt.text_projection, nn.Linear):
            return tt.text_projection(pooled)
        return pooled @ tt.text_projection

    # -- pruning ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self) -> CLIPStudent:
        """A NEW, smaller `CLIPStudent` (plain open_clip config) holding the kept weights, gate values folded in.

        Its outputs equal the masked student's eval-mode outputs. The original student is left as is (still
        attached: call `detach()` if it lives on).
        """
        cfg = self.student.cfg
        state = {k: v.clone() for k, v in self.student.state_dict().items()}
        image_cfg, text_cfg = cfg.image, cfg.text
        self._plan_cache = None  # NOTE: recompute from the final weights (tie-breaks read them)
        expected = float(self.expected_sparsity())
        if abs(expected - self.target_sparsity) > 0.02:
            _logger.warning(
                "L0 masks expect sparsity %.3f, target %.3f: they had not converged, the kept structure is sized "
                "to %.3f (train the masks longer, see docs/L0.md)",
                expected,
                self.target_sparsity,
                self.kept_sparsity(expected),
            )
        for tower, p in self.plans().items():
            s = self.shapes[tower]
            module = self._tower_module(tower)
            prefix = "visual." if tower == "image" else "text."
            _fold_tower(state, prefix, module, p, s, tower)
            width, heads, mlp = p.hidden.numel(), p.heads.shape[1], p.mlp.shape[1]
            ratio = _mlp_ratio(mlp, width)
            if tower == "image":
                image_cfg = dataclasses.replace(image_cfg, width=width, head_width=s.head_dim, mlp_ratio=ratio)
            else:
                text_cfg = dataclasses.replace(text_cfg, width=width, heads=heads, mlp_ratio=ratio)
        name = cfg.name if cfg.name.endswith("_pruned") else f"{cfg.name}_pruned"
        new_cfg = dataclasses.replace(cfg, name=name, image=image_cfg, text=text_cfg)
        ref = self.student.logit_scale
        with torch.device(ref.device):
            pruned = build_student(new_cfg)
        pruned.load_state_dict(state, strict=True)
        pruned.train(self.student.training)
        _logger.info("pruned %s -> %s: %s", cfg.name, new_cfg.name, self.structure())
        return pruned


def _fold_tower(
    state: dict[str, torch.Tensor], prefix: str, module: nn.Module, p: TowerPlan, s: _TowerShape, tower: str
) -> None:
    """Replace the tower's tensors in `state` by the kept slices, with the gate values multiplied in."""
    hid = p.hidden
    zh = p.hidden_z[hid]

    def take(key: str, dim: int, idx: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        t = state[prefix + key].index_select(dim, idx.to(state[prefix + key].device))
        if scale is not None:
            shape = [1] * t.ndim
            shape[dim] = -1
            t = t * scale.to(t).view(shape)
        state[prefix + key] = t

    if tower == "image":
        take("conv1.weight", 0, hid, zh)
        take("class_embedding", 0, hid, zh)
        take("positional_embedding", 1, hid, zh)
        if not isinstance(module.ln_pre, nn.Identity):
            take("ln_pre.weight", 0, hid, zh)
            take("ln_pre.bias", 0, hid, zh)
        take("ln_post.weight", 0, hid)
        take("ln_post.bias", 0, hid)
        if module.proj is not None:
            take("proj", 0, hid)
    else:
        take("token_embedding.weight", 1, hid, zh)
        take("positional_embedding", 1, hid, zh)
        take("ln_final.weight", 0, hid)
        take("ln_final.bias", 0, hid)
        if isinstance(module.text_projection, nn.Linear):
            take("text_projection.weight", 1, hid)
        elif module.text_projection is not None:
            take("text_projection", 0, hid)

    ar = torch.arange(s.head_dim, device=p.heads.device)
    for i in range(s.layers):
        b = f"transformer.resblocks.{i}."
        heads = p.heads[i]
        head_z = p.heads_z[i][heads].repeat_interleave(s.head_dim)  # [H'*hd]
        inner = (heads[:, None] * s.head_dim + ar).flatten()  # attention dims of the kept heads
        qkv_rows = torch.cat([inner + j * s.heads * s.head_dim for j in range(3)])  # q, k, v blocks
        mlp = p.mlp[i]
        mlp_z = p.mlp_z[i][mlp]
        take(b + "attn.in_proj_weight", 0, qkv_rows)
        take(b + "attn.in_proj_weight", 1, hid)
        take(b + "attn.in_proj_bias", 0, qkv_rows)
        take(b + "attn.out_proj.weight", 0, hid, zh)
        take(b + "attn.out_proj.weight", 1, inner, head_z)
        take(b + "attn.out_proj.bias", 0, hid, zh)
        for ln in ("ln_1", "ln_2"):
            take(f"{b}{ln}.weight", 0, hid)
            take(f"{b}{ln}.bias", 0, hid)
        for ls in ("ls_1.gamma", "ls_2.gamma"):
            if prefix + b + ls in state:
                take(b + ls, 0, hid)
        take(b + "mlp.c_fc.weight", 0, mlp)
        take(b + "mlp.c_fc.weight", 1, hid)
        take(b + "mlp.c_fc.bias", 0, mlp)
        take(b + "mlp.c_proj.weight", 0, hid, zh)
        take(b + "mlp.c_proj.weight", 1, mlp, mlp_z)
        take(b + "mlp.c_proj.bias", 0, hid, zh)
