"""Small students for tests and the CPU demo; all but the MCt one are plain open_clip configs.

`test_tiny*` mirror timm's `test_vit`: real code paths, toy sizes (embed 32, 32 px, context 16). `tiny_vit` is
teacher-sized for the demo and `tiny_vit_s` is a half-width/half-depth student that can inherit from it
(`students.inherit_weights`). `test_tiny_mci` / `tiny_mci` use timm `fastvit_t8`, a real FastViT with
re-parameterisable MobileOne/RepMixer blocks, which runs at 32 and 64 px. `tiny_coca` / `test_tiny_coca` are CoCa
students (attentional-pool ViT, CLS text tower, captioning decoder; `students.coca`) sized to train a captioning
teacher on a CPU: 64 px images, Flickr8k-length captions (context 32). `test_tiny_hf` / `vit_minilm` have a
pretrained Hugging Face text tower (`students.hf_text`) whose directory is given as `hf_model_dir=PATH`.

References:
    timm `test_vit` / FastViT: https://github.com/huggingface/pytorch-image-models
    CoCa: arXiv:2205.01917; open_clip `coca_model.py` (https://github.com/mlfoundations/open_clip)
"""

from __future__ import annotations

import logging

from students.config import ImageTowerCfg, StudentCfg, TextDecoderCfg, TextTowerCfg
from students.registry import register_student

_logger = logging.getLogger(__name__)

__all__: list[str] = []

_TINY_VIT = ImageTowerCfg(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
_TINY_TEXT = TextTowerCfg(context_length=16, width=32, heads=2, layers=2)


@register_student
def test_tiny() -> StudentCfg:
    """Test student: embed 32, ViT 32 px / patch 8 / width 32 x 2 layers; text context 16, width 32 x 2 layers."""
    return StudentCfg(name="test_tiny", embed_dim=32, image=_TINY_VIT, text=_TINY_TEXT)


@register_student
def test_tiny_mct() -> StudentCfg:
    """Test student with a tiny MCt text tower (width 32, 1 transformer layer between two RepMixer blocks)."""
    text = TextTowerCfg(kind="mct", context_length=16, width=32, heads=2, layers=1, causal=False)
    return StudentCfg(name="test_tiny_mct", embed_dim=32, image=_TINY_VIT, text=text)


@register_student
def test_tiny_mci() -> StudentCfg:
    """Test student with a real FastViT image tower (timm fastvit_t8 @ 32 px, classifier as projection)."""
    image = ImageTowerCfg(image_size=32, timm_model_name="fastvit_t8", timm_pool="avg", timm_proj=None)
    return StudentCfg(name="test_tiny_mci", embed_dim=32, image=image, text=_TINY_TEXT)


@register_student
def test_tiny_hf() -> StudentCfg:
    """Test student with a Hugging Face text tower (mean pooling, linear projection); pass `hf_model_dir=PATH`."""
    text = TextTowerCfg(kind="hf", context_length=16, hf_pooling="mean", hf_proj="linear")
    return StudentCfg(name="test_tiny_hf", embed_dim=32, image=_TINY_VIT, text=text)


@register_student
def vit_minilm() -> StudentCfg:
    """tiny_vit's image tower (64 px ViT 192 x 6) + a pretrained Hugging Face text encoder (e.g. all-MiniLM-L6-v2),
    mean-pooled, linear projection to 256; context 64. Pass the encoder directory: `hf_model_dir=PATH`
    (`distill train --hf_text_dir PATH`), and lock it with `--lock.text true` for LiT-style training."""
    image = ImageTowerCfg(image_size=64, patch_size=8, width=192, layers=6, head_width=32)
    text = TextTowerCfg(kind="hf", context_length=64, hf_pooling="mean", hf_proj="linear")
    return StudentCfg(name="vit_minilm", embed_dim=256, image=image, text=text)


@register_student
def tiny_vit() -> StudentCfg:
    """Demo teacher-sized model: embed 128, ViT 64 px / patch 8 / width 192 x 6; text context 32, 128 x 4 layers."""
    image = ImageTowerCfg(image_size=64, patch_size=8, width=192, layers=6, head_width=32)
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=4)
    return StudentCfg(name="tiny_vit", embed_dim=128, image=image, text=text)


@register_student
def tiny_vit_s() -> StudentCfg:
    """Demo student inheritable from tiny_vit: ViT width 96 x 3 layers; text 64 x 2 layers (same head dims)."""
    image = ImageTowerCfg(image_size=64, patch_size=8, width=96, layers=3, head_width=32)
    text = TextTowerCfg(context_length=32, width=64, heads=2, layers=2)
    return StudentCfg(name="tiny_vit_s", embed_dim=128, image=image, text=text)


@register_student
def tiny_mci() -> StudentCfg:
    """Demo FastViT student: fastvit_t8 @ 64 px + linear projection to 128; text context 32, 128 x 2 layers."""
    image = ImageTowerCfg(image_size=64, timm_model_name="fastvit_t8", timm_pool="avg", timm_proj="linear")
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=2)
    return StudentCfg(name="tiny_mci", embed_dim=128, image=image, text=text)


@register_student
def test_tiny_coca() -> StudentCfg:
    """Test CoCa: test_tiny towers + attentional pool (16 queries) and CLS text token; decoder width 32 x 1 layer."""
    image = ImageTowerCfg(
        image_size=32, patch_size=8, width=32, layers=2, head_width=16,
        attentional_pool=True, attn_pooler_queries=16, attn_pooler_heads=2,
    )  # fmt: skip
    text = TextTowerCfg(context_length=16, width=32, heads=2, layers=2, embed_cls=True)
    decoder = TextDecoderCfg(width=32, heads=2, layers=1)
    return StudentCfg(name="test_tiny_coca", embed_dim=32, image=image, text=text, multimodal=decoder)


@register_student
def tiny_coca() -> StudentCfg:
    """CPU-trainable CoCa teacher: tiny_vit towers, 65-query attentional pool, CLS text token; decoder 128 x 2."""
    # NOTE: 65 queries for 8x8 patches: the first is the contrastive embedding, the decoder reads one per patch
    image = ImageTowerCfg(
        image_size=64, patch_size=8, width=192, layers=6, head_width=32,
        attentional_pool=True, attn_pooler_queries=65, attn_pooler_heads=4,
    )  # fmt: skip
    text = TextTowerCfg(context_length=32, width=128, heads=4, layers=4, embed_cls=True)
    decoder = TextDecoderCfg(width=128, heads=4, layers=2)
    return StudentCfg(name="tiny_coca", embed_dim=128, image=image, text=text, multimodal=decoder)
