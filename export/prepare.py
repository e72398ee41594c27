"""Prepare a CLIP student for export: fold, wrap, and rewrite into ops that mobile delegates run well.

`prepare_towers` deep-copies a student, puts it in eval mode, folds every re-parameterisable block
(MobileOne / RepMixer / RepCPE: the student's own ``reparameterize()``, or timm's ``reparameterize_model`` for a
plain open_clip model) and wraps the image and text towers separately with fixed signatures that return
L2-normalised embeddings:

* image ``float32[B, 3, H, W]`` in [0, 1]; the student's mean/std normalisation is folded into the wrapper;
* text ``int32[B, L]`` token ids (L = the student's context length).

CoCa students export their two towers (the contrastive embeddings); the captioning decoder stays PyTorch-only.
Their towers return ``(embedding, tokens)``: the wrappers keep the embedding, and the attentional pooler keeps
only its first (contrastive) query, which is exact because pooler queries never attend to each other.

Export-friendly rewrites (numerically equivalent to the eager tower; tests compare them):

* attention as explicit ``bmm``/``softmax`` on 3D tensors with q/k/v split into three linears and the softmax
  scale folded into q. ``F.scaled_dot_product_attention`` decomposes in ExecuTorch into a "safe softmax" with
  ``any``/``eq``/``where``/``full_like`` that XNNPACK cannot delegate, cutting the graph into many delegates;
* open_clip text towers (and MobileCLIP-S0's MCt) are rebuilt (`TransformerTextEncoder`): the EOT token is
  picked with a one-hot ``bmm`` instead of advanced indexing (an ``index`` op XNNPACK does not take), the
  final LayerNorm and projection run on that one token, the last block only computes the EOT query
  (keys/values still see every token; not for MCt, whose last RepMixer needs every token), and
  LayerScale/LayerNorm affines are folded into the next linear;
* for ``backend="xnnpack"`` (ExecuTorch) LayerNorm and the L2 norm are written with matmul-based means,
  because XNNPACK 1.5 has no layer_norm/sum kernels and leaves them to the portable runtime, which splits the
  graph into dozens of delegates. For ``backend="coreml"`` the L2 norm is made FP16-overflow-safe;
* for ``backend="xnnpack"`` grouped/depthwise convolutions larger than 5x5 (MCi's 7x7 ConvFFN, RepCPE and patch
  embedding convs) are computed as sums of 5x5 convolutions over shifted views of the padded input
  (`TiledGroupedConv`, exact up to summation order): measured with executorch 1.5.1 on an AVX2 CPU, XNNPACK's
  7x7 depthwise kernel takes 40 ms on a 64x64x64 map where its 5x5 kernel takes 0.6 ms (ONNX Runtime: 0.46 ms).

References: timm ``fastvit.py`` (MobileCLIP MCi towers, ``reparameterize``), open_clip ``transformer.py``
(``TextTransformer``, ``text_global_pool``), apple/ml-mobileclip (MobileCLIP, CVPR'24),
ExecuTorch XNNPACK partitioner configs (which ATen ops it delegates).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import reparameterize_model

_logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "ExportFastVitAttention",
    "ExportLayerNorm",
    "ExportMultiheadAttention",
    "ImageEncoder",
    "L2Norm",
    "RowReduce",
    "TextEncoder",
    "TiledGroupedConv",
    "TransformerTextEncoder",
    "example_inputs",
    "prepare_towers",
    "reparameterize",
    "student_meta",
    "untile_grouped_convs",
    "vocab_size",
]

# NOTE: causal masks use a finite value instead of -inf: it is safe in FP16 (|value| < 65504) and cannot turn
# into NaN (-inf - -inf) in a fully masked row or a mask arithmetic; exp(-3e4) underflows to exactly 0 in FP32
# and FP16, so it behaves as -inf.
_MASK_VALUE = -3.0e4

Backend = Literal["eager", "xnnpack", "coreml"]


# ----------------------------------------------------------------------------------------------------------------------
# Small export-friendly building blocks


class RowReduce(nn.Module):
    """Last-dim sum (``scale=1``) or mean (``scale=1/dim``) as ``F.linear`` with a constant ``[1, dim]`` row.

    XNNPACK 1.5 has no sum/layer_norm kernels but delegates ``linear``. Being a module lets int8 quantisers skip
    it by type (an int8 mean would wreck LayerNorm).
    """

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        # NOTE: a constant buffer, not a tensor made in forward(): the delegate only takes constant weights
        self.register_buffer("row", torch.full((1, dim), float(scale)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.row)


class L2Norm(nn.Module):
    """``F.normalize(x, dim=-1)`` (eps 1e-12) in a backend-friendly form.

    Args:
        dim: Feature width (needed by ``"xnnpack"``).
        backend: ``"eager"``: ``F.normalize``. ``"xnnpack"``: sum of squares as a delegable ``linear`` and an
            ``rsqrt``. ``"coreml"``: divide by the max magnitude first so the FP16 sum of squares cannot
            overflow (512 values of 12 already exceed FP16's 65504).
    """

    def __init__(self, dim: int | None = None, backend: Backend = "eager") -> None:
        super().__init__()
        self.backend = backend
        self.sum = RowReduce(dim, 1.0) if backend == "xnnpack" and dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sum is not None:
            # x / max(||x||, 1e-12) == x * rsqrt(max(||x||^2, 1e-24))
            return x * torch.rsqrt(torch.clamp(self.sum(x * x), min=1e-24))
        if self.backend == "coreml":
            peak = x.abs().amax(dim=-1, keepdim=True)
            # scale-invariant, exact up to rounding; maximum() rather than clamp(): CoreML turns clamp into clip
            # with an FP32-max upper bound that overflows the FP16 cast
            x = x / torch.maximum(peak, torch.full_like(peak, 1e-6))
        return F.normalize(x, dim=-1)


class TiledGroupedConv(nn.Module):
    """A grouped ``k x k`` convolution (k > ``tile``) as the sum of ``tile x tile`` convolutions of shifted views.

    The kernel is cut into spatial tiles; tile ``(i, j)`` convolves the zero-padded input starting at the tile's
    offset, so every tap multiplies the same pixel as in the original convolution (any stride, any groups).

    Args:
        conv: The convolution (zero padding, no dilation, square kernel).
        bn: A BatchNorm that follows it (folded in), or None.
        tile: Tile size (XNNPACK's fast depthwise kernels go up to 5x5, i.e. 25 taps).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, tile: int = 5) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        self.stride, self.padding, self.groups, self.tile = conv.stride[0], conv.padding[0], conv.groups, tile
        weight = conv.weight.detach().clone()  # [O, I / groups, k, k]
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(weight.shape[0])
        if bn is not None:  # W' = W * gamma / sigma, b' = (b - mu) * gamma / sigma + beta
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight, bias = weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + bn.bias.detach()
        # tile j owns taps [j * tile, (j + 1) * tile) and sits at min(j * tile, k - tile) so it stays in the kernel
        owned = [(j * tile, min((j + 1) * tile, k)) for j in range((k + tile - 1) // tile)]
        self.offsets: list[tuple[int, int]] = []
        # NOTE: one Conv2d per tile (not a stacked buffer indexed in forward): the delegate takes constant weights only
        self.tiles = nn.ModuleList()
        for r0, r1 in owned:
            for c0, c1 in owned:
                oy, ox = min(r0, k - tile), min(c0, k - tile)
                part = nn.Conv2d(
                    conv.in_channels, conv.out_channels, tile, self.stride, 0, groups=self.groups, bias=False
                )
                with torch.no_grad():
                    part.weight.zero_()
                    part.weight[:, :, r0 - oy : r1 - oy, c0 - ox : c1 - ox] = weight[:, :, r0:r1, c0:c1]
                self.offsets.append((oy, ox))
                self.tiles.append(part)
        self.bias = nn.Parameter(bias.reshape(1, -1, 1, 1))
        self.kernel = k

    def as_conv(self) -> nn.Conv2d:
        """The equivalent single ``k x k`` convolution (tiles reassembled, the folded BatchNorm kept in its bias).

        For graphs XNNPACK cannot take with the tiles: in a static int8 program the zero padding of the shifted views
        becomes a quantized constant pad, which XNNPACK 1.5.1 refuses to compile (``StaticConstantPad ...
        xnn_status_invalid_parameter``), and the quantized depthwise kernels are not the slow FP32 ones.
        """
        first = self.tiles[0]
        k, t = self.kernel, self.tile
        conv = nn.Conv2d(
            first.in_channels, first.out_channels, k, self.stride, self.padding, groups=self.groups, bias=True
        )
        with torch.no_grad():
            weight = torch.zeros_like(conv.weight)
            for (oy, ox), part in zip(self.offsets, self.tiles, strict=True):
                weight[:, :, oy : oy + t, ox : ox + t] += part.weight
            conv.weight.copy_(weight)
            conv.bias.copy_(self.bias.flatten())
        return conv.to(first.weight.device)

    @staticmethod
    def supports(conv: nn.Module, tile: int = 5) -> bool:
        """Square grouped convolutions larger than ``tile`` with zero padding and no dilation."""
        return (
            isinstance(conv, nn.Conv2d)
            and conv.groups > 1
            and conv.kernel_size[0] == conv.kernel_size[1] > tile
            and conv.stride[0] == conv.stride[1]
            and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1]
            and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p, s, t = self.padding, self.stride, self.tile
        ho, wo = (h + 2 * p - self.kernel) // s + 1, (w + 2 * p - self.kernel) // s + 1
        x = F.pad(x, (p, p, p, p))
        out = None
        for (oy, ox), conv in zip(self.offsets, self.tiles, strict=True):
            # a view whose tile-size convolution has exactly the [ho, wo] outputs of the full kernel
            y = conv(x[:, :, oy : oy + s * (ho - 1) + t, ox : ox + s * (wo - 1) + t])
            out = y if out is None else out + y
        return out + self.bias


def untile_grouped_convs(model: nn.Module) -> int:
    """Replace every `TiledGroupedConv` in ``model`` by its single convolution (`TiledGroupedConv.as_conv`), in place.

    Returns:
        How many were replaced.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TiledGroupedConv):
                setattr(parent, name, child.as_conv())
                count += 1
    return count


def _set_embed_dim(encoder: nn.Module, dim: int) -> None:
    """Build a wrapper's L2 norm for its backend once the tower's output width is known."""
    encoder.l2 = L2Norm(dim, encoder.backend)


class ExportLayerNorm(nn.Module):
    """LayerNorm over the last dim; optionally decomposed into delegable matmul means.

    Args:
        norm: The LayerNorm to copy (``normalized_shape`` must be the last dim only).
        decomposed: Write mean/variance as matmuls (ExecuTorch XNNPACK) instead of ``F.layer_norm``.
        affine: Keep the affine weight/bias (False when they are folded into the following linear).
    """

    def __init__(self, norm: nn.LayerNorm, decomposed: bool, affine: bool = True) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"only last-dim LayerNorm can be rewritten, got {norm.normalized_shape}")
        self.dim = int(norm.normalized_shape[0])
        self.eps = float(norm.eps)
        self.decomposed = decomposed
        has_w = affine and norm.weight is not None
        has_b = affine and getattr(norm, "bias", None) is not None
        self.weight = nn.Parameter(norm.weight.detach().clone()) if has_w else None
        self.bias = nn.Parameter(norm.bias.detach().clone()) if has_b else None
        self.mean = RowReduce(self.dim, 1.0 / self.dim) if decomposed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decomposed:
            d = x - self.mean(x)
            x = d * torch.rsqrt(self.mean(d * d) + self.eps)
            if self.weight is not None:
                x = x * self.weight
            if self.bias is not None:
                x = x + self.bias
            return x
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


def _split_qkv(
    weight: torch.Tensor, bias: torch.Tensor | None, dim: int, scale: float
) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Split a packed ``[3*dim, dim]`` projection into q/k/v linears with the softmax scale folded into q."""
    ws = weight.detach().reshape(3, dim, -1)  # [3, dim_out, dim_in]
    bs = bias.detach().reshape(3, dim) if bias is not None else None
    out = []
    for i in range(3):
        lin = nn.Linear(ws.shape[-1], dim, bias=bs is not None)
        s = scale if i == 0 else 1.0
        with torch.no_grad():
            lin.weight.copy_(ws[i] * s)
            if bs is not None:
                lin.bias.copy_(bs[i] * s)
        out.append(lin)
    return out[0], out[1], out[2]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention core on 3D tensors (``bmm`` + last-dim softmax, no SDPA).

    Args:
        q: Queries `[B, Lq, C]`, already scaled.
        k: Keys `[B, L, C]`.
        v: Values `[B, L, C]`.
        heads: Number of heads.
        mask: Optional additive mask, `[Lq, L]` (shared), `[B, Lq, L]` (per sample) or `[B, H, Lq, L]` (per
            sample and head).

    Returns:
        `[B, Lq, C]`.
    """
    b, lq, c = q.shape
    lk = k.shape[1]
    dh = c // heads
    # [B, L, C] -> [B*H, L, Dh] (and [B*H, Dh, L] for keys) so that plain bmm applies: no expand, no 4D matmul
    qh = q.reshape(b, lq, heads, dh).permute(0, 2, 1, 3).reshape(b * heads, lq, dh)
    kh = k.reshape(b, lk, heads, dh).permute(0, 2, 3, 1).reshape(b * heads, dh, lk)
    vh = v.reshape(b, lk, heads, dh).permute(0, 2, 1, 3).reshape(b * heads, lk, dh)
    attn = torch.bmm(qh, kh)  # [B*H, Lq, L]
    if mask is not None and mask.dim() == 4:
        attn = (attn.reshape(b, heads, lq, lk) + mask).reshape(b * heads, lq, lk)
    elif mask is not None and mask.dim() == 3:
        # a per-sample mask [B, Lq, L]: broadcast over heads through a 4D view (repeat_interleave would become an
        # expand, which XNNPACK does not take)
        attn = (attn.reshape(b, heads, lq, lk) + mask.reshape(b, 1, lq, lk)).reshape(b * heads, lq, lk)
    elif mask is not None:
        attn = attn + mask  # [Lq, L], shared by every sample and head
    attn = attn.softmax(dim=-1)
    out = torch.bmm(attn, vh)  # [B*H, Lq, Dh]
    return out.reshape(b, heads, lq, dh).permute(0, 2, 1, 3).reshape(b, lq, c)


class ExportMultiheadAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` (returns ``(out, None)``).

    Only built for modules with packed, equal-size q/k/v projections (see `_replace_modules`). Self- and
    cross-attention (CoCa's attentional pooler) are supported; key padding masks and returned weights raise.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first
        dim = mha.embed_dim
        self.q, self.k, self.v = _split_qkv(mha.in_proj_weight, mha.in_proj_bias, dim, (dim // self.heads) ** -0.5)
        self.out = copy.deepcopy(mha.out_proj)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        """Whether ``mha`` can be rebuilt (packed q/k/v projection, no bias_k/zero-attn extras)."""
        return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and not mha.add_zero_attn

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None or kwargs.get("is_causal"):
            raise NotImplementedError("export rewrite supports an additive/bool attn_mask only (no key padding mask)")
        q, k, v = (t if self.batch_first else t.transpose(0, 1) for t in (query, key, value))  # [B, L, C]
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:  # True = not allowed (nn.MultiheadAttention semantics)
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, _MASK_VALUE)
            mask = mask.to(q.dtype).clamp(min=_MASK_VALUE)  # NOTE: -inf -> a finite value (no NaN, FP16-safe)
            if mask.dim() == 3:  # [B * H, L, S] (nn.MultiheadAttention's per-head layout) -> [B, H, L, S]
                mask = mask.reshape(q.shape[0], self.heads, mask.shape[1], mask.shape[2])
            elif mask.dim() != 2:
                raise NotImplementedError("export rewrite supports a [L, S] or [B * H, L, S] attn_mask only")
        out = self.out(_attend(self.q(q), self.k(k), self.v(v), self.heads, mask))
        return (out if self.batch_first else out.transpose(0, 1)), None


class ExportFastVitAttention(nn.Module):
    """Replacement for timm ``fastvit.Attention`` (MobileCLIP MCi last stages): `[B, C, H, W]` in and out."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        dim = attn.qkv.in_features
        self.heads = attn.num_heads
        self.q, self.k, self.v = _split_qkv(attn.qkv.weight, attn.qkv.bias, dim, attn.scale)
        self.proj = copy.deepcopy(attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        t = self.proj(_attend(self.q(t), self.k(t), self.v(t), self.heads))
        return t.transpose(1, 2).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------------------------------
# Model surgery


def reparameterize(model: nn.Module) -> None:
    """Fold every re-parameterisable block in place: the student's own ``reparameterize()`` when it has one
    (``students.CLIPStudent``), else timm's ``reparameterize_model`` (the same duck-typed walk)."""
    if callable(getattr(model, "reparameterize", None)):
        model.reparameterize()
    else:
        reparameterize_model(model, inplace=True)


def _contrastive_only(tower: nn.Module) -> None:
    """Drop the token outputs of a CoCa tower (open_clip ``output_tokens``), keeping its embedding, in place.

    The attentional pooler of open_clip's original CoCa layout is cut to its first query: ``ln_post`` and the
    cross-attention act per query, so the first output row is unchanged while the other (decoder) queries are no
    longer computed.
    """
    if getattr(tower, "output_tokens", False):
        tower.output_tokens = False
    pool = getattr(tower, "attn_pool", None)
    if pool is not None and getattr(tower, "attn_pool_contrastive", None) is None and tower.pool_type == "tok":
        pool.query = nn.Parameter(pool.query.detach()[:1].clone())  # [1, D]: the contrastive query


def _replace_modules(model: nn.Module, decompose_norms: bool) -> dict[str, int]:
    """Swap attention (and, optionally, LayerNorm) modules for export-friendly equivalents, in place."""
    counts = {"attention": 0, "layer_norm": 0, "unfused_attention": 0, "tiled_conv": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if decompose_norms and TiledGroupedConv.supports(child):
                # a conv followed by its BatchNorm (timm ConvNormAct, BN without activation): fold the BN too, since
                # ExecuTorch's conv-BN fusion no longer sees a single conv
                bn = getattr(parent, "bn", None) if name == "conv" else None
                foldable = isinstance(bn, nn.BatchNorm2d) and isinstance(getattr(bn, "act", nn.Identity()), nn.Identity)
                new = TiledGroupedConv(child, bn if foldable else None)
                if foldable:
                    parent.bn = nn.Identity()
                counts["tiled_conv"] += 1
            elif isinstance(child, nn.MultiheadAttention) and ExportMultiheadAttention.supports(child):
                new = ExportMultiheadAttention(child)
                counts["attention"] += 1
            elif type(child).__name__ == "Attention" and type(child).__module__.endswith("fastvit"):
                new = ExportFastVitAttention(child)
                counts["attention"] += 1
            elif decompose_norms and isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                new = ExportLayerNorm(child, decomposed=True)
                counts["layer_norm"] += 1
            elif hasattr(child, "fused_attn"):
                # other timm attention: its non-fused path avoids SDPA's un-delegable safe-softmax decomposition
                child.fused_attn = False
                counts["unfused_attention"] += 1
            if new is not None:
                setattr(parent, name, new)
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Wrappers


class ImageEncoder(nn.Module):
    """Image tower with a fixed signature: `[B, 3, H, W]` float in [0, 1] -> `[B, D]` L2-normalised.

    Args:
        visual: The (prepared) image tower; takes normalised pixels.
        mean: Per-channel mean the tower was trained with.
        std: Per-channel std.
        image_size: Input resolution (square).
        backend: Which form of the L2 norm to use (see `L2Norm`).
    """

    def __init__(
        self,
        visual: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        backend: Backend = "eager",
    ) -> None:
        super().__init__()
        self.visual = visual
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        self.backend = backend
        # NOTE: MobileCLIP(2)-S0..S2 use mean 0 / std 1, so the normalisation disappears from the graph entirely
        self.normalize_input = not self.identity_normalization
        scale = torch.tensor([1.0 / s for s in self.std]).view(1, 3, 1, 1)
        self.register_buffer("in_scale", scale, persistent=False)
        self.register_buffer("in_bias", -torch.tensor(self.mean).view(1, 3, 1, 1) * scale, persistent=False)
        self.l2 = L2Norm(None, backend)  # rebuilt by `_set_embed_dim` once the width is known

    @property
    def identity_normalization(self) -> bool:
        """True when mean is 0 and std is 1 (pixels in [0, 1] go to the tower unchanged)."""
        return all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Embed images in [0, 1] `[B, 3, H, W]`; returns `[B, D]`."""
        x = image * self.in_scale + self.in_bias if self.normalize_input else image
        out = self.visual(x)
        if isinstance(out, (tuple, list)):  # (embedding, tokens) towers (CoCa): the embedding
            out = out[0]
        return self.l2(out)


class TextEncoder(nn.Module):
    """Generic text tower wrapper: `[B, L]` int32 token ids -> `[B, D]` L2-normalised.

    Args:
        text: The (prepared) text tower; called with int64 ids, returns pooled features `[B, D]`.
        context_length: Fixed token length L.
        backend: Which form of the L2 norm to use (see `L2Norm`).
    """

    def __init__(self, text: nn.Module, context_length: int, backend: Backend = "eager") -> None:
        super().__init__()
        self.text = text
        self.context_length = int(context_length)
        self.backend = backend
        self.l2 = L2Norm(None, backend)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Embed token ids `[B, L]`; returns `[B, D]`."""
        out = self.text(text.long())
        if isinstance(out, (tuple, list)):
            out = out[0]
        return self.l2(out)


class _EncoderBlock(nn.Module):
    """open_clip ``ResidualAttentionBlock`` rebuilt from plain linears, LayerScale and LN affines folded."""

    def __init__(self, block: nn.Module, decompose_norms: bool) -> None:
        super().__init__()
        mha: nn.MultiheadAttention = block.attn
        dim, self.heads = mha.embed_dim, mha.num_heads
        q, k, v = _split_qkv(mha.in_proj_weight, mha.in_proj_bias, dim, (dim // self.heads) ** -0.5)
        self.ln_1 = ExportLayerNorm(block.ln_1, decompose_norms, affine=False)
        self.q, self.k, self.v = (_fold_norm_affine(block.ln_1, lin) for lin in (q, k, v))
        self.out = _fold_scale(copy.deepcopy(mha.out_proj), _layer_scale(block.ls_1))
        self.ln_2 = ExportLayerNorm(block.ln_2, decompose_norms, affine=False)
        self.fc1 = _fold_norm_affine(block.ln_2, copy.deepcopy(block.mlp.c_fc))
        self.act = copy.deepcopy(block.mlp.gelu)
        self.fc2 = _fold_scale(copy.deepcopy(block.mlp.c_proj), _layer_scale(block.ls_2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.out(_attend(self.q(h), self.k(h), self.v(h), self.heads, mask))
        return x + self.fc2(self.act(self.fc1(self.ln_2(x))))

    def forward_pooled(self, x: torch.Tensor, pick: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last block computed for one token only: its query attends over every key/value.

        Args:
            x: Tokens `[B, L, C]`.
            pick: One-hot row selector `[B, 1, L]`.
            mask: Additive mask row for the picked query `[B, 1, L]`.

        Returns:
            The picked token's output `[B, 1, C]`.
        """
        h = self.ln_1(x)
        h_pick = torch.bmm(pick, h)  # [B, 1, C]; LayerNorm is per token, so picking after it is exact
        x_pick = torch.bmm(pick, x)
        x_pick = x_pick + self.out(_attend(self.q(h_pick), self.k(h), self.v(h), self.heads, mask))
        return x_pick + self.fc2(self.act(self.fc1(self.ln_2(x_pick))))


def _layer_scale(ls: nn.Module) -> torch.Tensor | None:
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        raise TypeError(f"unsupported LayerScale module {type(ls).__name__}")
    return gamma.detach()


def _fold_scale(lin: nn.Linear, gamma: torch.Tensor | None) -> nn.Linear:
    """``gamma * (W x + b)`` -> ``(gamma W) x + gamma b``."""
    if gamma is not None:
        with torch.no_grad():
            lin.weight.mul_(gamma[:, None])
            if lin.bias is not None:
                lin.bias.mul_(gamma)
    return lin


def _fold_norm_affine(norm: nn.LayerNorm, lin: nn.Linear) -> nn.Linear:
    """``W (x_hat * g + beta) + b`` -> ``(W diag(g)) x_hat + (W beta + b)`` (exact)."""
    w = lin.weight.detach()
    g = norm.weight.detach() if norm.weight is not None else torch.ones(w.shape[1])
    beta = norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros(w.shape[1])
    new = nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        new.weight.copy_(w * g[None, :])
        b = w @ beta
        if lin.bias is not None:
            b = b + lin.bias.detach()
        new.bias.copy_(b)
    return new


def _is_open_clip_text(text: nn.Module) -> bool:
    """Duck-type open_clip's ``TextTransformer`` made of standard ``ResidualAttentionBlock``s.

    ``students.MCtTextTower`` matches too: the same embeddings, blocks, ``ln_final`` and projection, plus
    sequence-to-sequence RepMixer blocks ``mixer_in``/``mixer_out`` around the transformer.
    """
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "pool_type", "text_projection")
    if not all(hasattr(text, a) for a in needed) or getattr(text, "cls_emb", None) is not None:
        return False
    if getattr(text, "use_pad_mask", False) or getattr(text, "output_tokens", False):
        return False
    if text.pool_type not in ("argmax", "eos", "first", "last"):
        return False
    blocks = getattr(text.transformer, "resblocks", None)
    if not blocks:
        return False
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or hasattr(blk, "ln_1_kv"):
            return False
        if not all(hasattr(blk, a) for a in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp")):
            return False
        if not isinstance(blk.ln_1, nn.LayerNorm) or not isinstance(blk.ln_2, nn.LayerNorm):
            return False
        if not all(hasattr(blk.mlp, a) for a in ("c_fc", "gelu", "c_proj")):
            return False
    return isinstance(text.ln_final, nn.LayerNorm)


class TransformerTextEncoder(TextEncoder):
    """open_clip ``TextTransformer`` (or MCt) rebuilt for export (same outputs; see the module docstring).

    Args:
        text: An open_clip-style text transformer (argmax/eos/first/last pooling, no CLS token), optionally with
            ``mixer_in``/``mixer_out`` token mixers (MobileCLIP-S0's MCt), which are kept as they are.
        context_length: Fixed token length L.
        backend: ``"xnnpack"`` writes LayerNorm and the L2 norm as delegable matmuls; see `L2Norm`.
    """

    def __init__(self, text: nn.Module, context_length: int, backend: Backend = "eager") -> None:
        nn.Module.__init__(self)
        self.context_length = int(context_length)
        self.backend = backend
        self.l2 = L2Norm(None, backend)
        decompose_norms = backend == "xnnpack"
        self.pool_type: str = text.pool_type
        self.eos_id = int(getattr(text, "eos_id", 2) or 2)
        self.token_embedding = copy.deepcopy(text.token_embedding)
        pos = text.positional_embedding.detach()[: self.context_length].clone()
        self.register_buffer("positional_embedding", pos, persistent=False)  # [L, C]
        self.mixer_in = _rewritten(getattr(text, "mixer_in", None), decompose_norms)
        blocks = list(text.transformer.resblocks)
        self.blocks = nn.ModuleList(_EncoderBlock(b, decompose_norms) for b in blocks)
        self.mixer_out = _rewritten(getattr(text, "mixer_out", None), decompose_norms)
        mask = getattr(text, "attn_mask", None)
        if mask is not None:
            mask = mask.detach()[: self.context_length, : self.context_length].clamp(min=_MASK_VALUE).clone()
        self.register_buffer("attn_mask", mask, persistent=False)  # [L, L] additive, or None (bidirectional)
        self.ln_final = ExportLayerNorm(text.ln_final, decompose_norms, affine=False)
        proj = text.text_projection
        if proj is None:
            width = self.positional_embedding.shape[1]
            lin = nn.Linear(width, width, bias=False)
            nn.init.eye_(lin.weight)
        elif isinstance(proj, nn.Linear):
            lin = copy.deepcopy(proj)
        else:  # a [C, D] parameter used as x @ P
            lin = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
            with torch.no_grad():
                lin.weight.copy_(proj.detach().t())
        self.proj = _fold_norm_affine(text.ln_final, lin)

    def _pick(self, text: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Index `[B, 1]` and one-hot selector `[B, 1, L]` of the pooled token."""
        b, length = text.shape
        if self.pool_type == "argmax":
            # EOT has the largest id in CLIP's vocabulary; argmax returns the first maximum like open_clip
            idx = text.argmax(dim=-1, keepdim=True)
        elif self.pool_type == "eos":
            idx = (text == self.eos_id).to(torch.int32).argmax(dim=-1, keepdim=True)
        else:
            idx = torch.full((b, 1), 0 if self.pool_type == "first" else length - 1, dtype=torch.long)
        pos = torch.arange(length, device=text.device).reshape(1, length)
        return idx, (pos == idx).to(dtype).reshape(b, 1, length)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Embed token ids `[B, L]`; returns `[B, D]`."""
        x = self.token_embedding(text.long()) + self.positional_embedding  # [B, L, C]
        idx, pick = self._pick(text, x.dtype)
        mask = self.attn_mask
        if self.mixer_in is not None:
            x = self.mixer_in(x)
        for blk in self.blocks[:-1]:
            x = blk(x, mask)
        if self.mixer_out is None:
            # the picked query's mask row [B, 1, L], looked up like a token embedding, before the delegate
            row = F.embedding(idx, mask) if mask is not None else None
            x = self.blocks[-1].forward_pooled(x, pick, row)  # [B, 1, C]
        else:
            # the mixer convolves along the sequence, so the last block must produce every token
            x = torch.bmm(pick, self.mixer_out(self.blocks[-1](x, mask)))  # [B, 1, C]
        x = self.proj(self.ln_final(x)).reshape(x.shape[0], -1)  # [B, D]; reshape, not squeeze (delegable)
        return self.l2(x)


def _rewritten(module: nn.Module | None, decompose_norms: bool) -> nn.Module | None:
    if module is None:
        return None
    module = copy.deepcopy(module)
    _replace_modules(module, decompose_norms)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def _student_attr(student: nn.Module, name: str, default=None):  # noqa: ANN001, ANN202
    value = getattr(student, name, None)
    if value is None:
        cfg = getattr(student, "cfg", None)
        value = getattr(getattr(cfg, "image", None), name, None) if cfg is not None else None
    return default if value is None else value


def student_meta(student: nn.Module) -> dict:
    """Image size, mean/std, context length and embed dim of a student (``CLIPStudent`` or an open_clip model)."""
    pre = getattr(getattr(student, "visual", None), "preprocess_cfg", None) or {}
    visual = getattr(student, "visual", None)
    image_size = _student_attr(student, "image_size", getattr(visual, "image_size", None) or pre.get("size"))
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    mean = tuple(_student_attr(student, "mean", pre.get("mean", (0.0, 0.0, 0.0))))
    std = tuple(_student_attr(student, "std", pre.get("std", (1.0, 1.0, 1.0))))
    context_length = _student_attr(student, "context_length", None)
    if context_length is None:
        context_length = getattr(getattr(student, "text", None), "context_length", 77)
    embed_dim = _student_attr(student, "embed_dim", None)
    return {
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "context_length": int(context_length),
        "embed_dim": None if embed_dim is None else int(embed_dim),
    }


def prepare_towers(
    student: nn.Module, *, backend: Backend = "eager", rewrite: bool = True
) -> tuple[ImageEncoder, TextEncoder]:
    """Deep-copy, fold and wrap a student's image and text towers for export.

    Args:
        student: A ``students.CLIPStudent`` (or any model with ``.visual``/``.text`` and open_clip semantics).
            It is not modified.
        backend: ``"xnnpack"`` (ExecuTorch) also rewrites LayerNorm and the L2 norm as matmul-based means, which
            XNNPACK delegates; ``"coreml"`` keeps the fused ``layer_norm`` (more accurate in FP16) and makes the L2
            norm FP16-safe; ``"eager"`` keeps both as they are.
        rewrite: Apply the export-friendly attention/pooling rewrites (False wraps the towers as they are;
            useful to compare lowering with and without them).

    Returns:
        ``(image_encoder, text_encoder)`` in eval mode, with ``requires_grad`` off.
    """
    if backend not in ("eager", "xnnpack", "coreml"):
        raise ValueError(f"backend must be eager, xnnpack or coreml, got {backend!r}")
    meta = student_meta(student)
    model = copy.deepcopy(student).eval()
    reparameterize(model)
    visual, text = model.visual, model.text
    for tower in (visual, text):
        _contrastive_only(tower)
    decompose = backend == "xnnpack"
    if rewrite:
        _logger.debug("image tower rewrites: %s", _replace_modules(visual, decompose))
    image = ImageEncoder(visual, meta["mean"], meta["std"], meta["image_size"], backend=backend)
    if rewrite and _is_open_clip_text(text):
        text_enc: TextEncoder = TransformerTextEncoder(text, meta["context_length"], backend)
    else:
        if rewrite:
            _logger.debug("text tower rewrites: %s", _replace_modules(text, decompose))
        text_enc = TextEncoder(text, meta["context_length"], backend)
    _logger.debug("text wrapper %s", type(text_enc).__name__)
    image_x, tokens = example_inputs(meta["image_size"], meta["context_length"], vocab_size(text))
    for enc, x in ((image, image_x), (text_enc, tokens)):
        enc.eval().requires_grad_(False)
        with torch.no_grad():
            _set_embed_dim(enc, enc(x).shape[-1])  # one dry run: the output width of the tower
    return image, text_enc


def vocab_size(text: nn.Module) -> int:
    """Vocabulary size of a text tower (its first ``nn.Embedding``), 49408 (CLIP) if none is found."""
    emb = getattr(text, "token_embedding", None)
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    for m in text.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return 49408


def example_inputs(
    image_size: int, context_length: int, vocab_size: int = 49408, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed parity inputs: a random image in [0, 1] `[1, 3, H, W]` and a token row `[1, L]` int32.

    The token row mimics CLIP tokenisation: SOT (``vocab_size - 2``), a few word ids, EOT (``vocab_size - 1``,
    the largest id), then zero padding, so argmax pooling picks a mid-sequence token.
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, image_size, image_size, generator=g)
    n_words = max(1, min(context_length - 2, 7))
    words = torch.randint(1, max(2, vocab_size - 2), (n_words,), generator=g)
    row = torch.zeros(context_length, dtype=torch.int32)
    row[0] = vocab_size - 2
    row[1 : 1 + n_words] = words.to(torch.int32)
    row[1 + n_words] = vocab_size - 1
    return image, row.unsqueeze(0)
