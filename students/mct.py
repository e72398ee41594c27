"""The MobileCLIP-S0 "MCt" text tower: RepMixer block + transformer encoder layers + RepMixer block.

Structure (MobileCLIP paper, Sec. 4 / Fig. 4; apple/ml-mobileclip `mobileclip/text_encoder.py`, variant "mct"):
token embedding + learnable positional embedding -> RepMixerBlock (depthwise conv, kernel 11, over the sequence)
-> N pre-norm transformer encoder layers (no causal mask) -> RepMixerBlock -> final LayerNorm -> argmax-EOT pooling
-> linear projection. The S0 size (width 512, 8 heads, 4 layers, FFN 4x) has 42.44 M parameters.

This is our own implementation. The transformer layers are open_clip's `Transformer` (pre-norm, fused QKV), so the
keys of those layers, of the embeddings, `ln_final` and `text_projection` match open_clip's `TextTransformer` and
TinyCLIP-style weight inheritance from a transformer text tower needs no special case. The RepMixer branches are
written for 1-D sequences (`Conv1d`/`BatchNorm1d` on `[B, D, L]`), where Apple uses `Conv2d` with `(1, k)` kernels on
`[B, D, 1, L]`: the arithmetic is identical.

References:
    MobileCLIP: https://arxiv.org/abs/2311.17049, https://github.com/apple/ml-mobileclip
    FastViT RepMixer: https://arxiv.org/abs/2303.14189
    open_clip#958 (why open_clip has no MobileCLIP-S0): https://github.com/mlfoundations/open_clip/issues/958
"""

from __future__ import annotations

import logging

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["RepMixer1d", "ConvFFN1d", "RepMixerBlock1d", "MCtTextTower"]


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as `y = a * x + c`, per channel."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


class RepMixer1d(nn.Module):
    """Re-parameterisable token mixer: `x + layer_scale * (mixer(x) - norm(x))` on `[B, D, L]`.

    `mixer` is a MobileOne branch pair (BatchNorm skip + depthwise conv/BN) and `norm` a BatchNorm skip; after
    `reparameterize()` the whole block is one depthwise convolution with bias.

    Args:
        dim: channels D.
        kernel_size: depthwise kernel over the sequence.
        layer_scale_init: initial layer-scale value.
    """

    def __init__(self, dim: int, kernel_size: int = 11, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = nn.BatchNorm1d(dim)
        self.mixer_skip = nn.BatchNorm1d(dim)
        self.mixer_conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.mixer_bn = nn.BatchNorm1d(dim)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1))
        self.reparam_conv: nn.Conv1d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        mixed = self.mixer_skip(x) + self.mixer_bn(self.mixer_conv(x))
        return x + self.layer_scale * (mixed - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold all branches into one depthwise conv (uses BatchNorm running statistics)."""
        if self.reparam_conv is not None:
            return
        a_skip, c_skip = _bn_affine(self.mixer_skip)
        a_conv, c_conv = _bn_affine(self.mixer_bn)
        a_norm, c_norm = _bn_affine(self.norm)
        scale = self.layer_scale.view(-1)
        # y = x + s * (a_skip x + c_skip + a_conv (K * x) + c_conv - a_norm x - c_norm)
        kernel = (scale * a_conv).view(-1, 1, 1) * self.mixer_conv.weight  # [D, 1, k]
        kernel[:, 0, self.kernel_size // 2] += 1.0 + scale * (a_skip - a_norm)
        conv = nn.Conv1d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, groups=self.dim)
        conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(scale * (c_skip + c_conv - c_norm))
        for name in ("norm", "mixer_skip", "mixer_conv", "mixer_bn", "layer_scale"):
            delattr(self, name)
        self.reparam_conv = conv


class ConvFFN1d(nn.Module):
    """Convolutional FFN on `[B, D, L]`: depthwise conv + BN, then 1x1 conv, GELU, 1x1 conv.

    Args:
        dim: channels D.
        hidden: hidden channels.
        kernel_size: depthwise kernel over the sequence.
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 11) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn: nn.Module = nn.BatchNorm1d(dim)
        self.fc1 = nn.Conv1d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv1d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.bn(self.conv(x)))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the depthwise conv."""
        if not isinstance(self.bn, nn.BatchNorm1d):
            return
        a, c = _bn_affine(self.bn)
        old = self.conv
        conv = nn.Conv1d(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, groups=old.groups)
        conv.to(device=old.weight.device, dtype=old.weight.dtype)
        conv.weight.copy_(old.weight * a.view(-1, 1, 1))
        conv.bias.copy_(c)
        self.conv = conv
        self.bn = nn.Identity()


class RepMixerBlock1d(nn.Module):
    """MetaFormer block with a RepMixer token mixer, on token sequences `[B, L, D]`.

    Args:
        dim: token width D.
        kernel_size: depthwise kernel over the sequence (MCt: 11).
        mlp_ratio: ConvFFN expansion.
        layer_scale_init: initial layer-scale value.
    """

    def __init__(self, dim: int, kernel_size: int = 11, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.token_mixer = RepMixer1d(dim, kernel_size, layer_scale_init)
        self.convffn = ConvFFN1d(dim, int(dim * mlp_ratio), kernel_size)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1))
        for m in self.convffn.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # [B, L, D] -> [B, D, L]: convolutions run along the sequence
        x = self.token_mixer(x)
        x = x + self.layer_scale * self.convffn(x)
        return x.transpose(1, 2)  # [B, D, L] -> [B, L, D]

    def reparameterize(self) -> None:
        """Fold the token mixer and the FFN's conv-BN."""
        self.token_mixer.reparameterize()
        self.convffn.reparameterize()


