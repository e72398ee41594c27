"""CoCa students: a `CLIPStudent` plus open_clip's captioning decoder, trained with contrastive and caption losses.

CoCa (Contrastive Captioners) adds to a two-tower CLIP model a text decoder that cross-attends to image tokens and
predicts the next caption token. Without downloadable pretrained captioners, this toolkit trains a small CoCa on
image-caption data (e.g. Flickr8k) and then uses its towers as a teacher and its decoder as the synthetic-caption
generator (`teachers.create_teacher("local-dir:DIR")` / `teachers.create_captioner("local-dir:DIR")`).

Layout and numerics are open_clip's `CoCa`: the towers come from open_clip's own builders (`_build_vision_tower`
with an attentional pooler, `_build_text_tower` with `embed_cls=True`, `coca_model._build_text_decoder_tower`,
all called through `mcd_common._open_clip`), so `students.save_student` writes a directory that
`open_clip.create_model("local-dir:DIR")` loads as a `CoCa` with identical embeddings and decoder logits.

The caption loss is open_clip's `CoCaLoss` caption term: cross-entropy of the decoder output at position t against
token t+1, padding (id 0) ignored, averaged over the remaining targets. `forward_train` applies the decoder's final
LayerNorm and vocabulary projection only at those targets: the same loss, but the `[B, L, 49408]` projection is the
largest cost of a small CoCa and about half of its positions are padding.

References:
    CoCa: Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", arXiv:2205.01917 (2022)
    open_clip: https://github.com/mlfoundations/open_clip (src/open_clip/coca_model.py, transformer.py, loss.py)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mcd_common._open_clip import build_text_decoder_tower
from students.config import StudentCfg
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = ["CoCaStudent"]


class CoCaStudent(CLIPStudent):
    """A `CLIPStudent` with open_clip's CoCa text decoder; its state dict is open_clip `CoCa`'s.

    Build it like any student (`create_student("tiny_coca")`, `build_student(cfg)` with `cfg.multimodal` set, or
    `load_student`). `encode_image`, `encode_text`, `forward`, `tokenize`, `normalize` behave as for every
    student; `forward_train` adds the caption loss and `caption_logits` gives open_clip's teacher-forced logits.

    Args:
        cfg: the architecture, with a `multimodal` (decoder) section.

    Attributes:
        text_decoder: open_clip `MultimodalTransformer` (self-attention over caption tokens, cross-attention to the
            image tokens of the attentional pooler, projection to the vocabulary).
        pad_id: padding token id, ignored by the caption loss (open_clip `CoCa.pad_id`).
    """

    caption_loss_enabled = True
    pad_id: int = 0

    def __init__(self, cfg: StudentCfg) -> None:
        if cfg.multimodal is None:
            raise ValueError(f"student {cfg.name!r} has no `multimodal` (text decoder) config: not a CoCa")
        super().__init__(cfg)
        # NOTE: open_clip passes the vocabulary size as the decoder's `embed_dim` (its output projection width)
        self.text_decoder = build_text_decoder_tower(
            cfg.text.vocab_size, cfg.open_clip_multimodal_cfg(), quick_gelu=cfg.quick_gelu
        )
        _init_decoder(self.text_decoder)

    # -- encoding -----------------------------------------------------------------------------------------------------
    def _encode_image(self, image: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding `[B, D]` and the decoder's image tokens `[B, Q - 1, D]` (open_clip `CoCa._encode_image`)."""
        features, tokens = self.visual(image)
        return (F.normalize(features, dim=-1) if normalize else features), tokens

    def _encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embedding `[B, D]` (from the appended CLS token) and token states `[B, L, W]` (CLS excluded)."""
        features, token_embs = self.text(tokens)
        return (F.normalize(features, dim=-1) if normalize else features), token_embs

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed ALREADY normalised images `[B, 3, H, W]` (open_clip semantics) -> `[B, D]`."""
        return self._encode_image(image, normalize=normalize)[0]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, trim_padding: bool = False) -> torch.Tensor:
        """Embed tokens `[B, L]` -> `[B, D]` (`trim_padding` is ignored: the appended CLS token reads all positions)."""
        return self._encode_text(tokens, normalize=normalize)[0]

    # -- captioning ---------------------------------------------------------------------------------------------------
    def caption_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits `[B, L - 1, V]` for the targets `text[:, 1:]`.

        Equal to open_clip's `CoCa.forward(image, text)["logits"]` (whose `labels` are `text[:, 1:]`).

        Args:
            image: normalised images `[B, 3, H, W]`.
            text: tokens `[B, L]`.
        """
        _, image_embs = self._encode_image(image, normalize=False)
        _, token_embs = self._encode_text(text, normalize=False)
        return self.text_decoder(image_embs, token_embs[:, :-1])

    def forward_train(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass of each tower and the decoder: contrastive outputs plus the caption loss.

        Args:
            image: normalised images `[B, 3, H, W]` (call `normalize` on raw pixels first).
            text: tokens `[B, L]` of the captions to embed and to predict.

        Returns:
            `image_features` and `text_features` (`[B, D]`, L2-normalised, equal to `encode_image` /
            `encode_text`), `logit_scale` (exp, scalar) and `caption_loss`: mean fp32 cross-entropy of the
            next-token predictions over the non-padding targets `text[:, 1:]` (0 when there are none), i.e.
            open_clip `CoCaLoss`'s caption term with weight 1.
        """
        if image.dtype == torch.uint8:
            raise TypeError("CoCaStudent.forward_train expects normalised float images: call student.normalize(pixels)")
        image_features, image_embs = self._encode_image(image)
        text_features, token_embs = self._encode_text(text)
        # NOTE: position t predicts token t + 1, as in open_clip's CoCa.forward (labels = text[:, 1:])
        hidden = _decoder_hidden(self.text_decoder, image_embs, token_embs[:, :-1])  # [B, L - 1, W]
        labels = text[:, 1:]  # [B, L - 1]
        keep = labels != self.pad_id  # [B, L - 1]
        # NOTE: ln_final and the projection act per position, so projecting only the kept positions gives the
        # logits open_clip computes there (up to float rounding); padding positions would be dropped by ignore_index.
        decoder = self.text_decoder
        logits = decoder.ln_final(hidden[keep]) @ decoder.text_projection  # [N, V]
        total = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        caption_loss = total / keep.sum().clamp(min=1)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale.exp(),
            "caption_loss": caption_loss,
        }

    # -- utilities ----------------------------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts `{"image", "text", "decoder", "total"}`."""
        counts = super().param_counts()
        counts["decoder"] = sum(p.numel() for p in self.text_decoder.parameters())
        return counts


