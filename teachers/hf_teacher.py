"""Teachers backed by Hugging Face transformers ``CLIPModel`` and ``SiglipModel``.

Loads ``from_pretrained(dir_or_id)`` (``local_files_only`` for directories and when ``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE`` is set) with the checkpoint's own image processor (mean, std, resample filter) and tokenizer.
TinyCLIP checkpoints (microsoft/Cream) load this way as plain ``CLIPModel``. Texts are padded to the model's full
context length without an attention mask: CLIP's text tower is causal and pools at the first end-of-text token, and
SigLIP was trained on ``max_length`` padding without a mask (transformers' SigLIP docs).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from typing import TYPE_CHECKING

import torch
from torch import nn

from mcd_common import UsageError

from ._hf import hf_load_error, hf_location
from .preprocess import checkpoint_preprocess, interpolation_from_resample, resolve_preprocess
from .registry import TeacherCfg
from .teacher import Teacher

if TYPE_CHECKING:  # annotations only: transformers is imported when a Hugging Face teacher is built
    from transformers import PreTrainedTokenizerBase

_logger = logging.getLogger(__name__)

__all__ = ["HFTeacher", "build_hf_teacher"]


def _features(out: object) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFTeacher(Teacher):
    """A teacher over a transformers ``CLIPModel`` / ``SiglipModel``.

    Args:
        cfg: Resolved config.
        model: The frozen model.
        tokenizer: Its tokenizer (``AutoTokenizer``).
        embed_dim: Projection width.
    """

    def __init__(self, cfg: TeacherCfg, model: nn.Module, tokenizer: PreTrainedTokenizerBase, embed_dim: int) -> None:
        learned = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        super().__init__(cfg, embed_dim=embed_dim, learned_logit_scale=learned)
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"].long()

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=x))

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=tokens))


def _embed_dim(model: nn.Module) -> int:
    config = model.config
    if getattr(config, "projection_dim", None):  # CLIP
        return int(config.projection_dim)
    text = config.text_config  # SigLIP: the text head projects to projection_size (= vision hidden size)
    return int(getattr(text, "projection_size", None) or config.vision_config.hidden_size)


def build_hf_teacher(cfg: TeacherCfg) -> HFTeacher:
    """Load a transformers CLIP/SigLIP teacher and resolve its preprocessing into its cfg.

    Raises:
        UsageError: an unsupported model type, weights holding pickled objects, or an image size other than the
            checkpoint's.
        RuntimeError: The model cannot be loaded (offline and not cached); names the local-directory option.
    """
    # NOTE: transformers is a heavy import (~2 s); only Hugging Face teachers need it.
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

    location, local_only = hf_location("teacher", cfg.name, cfg.arch, cfg.weights)
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local_only)
        classes = {"clip": CLIPModel, "siglip": SiglipModel}
        if config.model_type not in classes:
            raise UsageError(f"teacher {cfg.name!r}: unsupported model type {config.model_type!r} (clip, siglip)")
        model = classes[config.model_type].from_pretrained(location, local_files_only=local_only)
        image_processor = AutoImageProcessor.from_pretrained(location, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    except (OSError, pickle.UnpicklingError) as err:
        raise hf_load_error("teacher", cfg.name, location, err) from err
    model.eval().requires_grad_(False)
    vision = model.config.vision_config
    found = checkpoint_preprocess(
        vision.image_size,
        image_processor.image_mean,
        image_processor.image_std,
        interpolation_from_resample(getattr(image_processor, "resample", None)),
    )
    resolved = resolve_preprocess(cfg, found)
    resolved = dataclasses.replace(
        resolved, context_length=cfg.context_length or int(model.config.text_config.max_position_embeddings)
    )
    if resolved.image_size != int(vision.image_size):
        # Position embeddings are not interpolated here; a different size would silently change the model.
        raise UsageError(
            f"teacher {cfg.name!r}: image_size {resolved.image_size} != the checkpoint's {vision.image_size}"
        )
    _logger.info("teacher %s: loaded %s from %s", cfg.name, type(model).__name__, location)
    return HFTeacher(resolved, model, tokenizer, _embed_dim(model))
