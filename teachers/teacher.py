"""The ``Teacher`` interface: a frozen CLIP model behind pixels-and-strings in, L2-normalised embeddings out.

A teacher owns its preprocessing (resize to its own resolution, its own mean/std, as timm's
``timm/task/distillation.py`` does) and its tokenizer, so students and stored shards can use any resolution and
tokenizer. It is frozen and kept in eval mode like open_clip's ``task/distill_task.py::DistillCLIPTask`` teacher.
Backends: ``teachers.open_clip_teacher`` and ``teachers.hf_teacher``.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import prepare_pixels
from .registry import DEFAULT_KD_LOGIT_SCALE, TeacherCfg

_logger = logging.getLogger(__name__)

__all__ = ["Teacher", "TextTokenizer"]


class TextTokenizer(Protocol):
    """What a teacher needs of an open_clip tokenizer: strings in, ``[N, context_length]`` token ids out."""

    context_length: int

    def __call__(self, texts: list[str]) -> torch.Tensor: ...


class Teacher(nn.Module):
    """A frozen CLIP model behind a fixed interface: pixels and strings in, L2-normalised embeddings out.

    Subclasses implement ``_image_features`` (normalised pixels -> features), ``_text_features`` and ``tokenize``.

    Attributes:
        cfg: The resolved config (preprocessing filled in from the checkpoint).
        name: ``cfg.name``.
        embed_dim: Embedding width D.
        image_size: Square input resolution.
        context_length: Token sequence length of :meth:`tokenize`.
        logit_scale: KD temperature: ``cfg.logit_scale`` if set (a published recipe's value), else
            ``DEFAULT_KD_LOGIT_SCALE``.
        learned_logit_scale: The checkpoint's own ``exp(logit_scale)`` (recorded, not used for KD), or None.
        interpolation: Resize filter for inputs of another size.
    """

    def __init__(self, cfg: TeacherCfg, *, embed_dim: int, learned_logit_scale: float | None) -> None:
        super().__init__()
        if cfg.image_size is None or cfg.mean is None or cfg.std is None or cfg.interpolation is None:
            raise ValueError(f"teacher {cfg.name!r}: preprocessing must be resolved before building: {cfg}")
        self.cfg = cfg
        self.name = cfg.name
        self.embed_dim = int(embed_dim)
        self.image_size = int(cfg.image_size)
        self.context_length = int(cfg.context_length or 0)
        self.interpolation = cfg.interpolation
        self.learned_logit_scale = None if learned_logit_scale is None else float(learned_logit_scale)
        # NOTE: not the learned scale: a briefly trained teacher learns ~13, and KD at its own scale was worse on
        # Flickr8k dev than at 50 (docs/RESULTS.md, two studies); every anchor fixes the KD scale.
        self.logit_scale = float(DEFAULT_KD_LOGIT_SCALE if cfg.logit_scale is None else cfg.logit_scale)
        # Non-persistent: preprocessing constants follow .to(device) but never enter a state dict.
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        """No-op: a teacher always stays in eval mode (dropout off, norms frozen), even under ``module.train()``."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the teacher's buffers."""
        return self.mean.device

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` uint8 or ``[0, 1]`` float -> normalised float ``[B, 3, S, S]`` at ``image_size``."""
        x = prepare_pixels(pixels, self.image_size, self.interpolation, self.mean, self.std)
        if x.is_cuda:
            # Conv patch embeddings are faster in NHWC on GPU; on CPU keep whatever layout the caller gave.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            pixels: ``[B, 3, H, W]`` uint8, or float in ``[0, 1]``; resized to ``image_size`` if ``H, W`` differ.

        Returns:
            ``[B, D]`` L2-normalised features (float32, or the autocast dtype).
        """
        return F.normalize(self._image_features(self.prepare(pixels)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``[N, L]`` tokens from :meth:`tokenize` -> ``[N, D]`` L2-normalised features."""
        return F.normalize(self._text_features(tokens.to(self.device, non_blocking=True)), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Tokenise and encode strings -> ``[N, D]`` L2-normalised features."""
        return self.encode_text(self.tokenize(list(texts)))

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | float]:
        """``CLIPStudent.forward``-shaped output: ``image_features``, ``text_features`` (when given), ``logit_scale``.

        Args:
            image: Pixels as for :meth:`encode_image`.
            text: Tokens from :meth:`tokenize`.
        """
        out: dict[str, torch.Tensor | float] = {"logit_scale": self.logit_scale}
        if image is not None:
            out["image_features"] = self.encode_image(image)
        if text is not None:
            out["text_features"] = self.encode_text(text)
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Strings -> ``[N, context_length]`` LongTensor with this teacher's own tokenizer."""
        raise NotImplementedError

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
            f"context_length={self.context_length}, logit_scale={self.logit_scale:g}"
        )
