"""Small students for tests and the CPU demo; all but the MCt one are plain open_clip configs.

`test_tiny*` mirror timm's `test_vit`: real code paths, toy sizes (embed 32, 32 px, context 16). `tiny_vit` is
teacher-sized for the demo and `tiny_vit_s` is a half-width/half-depth student that can inherit from it
(`students.inherit_weights`). `test_tiny_mci` / `tiny_mci` use timm `fastvit_t8`, a real FastViT with
re-parameterisable MobileOne/RepMixer blocks, which runs at 32 and 64 px.

References:
    timm `test_vit` / FastViT: https://github.com/huggingface/pytorch-image-models
"""

from __future__ import annotations

import logging
from typing import Any

from students._registry import _create, register_student
from students.towers import CLIPStudent, ImageTowerCfg, StudentCfg, TextTowerCfg

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