def _decoder_hidden(decoder: MultimodalTransformer, image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
    """open_clip `MultimodalTransformer.forward` without its final LayerNorm and vocabulary projection.

    Args:
        decoder: the decoder.
        image_embs: image tokens `[B, Q, W]`.
        text_embs: caption token states `[B, T, W]`, `T <= decoder.context_length`.

    Returns:
        Hidden states `[B, T, W]`; `decoder.ln_final(h) @ decoder.text_projection` are the decoder's logits.
    """
    if not decoder.batch_first:
        raise ValueError("only batch-first open_clip decoders are supported (open_clip's CoCa builds them)")
    seq_len = text_embs.shape[1]
    attn_mask = decoder.attn_mask[:seq_len, :seq_len]  # causal
    x = text_embs
    for resblock, cross_attn in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        if decoder.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(resblock, x, None, None, attn_mask, use_reentrant=False)
            x = checkpoint(cross_attn, x, image_embs, image_embs, None, use_reentrant=False)
        else:
            x = resblock(x, attn_mask=attn_mask)
            x = cross_attn(x, k_x=image_embs, v_x=image_embs)
    return x


@torch.no_grad()
def _init_decoder(decoder: MultimodalTransformer) -> None:
    """Initialise the decoder as open_clip's `MultimodalTransformer.init_parameters` intends.

    open_clip 3.3.0 never calls that method (it would fail on a missing `self.transformer`), so a fresh `CoCa`
    keeps PyTorch's default block init and an uninitialised (`torch.empty`: arbitrary, possibly NaN)
    `text_projection`. These are the standard deviations open_clip's `TextTransformer` uses for its own blocks.
    """
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in (*decoder.resblocks, *decoder.cross_attn):
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=width**-0.5)
