"""Pixel preparation shared by teachers and captioners: uint8/[0, 1] -> resized, normalised float.

The model wrapper, not the loader, owns normalisation (docs/DESIGN.md "Pixels"), as in timm's
``timm/task/distillation.py`` teacher wrapper that re-normalises inputs with the teacher's own mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_unit_float", "resize_pixels", "normalize_pixels"]


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
