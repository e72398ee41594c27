"""The one image decoder (Apple's RGBA -> RGB path, 16-bit scaling, errors) and the one evaluation view."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mcd_common.images import ImageDecodeError, center_view, decode_image, eval_view, to_uint8_tensor


def _image(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG")]
)
def test_decode_image_modes_match_webdataset_rgba_path(mode: str, fmt: str):
    img = _image(20, 10).convert(mode)
    data = _encode(img, fmt)
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (20, 10)
    # Apple's loader: webdataset "pilrgba" then .convert("RGB")
    ref = Image.open(io.BytesIO(data)).convert("RGBA").convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_decode_image_16bit_greyscale_is_scaled():
    arr = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    out = np.asarray(decode_image(data))
    assert out.shape == (10, 20, 3) and out.max() > 200 and out[0, 0, 0] == 0
    # PIL's own conversion clips 16-bit values (everything above 255 turns white): not what is stored
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.9


def test_decode_image_errors():
    good = _encode(_image(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(good[: len(good) // 2])
    assert err.value.reason == "undecodable"
    for junk in (b"", b"not an image"):
        with pytest.raises(ImageDecodeError):
            decode_image(junk)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(good, max_pixels=64 * 63)
    assert err.value.reason == "too_large"
    assert decode_image(good, max_pixels=64 * 64).size == (64, 64)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_view_is_open_clips_resize_and_centre_crop(interpolation: str):
    img = _image(90, 50)
    mode = InterpolationMode(interpolation)
    ref = F.center_crop(F.resize(img, 32, mode, antialias=True), [32, 32])
    assert np.array_equal(np.asarray(center_view(img, 32, interpolation)), np.asarray(ref))
    view = eval_view(_encode(img, "PNG"), 32, interpolation)
    assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
    assert torch.equal(view, to_uint8_tensor(ref))
    with pytest.raises(ValueError, match="unknown interpolation"):
        center_view(img, 32, "cubic-ish")
