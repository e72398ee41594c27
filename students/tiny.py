"""Small students for tests and the CPU demo; all but the MCt one are plain open_clip configs.

`test_tiny*` mirror timm's `test_vit`: real code paths, toy sizes (embed 32, 32 px, context 16). `tiny_vit` is
teacher-sized for the demo and `tiny_vit_s` is a half-width/half-depth student that can inherit from it
(`students.inherit_weights`). `test_tiny_mci` / `tiny_mci` use timm `fastvit_t8`, a real FastViT with
re-parameterisable MobileOne/RepMixer blocks, which runs at 32 and 64 px. `tiny_coca` / `test_tiny_coca` are CoCa
students (attentional-pool ViT, CLS text tower, captioning decoder; `students.coca`) sized to train a captioning
teacher on a CPU: 64 px images, Flickr8k-length captions (context 32).

References:
    timm `test_vit` / FastViT: https://github.com/huggingface/pytorch-image-models
    CoCa: arXiv:2205.01917; open_clip `coca_model.py` (https://github.com/mlfoundations/open_clip)
"""

from __future__ import annotations

import logging
from typing import Any

from students._registry import _create, register_student
from students.towers import CLIPStudent, ImageTowerCfg, StudentCfg, TextDecoderCfg, TextTowerCfg

_logger = logging.getLogger(__name__)

__all__: list[str] = []

_TINY_VIT = ImageTowerCfg(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
_TINY_TEXT = TextTowerCfg(context_length=16, width=32, heads=2, layers=2)


@register_student
def test_tiny(**kwargs: Any) -> CLIPStudent:
    """Test student: embed 32, ViT 32 px / patch 8 / width 32 x 2 layers; text context 16, width 32 x 2 layers."""
    return _create(StudentCfg(name="test_tiny", embed_dim=32, image=_TINY_VIT, text=_TINY_TEXT), **kwargs)


@register_student
def test_tiny_mct(**kwargs: Any) -> CLIPStudent:
    """Test student with a tiny MCt text tower (width 32, 1 transformer layer between two RepMixer blocks)."""
    text = TextTowerCfg(kind="mct", context_length=16, width=32, heads=2, layers=1, causal=False)
    return _create(StudentCfg(name="test_tiny_mct", embed_dim=32, image=_TINY_VIT, text=text), **kwargs)


@register_student
def test_tiny_mci(**kwargs: Any) -> CLIPStudent:
    """Test student with a real FastViT image tower (timm fastvit_t8 @ 32 px, classifier as projection)."""
    image = ImageTowerCfg(image_size=32, timm_model_name="fastvit_t8", timm_pool="avg", timm_proj=None)
    return _create(StudentCfg(name="test_tiny_mci", embed_dim=32, image=image, text=_TINY_TEXT), **kwargs)


@register_student
def tiny_vit(**kwargs: Any) -> CLIPStudent:
    """Demo teacher-sized model: embed 128, ViT 64 px / patch 8 / width 192 x 6; text context 32, 128 x 4 layers."""
    image = ImageTowerCfg(image_size=64, patch_size=8, width=192, layers=6, head_width=32)
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=4)
    return _create(StudentCfg(name="tiny_vit", embed_dim=128, image=image, text=text), **kwargs)


@register_student
def tiny_vit_s(**kwargs: Any) -> CLIPStudent:
    """Demo student inheritable from tiny_vit: ViT width 96 x 3 layers; text 64 x 2 layers (same head dims)."""
    image = ImageTowerCfg(image_size=64, patch_size=8, width=96, layers=3, head_width=32)
    text = TextTowerCfg(context_length=32, width=64, heads=2, layers=2)
    return _create(StudentCfg(name="tiny_vit_s", embed_dim=128, image=image, text=text), **kwargs)


@register_student
def tiny_mci(**kwargs: Any) -> CLIPStudent:
    """Demo FastViT student: fastvit_t8 @ 64 px + linear projection to 128; text context 32, 128 x 2 layers."""
    image = ImageTowerCfg(image_size=64, timm_model_name="fastvit_t8", timm_pool="avg", timm_proj="linear")
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=2)
    return _create(StudentCfg(name="tiny_mci", embed_dim=128, image=image, text=text), **kwargs)


@register_student
def test_tiny_coca(**kwargs: Any) -> CLIPStudent:
    """Test CoCa: test_tiny towers + attentional pool (16 queries) and CLS text token; decoder width 32 x 1 layer."""
    image = ImageTowerCfg(
        image_size=32, patch_size=8, width=32, layers=2, head_width=16,
        attentional_pool=True, attn_pooler_queries=16, attn_pooler_heads=2,
    )  # fmt: skip
    text = TextTowerCfg(context_length=16, width=32, heads=2, layers=2, embed_cls=True)
    decoder = TextDecoderCfg(width=32, heads=2, layers=1)
    cfg = StudentCfg(name="test_tiny_coca", embed_dim=32, image=image, text=text, multimodal=decoder)
    return _create(cfg, **kwargs)


@register_student
def tiny_coca(**kwargs: Any) -> CLIPStudent:
    """CPU-trainable CoCa teacher: tiny_vit towers, 65-query attentional pool, CLS text token; decoder 128 x 2."""
    # NOTE: 65 queries for 8x8 patches: the first is the contrastive embedding, the decoder reads one per patch
    image = ImageTowerCfg(
        image_size=64, patch_size=8, width=192, layers=6, head_width=32,
        attentional_pool=True, attn_pooler_queries=65, attn_pooler_heads=4,
    )  # fmt: skip
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=4, embed_cls=True)
    decoder = TextDecoderCfg(width=128, heads=4, layers=2)
    return _create(StudentCfg(name="tiny_coca", embed_dim=128, image=image, text=text, multimodal=decoder), **kwargs)
