"""Image bytes -> the RGB picture every package sees, and the one evaluation view (resize + centre crop).

Training (`reinforced_data`: build-data views, replayed augmentations), evaluation (`distill eval`, validation
during training) and export calibration all decode with `decode_image` and, where they need a fixed view, use
`center_view`, so an image is the same picture wherever it is read: an RGBA, palette or 16-bit PNG cannot become a
different tensor at evaluation time than at training time.

Decoding follows Apple's DataCompDR loader (apple/ml-mobileclip `training/open_clip_v2.patch`: webdataset's
`pilrgba` decoder, then `.convert("RGB")`), so the crops stored by `build-data` stay valid for Apple's trainer.
The view is open_clip's evaluation transform (`open_clip/transform.py`: shortest side resized, centre crop).
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = [
    "ImageDecodeError",
    "Interpolation",
    "center_view",
    "decode_image",
    "eval_view",
    "interpolation_mode",
    "to_uint8_tensor",
]

Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]

_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is the skip-counter name build-data reports."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's `InterpolationMode` for a filter name (`bicubic`, `bilinear`, ...)."""
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {[m.value for m in InterpolationMode]}") from None


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes to RGB the way the DataCompDR loader does (`PIL -> RGBA -> RGB`).

    webdataset's `pilrgba` decoder followed by `.convert("RGB")` drops alpha without compositing. CMYK, greyscale,
    palette and 16-bit images are converted; 16-bit and float greyscale are first scaled to 8 bits (PIL's own
    conversion clips them). EXIF orientation is ignored, as in webdataset.

    Args:
        data: Encoded image bytes (JPEG, PNG, WebP, ...).
        max_pixels: Refuse images with more pixels than this (read from the header, before decoding).

    Raises:
        ImageDecodeError: `reason` is "undecodable" (not an image, truncated, corrupt) or "too_large".
    """
    if not data:
        raise ImageDecodeError("undecodable", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/palette warnings are noise here
            # NOTE: lift PIL's decompression-bomb guard for this call; `max_pixels` is the explicit limit instead.
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(data))
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageDecodeError(
                        "too_large", f"{img.width}x{img.height} image exceeds max_pixels={max_pixels}"
                    )
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad bytes
        raise ImageDecodeError("undecodable", f"cannot decode image: {exc}") from exc
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError("undecodable", f"empty image {img.width}x{img.height}")
    if img.mode in _HIGH_BIT_MODES:
        # 16-bit / float greyscale: PIL's RGBA conversion clips instead of scaling, so map the range to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    try:
        return img.convert("RGBA").convert("RGB")
    except Exception as exc:
        raise ImageDecodeError("undecodable", f"cannot convert {img.mode} image to RGB: {exc}") from exc


def center_view(img: Image.Image, size: int, interpolation: Interpolation | str = "bicubic") -> Image.Image:
    """open_clip's evaluation view: shorter side resized to `size` (antialiased), then a `size` x `size` centre crop."""
    view = F.resize(img, size, interpolation_mode(interpolation), antialias=True)
    return F.center_crop(view, [size, size])


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor `[3, H, W]` (no scaling: models normalise inside, see docs/DESIGN.md)."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def eval_view(data: bytes, size: int, interpolation: Interpolation | str = "bicubic") -> torch.Tensor:
    """Image bytes -> uint8 `[3, size, size]`: `decode_image`, then `center_view`.

    Raises:
        ImageDecodeError: On bytes that are not a usable image.
    """
    return to_uint8_tensor(center_view(decode_image(data), size, interpolation))
