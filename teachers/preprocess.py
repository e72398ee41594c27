"""Teacher and captioner preprocessing: the one place its values are resolved, and the pixel ops that apply them.

A teacher or captioner config may leave image size, mean, std and interpolation unset (``None``); they are then
filled once, by `resolve_preprocess`, from what the checkpoint says (open_clip's preprocess config, a ``local-dir``
directory's ``preprocess_cfg``, a pretrained tag, or a Hugging Face image processor). The model wrapper, not the
data loader, applies them (docs/DESIGN.md "Pixels"), as in timm's ``timm/task/distillation.py`` teacher wrapper
that re-normalises inputs with the teacher's own mean/std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from .registry import CaptionerCfg, Interpolation, TeacherCfg

__all__ = [
    "Preprocess",
    "checkpoint_preprocess",
    "interpolation_from_resample",
    "interpolation_mode",
    "normalize_pixels",
    "prepare_pixels",
    "resize_pixels",
    "resolve_preprocess",
    "square_size",
    "to_unit_float",
]

Cfg = TypeVar("Cfg", TeacherCfg, CaptionerCfg)


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing a checkpoint asks for."""

    image_size: int
    """Square input resolution."""
    mean: tuple[float, float, float]
    """Per-channel mean of ``[0, 1]`` pixels."""
    std: tuple[float, float, float]
    """Per-channel std."""
    interpolation: Interpolation
    """Resize filter (an ``F.interpolate`` mode)."""


def _rgb(values: Iterable[float]) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b


def square_size(size: int | Iterable[int]) -> int:
    """An open_clip ``image_size`` (int or ``(h, w)``) as an int, refusing non-square sizes."""
    if isinstance(size, int):
        return size
    h, w = (int(s) for s in size)
    if h != w:
        raise ValueError(f"non-square image size {size} is not supported")
    return h


def interpolation_mode(name: str | None) -> Interpolation:
    """An open_clip interpolation name as an ``F.interpolate`` mode (``random``, training-only, becomes bicubic)."""
    if name == "bilinear":
        return "bilinear"
    if name == "nearest":
        return "nearest"
    return "bicubic"


def interpolation_from_resample(resample: object) -> Interpolation:
    """A transformers image processor's ``resample`` (PIL code or enum) as an ``F.interpolate`` mode."""
    # PIL codes: 0 nearest, 2 bilinear, 3 bicubic (1 lanczos, 4 box, 5 hamming have no interpolate() mode).
    code = int(getattr(resample, "value", resample)) if resample is not None else 3
    return "nearest" if code == 0 else "bilinear" if code == 2 else "bicubic"


def checkpoint_preprocess(
    size: int | Iterable[int], mean: Iterable[float], std: Iterable[float], interpolation: Interpolation
) -> Preprocess:
    """A `Preprocess` from a checkpoint's raw values (sizes may be ``(h, w)`` pairs, means lists)."""
    return Preprocess(square_size(size), _rgb(mean), _rgb(std), interpolation)


def resolve_preprocess(cfg: Cfg, found: Preprocess) -> Cfg:
    """``cfg`` with every preprocessing field left ``None`` taken from the checkpoint's `found` values."""
    return dataclasses.replace(
        cfg,
        image_size=cfg.image_size or found.image_size,
        mean=cfg.mean or found.mean,
        std=cfg.std or found.std,
        interpolation=cfg.interpolation or found.interpolation,
    )


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 or float in ``[0, 1]`` -> float32 in ``[0, 1]``."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
    if pixels.dtype == torch.uint8:
        return pixels.to(torch.float32) / 255.0
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be uint8 or floating point in [0, 1], got {pixels.dtype}")
    # NOTE: resize and normalise in fp32 even under autocast; the model itself then runs in the autocast dtype.
    return pixels.to(torch.float32)


def resize_pixels(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize float ``[B, 3, H, W]`` pixels in ``[0, 1]`` to ``size`` (no-op when already that size).

    Non-square inputs are squashed: callers pass crops (e.g. replayed DR augmentations) at any square size.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    # Antialias so downscaling matches PIL/torchvision's resize rather than aliasing strided sampling.
    x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
    # Bicubic overshoots; PIL clamps to the pixel range, so do the same before normalising.
    return x.clamp_(0.0, 1.0) if interpolation == "bicubic" else x


def normalize_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with ``mean``/``std`` of shape ``[3]``."""
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def prepare_pixels(
    pixels: torch.Tensor, size: int, interpolation: str, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 or ``[0, 1]`` float (on ``mean``'s device) -> normalised float ``[B, 3, size, size]``."""
    x = to_unit_float(pixels.to(mean.device, non_blocking=True))
    x = resize_pixels(x, (size, size), interpolation)
    return normalize_pixels(x, mean, std)
