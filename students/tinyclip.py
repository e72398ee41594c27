"""TinyCLIP-style thin ViT students, expressed as open_clip native ViTs (no custom code at inference).

Widths/depths follow microsoft/Cream `TinyCLIP/src/open_clip/model_configs/TinyCLIP-*.json` (head dim 64, causal
text, 224 px, embed 512, OpenAI mean/std). Measured parameter counts (ANCHORS §3.5; text excludes the 49408-row
token embedding): ViT-8M/16 8.28 M + 2.52 M, ViT-39M/16 38.59 M + 19.22 M, ViT-40M/32 39.69 M + 19.22 M,
ViT-61M/32 61.41 M + 28.67 M.

TinyCLIP inherits from OpenAI/LAION CLIPs: pass `quick_gelu=True` when inheriting from a QuickGELU (OpenAI) teacher.

References:
    TinyCLIP (ICCV'23): https://arxiv.org/abs/2309.12314, https://github.com/microsoft/Cream/tree/main/TinyCLIP
"""

from __future__ import annotations

import logging

from students.config import ImageTowerCfg, StudentCfg, TextTowerCfg
from students.registry import register_student

_logger = logging.getLogger(__name__)

__all__: list[str] = []


def _cfg(
    name: str, *, width: int, layers: int, patch: int, text_width: int, text_heads: int, text_layers: int
) -> StudentCfg:
    return StudentCfg(
        name=name,
        embed_dim=512,
        image=ImageTowerCfg(image_size=224, width=width, layers=layers, head_width=64, patch_size=patch),
        text=TextTowerCfg(width=text_width, heads=text_heads, layers=text_layers, causal=True),
    )


@register_student
def tinyclip_vit_8m_16_text_3m() -> StudentCfg:
    """TinyCLIP ViT-8M/16 Text-3M: ViT width 256 x 10 layers, patch 16; text 256 wide x 3 layers."""
    return _cfg(
        "tinyclip_vit_8m_16_text_3m", width=256, layers=10, patch=16, text_width=256, text_heads=4, text_layers=3
    )


@register_student
def tinyclip_vit_39m_16_text_19m() -> StudentCfg:
    """TinyCLIP ViT-39M/16 Text-19M: ViT width 512 x 12 layers, patch 16; text 512 wide x 6 layers."""
    return _cfg(
        "tinyclip_vit_39m_16_text_19m", width=512, layers=12, patch=16, text_width=512, text_heads=8, text_layers=6
    )


@register_student
def tinyclip_vit_40m_32_text_19m() -> StudentCfg:
    """TinyCLIP ViT-40M/32 Text-19M: ViT width 512 x 12 layers, patch 32; text 512 wide x 6 layers."""
    return _cfg(
        "tinyclip_vit_40m_32_text_19m", width=512, layers=12, patch=32, text_width=512, text_heads=8, text_layers=6
    )


@register_student
def tinyclip_vit_61m_32_text_29m() -> StudentCfg:
    """TinyCLIP ViT-61M/32 Text-29M: ViT width 640 x 12 layers, patch 32; text 512 wide x 9 layers."""
    return _cfg(
        "tinyclip_vit_61m_32_text_29m", width=640, layers=12, patch=32, text_width=512, text_heads=8, text_layers=9
    )
