"""Teachers backed by open_clip models (``CLIP``, ``CustomTextCLIP``, ``CoCa``).

They come from registered names, ``open_clip:`` or ``local-dir:`` sources.

Refs: mlfoundations/open_clip (``create_model``, ``local-dir:``), apple/ml-mobileclip (teacher ensembles, fixed KD
logit scales 100 / 70, 60).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ._open_clip_loader import load_open_clip, logit_scale_of
from .preprocess import resolve_preprocess
from .registry import TeacherCfg
from .teacher import Teacher, TextTokenizer

_logger = logging.getLogger(__name__)

__all__ = ["OpenClipTeacher", "build_open_clip_teacher"]


class OpenClipTeacher(Teacher):
    """A teacher backed by an open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` model.

    Args:
        cfg: Resolved config.
        model: The frozen open_clip model.
        tokenizer: ``open_clip.get_tokenizer(...)`` for that model.
        embed_dim: Embedding width.
    """

    def __init__(self, cfg: TeacherCfg, model: nn.Module, tokenizer: TextTokenizer, embed_dim: int) -> None:
        super().__init__(cfg, embed_dim=embed_dim, learned_logit_scale=logit_scale_of(model))
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).long()

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=False)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=False)


def build_open_clip_teacher(cfg: TeacherCfg) -> OpenClipTeacher:
    """Load an open_clip teacher (``cfg.source == "open_clip"``) and resolve its preprocessing into its cfg."""
    loaded = load_open_clip(
        kind="teacher",
        name=cfg.name,
        arch=cfg.arch,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        allow_random=cfg.allow_random,
        image_size=cfg.image_size,
        context_length=cfg.context_length,
        flag="--teacher_weights",
    )
    resolved = resolve_preprocess(cfg, loaded.preprocess)
    resolved = dataclasses.replace(resolved, context_length=cfg.context_length or int(loaded.tokenizer.context_length))
    return OpenClipTeacher(resolved, loaded.model, loaded.tokenizer, int(loaded.model_cfg["embed_dim"]))