class MCtTextTower(nn.Module):
    """MobileCLIP-S0 text tower with open_clip's `TextTransformer` interface (`forward(tokens) -> [B, D]`).

    Args:
        embed_dim: output embedding dimension.
        context_length: token sequence length.
        vocab_size: vocabulary size.
        width: token width.
        heads: attention heads of the transformer layers.
        layers: transformer layers between the two RepMixer blocks.
        mlp_ratio: FFN expansion of the transformer layers and of the RepMixer ConvFFNs.
        kernel_size: RepMixer kernel over the sequence.
        causal: causal attention mask in the transformer layers (MobileCLIP-S0: False).
        quick_gelu: QuickGELU in the transformer layers.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        heads: int = 8,
        layers: int = 4,
        mlp_ratio: float = 4.0,
        kernel_size: int = 11,
        causal: bool = False,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.context_length = self.num_pos = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.heads = heads
        self.output_dim = embed_dim
        self.pool_type = "argmax"

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.mixer_in = RepMixerBlock1d(width, kernel_size, mlp_ratio)
        self.transformer = Transformer(
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=mlp_ratio,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
        )
        self.mixer_out = RepMixerBlock1d(width, kernel_size, mlp_ratio)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        if causal:
            mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip TextTransformer initialisation for the shared parts."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (self.width**-0.5) * ((2 * self.transformer.layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width**-0.5)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the transformer layers (open_clip API)."""
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by timm-style optimisers."""
        return {"positional_embedding"}

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Embed tokens `[B, L]` (L <= context_length) -> `[B, embed_dim]` (not normalised)."""
        seq_len = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:seq_len]
        x = self.mixer_in(x)
        attn_mask = self.attn_mask[:seq_len, :seq_len] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.mixer_out(x)
        x = self.ln_final(x)
        # NOTE: the EOT token has the highest id (49407) in CLIP BPE, so argmax pools it (open_clip 'argmax').
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return pooled @ self.text_projection

    def reparameterize(self) -> None:
        """Fold both RepMixer blocks (eval-mode BatchNorm statistics)."""
        self.mixer_in.reparameterize()
        self.mixer_out.reparameterize()
