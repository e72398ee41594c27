"""MobileCLIP and MobileCLIP2 students: timm MCi image towers + MCt / open_clip transformer text towers.

Configs match the open_clip `MobileCLIP*.json` model configs (open_clip_torch 3.3.0) and, for MobileCLIP-S0, which
open_clip lacks, ml-mobileclip's `mobileclip_s0.json` (MCi0 @ 256 + MCt). Preprocessing follows open_clip's `_mccfg`
(mean 0, std 1, bilinear, shortest-side resize) for the S0/S1/S2/B families and `_mc2cfg` (OpenAI mean/std) for
MobileCLIP2-S3/S4. Parameter counts (image with projection / text): MCi0 11.41 M, MCt 42.44 M, 12L-512 63.43 M,
12L-768 123.65 M.

References:
    MobileCLIP (CVPR'24): https://arxiv.org/abs/2311.17049
    MobileCLIP2 (TMLR'25): https://arxiv.org/abs/2508.20691
    https://github.com/apple/ml-mobileclip ; timm `fastvit_mci*`, `vit_base_mci_224`
"""

from __future__ import annotations

import logging

from mcd_common.weights import WeightSpec
from students.config import OPENAI_MEAN, OPENAI_STD, ImageTowerCfg, StudentCfg, TextTowerCfg
from students.registry import register_student

_logger = logging.getLogger(__name__)

__all__: list[str] = []  # variants are reached through the registry

_ZERO = (0.0, 0.0, 0.0)
_ONE = (1.0, 1.0, 1.0)

_MCT = TextTowerCfg(kind="mct", width=512, heads=8, layers=4, causal=False)
_TEXT_512 = TextTowerCfg(width=512, heads=8, layers=12, causal=False)
_TEXT_512_CAUSAL = TextTowerCfg(width=512, heads=8, layers=12, causal=True)
_TEXT_768 = TextTowerCfg(width=768, heads=12, layers=12, causal=False)


def _cfg(
    name: str,
    timm_name: str,
    text: TextTowerCfg,
    *,
    image_size: int = 256,
    embed_dim: int = 512,
    openai_norm: bool = False,
) -> StudentCfg:
    # NOTE: timm_proj=None re-uses the timm classifier (num_classes=embed_dim) as the projection, as open_clip's
    # MobileCLIP configs do, so the keys match the released OpenCLIP checkpoints.
    image = ImageTowerCfg(
        image_size=image_size,
        timm_model_name=timm_name,
        timm_pool="token" if timm_name.startswith("vit_") else "avg",
        timm_proj=None,
        timm_drop_path=0.0,
        mean=OPENAI_MEAN if openai_norm else _ZERO,
        std=OPENAI_STD if openai_norm else _ONE,
        interpolation="bilinear",
        resize_mode="shortest",
    )
    return StudentCfg(name=name, embed_dim=embed_dim, image=image, text=text)


def _hub(repo: str) -> WeightSpec:
    return WeightSpec(hf_hub=repo)


@register_student
def mobileclip_s0() -> StudentCfg:
    """MobileCLIP-S0: MCi0 (fastvit_mci0) @ 256 + MCt text tower (RepMixer + 4 layers + RepMixer)."""
    return _cfg("mobileclip_s0", "fastvit_mci0", _MCT)


@register_student(pretrained={"datacompdr": _hub("apple/MobileCLIP-S1-OpenCLIP/")})
def mobileclip_s1() -> StudentCfg:
    """MobileCLIP-S1: MCi1 @ 256 + 12-layer 512-wide text transformer (no causal mask)."""
    return _cfg("mobileclip_s1", "fastvit_mci1", _TEXT_512)


@register_student(pretrained={"datacompdr": _hub("apple/MobileCLIP-S2-OpenCLIP/")})
def mobileclip_s2() -> StudentCfg:
    """MobileCLIP-S2: MCi2 @ 256 + 12-layer 512-wide text transformer (no causal mask)."""
    return _cfg("mobileclip_s2", "fastvit_mci2", _TEXT_512)


@register_student(
    pretrained={
        "datacompdr": _hub("apple/MobileCLIP-B-OpenCLIP/"),
        "datacompdr_lt": _hub("apple/MobileCLIP-B-LT-OpenCLIP/"),
    }
)
def mobileclip_b() -> StudentCfg:
    """MobileCLIP-B: vit_base_mci_224 @ 224 + 12-layer 512-wide causal text transformer."""
    return _cfg("mobileclip_b", "vit_base_mci_224", _TEXT_512_CAUSAL, image_size=224)


@register_student(pretrained={"dfndr2b": _hub("timm/MobileCLIP2-S0-OpenCLIP/")})
def mobileclip2_s0() -> StudentCfg:
    """MobileCLIP2-S0: MCi0 @ 256 + 12-layer 512-wide text transformer (the shipped config, not MCt)."""
    return _cfg("mobileclip2_s0", "fastvit_mci0", _TEXT_512)


@register_student(pretrained={"dfndr2b": _hub("timm/MobileCLIP2-S2-OpenCLIP/")})
def mobileclip2_s2() -> StudentCfg:
    """MobileCLIP2-S2: MCi2 @ 256 + 12-layer 512-wide text transformer."""
    return _cfg("mobileclip2_s2", "fastvit_mci2", _TEXT_512)


@register_student(pretrained={"dfndr2b": _hub("timm/MobileCLIP2-B-OpenCLIP/")})
def mobileclip2_b() -> StudentCfg:
    """MobileCLIP2-B: vit_base_mci_224 @ 224 + 12-layer 512-wide causal text transformer."""
    return _cfg("mobileclip2_b", "vit_base_mci_224", _TEXT_512_CAUSAL, image_size=224)


@register_student(pretrained={"dfndr2b": _hub("timm/MobileCLIP2-S3-OpenCLIP/")})
def mobileclip2_s3() -> StudentCfg:
    """MobileCLIP2-S3: MCi3 (5 stages) @ 256 + 12-layer 768-wide text transformer, 768-dim, OpenAI mean/std."""
    return _cfg("mobileclip2_s3", "fastvit_mci3", _TEXT_768, embed_dim=768, openai_norm=True)


@register_student(pretrained={"dfndr2b": _hub("timm/MobileCLIP2-S4-OpenCLIP/")})
def mobileclip2_s4() -> StudentCfg:
    """MobileCLIP2-S4: MCi4 (5 stages) @ 256 + 12-layer 768-wide text transformer, 768-dim, OpenAI mean/std."""
    return _cfg("mobileclip2_s4", "fastvit_mci4", _TEXT_768, embed_dim=768, openai_norm=True)
