"""DataCompDR-compatible augmentation records: sample them, store them as JSON, replay them at any resolution.

A record describes one augmented view of an image without storing its pixels (dataset reinforcement, Faghri et al.,
ICCV'23, apple/ml-dr; reused by MobileCLIP's DataCompDR, apple/ml-mobileclip `training/dr/transforms.py`)::

    [[i, j, h, w], [[op, magnitude], [op, magnitude]] | null]          (the DataCompDR default)
    [[i, j, h, w], flip, [[op, magnitude], [op, magnitude]] | null]    (with --build.hflip)

`[i, j, h, w]` is the RandomResizedCrop box (top, left, height, width) in original-image pixels; `op` indexes
`OP_NAMES` (the ml-dr table) and `magnitude` is torchvision's RandAugment magnitude with its sign, translations in
absolute pixels for the crop size the record was sampled for (DataCompDR replays those pixels unchanged at other
sizes). Entries appear in ml-dr's fixed composition order: random_resized_crop, random_horizontal_flip,
rand_augment. `replay` reproduces torchvision's RandAugment on PIL images (NEAREST for geometric ops, no fill)
through public `torchvision.transforms.functional` ops, so a view replayed at the teacher's size is bit-identical
to the one the teacher embedded, and the student can replay the same box at its own size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mcd_common.images import Interpolation, interpolation_mode

__all__ = [
    "OP_NAMES",
    "AugmentCfg",
    "decode_param_aug",
    "op_magnitudes",
    "parse_record",
    "record_rng",
    "replay",
    "sample_record",
]

OP_NAMES: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
"""RandAugment op index table of ml-dr / DataCompDR (torchvision's `_augmentation_space` order)."""


@dataclass(frozen=True)
class AugmentCfg:
    """DataCompDR augmentation: RandomResizedCrop, optional horizontal flip, RandAugment (torchvision defaults)."""

    crop_size: int = 224
    """Side the records are sampled for (sets the translate magnitudes, in pixels); DataCompDR: 224."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range, as a fraction of the image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    interpolation: Interpolation = "bicubic"
    """Resampling filter of the crop resize (RandAugment's geometric ops always use NEAREST, as torchvision)."""
    rand_augment: bool = True
    """Append RandAugment ops to each record."""
    num_ops: int = 2
    """RandAugment ops per view."""
    magnitude: int = 9
    """RandAugment magnitude bin."""
    num_bins: int = 31
    """RandAugment magnitude bins."""
    p: float = 1.0
    """Probability of applying RandAugment to a view (a skipped view stores null)."""
    hflip: bool = False
    """Add a horizontal-flip flag (p = 0.5) to each record; DataCompDR does not flip."""

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.magnitude < self.num_bins:
            raise ValueError(f"magnitude must be in [0, num_bins), got {self.magnitude} with {self.num_bins} bins")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if self.num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {self.num_ops}")

    def to_dr_config(self) -> dict:
        """The `reinforce.image_augmentation` block of a DataCompDR `config.json` (ml-dr transform names)."""
        cfg: dict[str, dict[str, object]] = {
            "random_resized_crop": {
                "interpolation": self.interpolation,
                "size": self.crop_size,
                "scale": list(self.scale),
                "ratio": list(self.ratio),
            },
            "rand_augment": {
                "enable": self.rand_augment,
                "p": self.p,
                "num_ops": self.num_ops,
                "magnitude": self.magnitude,
                "num_magnitude_bins": self.num_bins,
            },
            "to_rgb": {"enable": True},
            "to_tensor": {"enable": True},
        }
        if self.hflip:
            cfg["random_horizontal_flip"] = {"enable": True, "p": 0.5}
        return cfg


@functools.lru_cache(maxsize=64)
def op_magnitudes(num_bins: int, crop_size: int) -> tuple[tuple[str, tuple[float, ...], bool], ...]:
    """torchvision's RandAugment magnitude bins `(op name, bins, signed)` for a square `crop_size` image.

    Computed with torch exactly as `torchvision.transforms.RandAugment._augmentation_space`, so the stored floats are
    the very values torchvision (and DataCompDR) produce, e.g. TranslateX at bin 9 of 31 for 224 px is
    150 / 331 * 224 * 9 / 30 = 30.45 px.
    """
    side = float(crop_size)
    table = {
        "Identity": (torch.tensor(0.0), False),
        "ShearX": (torch.linspace(0.0, 0.3, num_bins), True),
        "ShearY": (torch.linspace(0.0, 0.3, num_bins), True),
        "TranslateX": (torch.linspace(0.0, 150.0 / 331.0 * side, num_bins), True),
        "TranslateY": (torch.linspace(0.0, 150.0 / 331.0 * side, num_bins), True),
        "Rotate": (torch.linspace(0.0, 30.0, num_bins), True),
        "Brightness": (torch.linspace(0.0, 0.9, num_bins), True),
        "Color": (torch.linspace(0.0, 0.9, num_bins), True),
        "Contrast": (torch.linspace(0.0, 0.9, num_bins), True),
        "Sharpness": (torch.linspace(0.0, 0.9, num_bins), True),
        "Posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(), False),
        "Solarize": (torch.linspace(255.0, 0.0, num_bins), False),
        "AutoContrast": (torch.tensor(0.0), False),
        "Equalize": (torch.tensor(0.0), False),
    }
    assert tuple(table) == OP_NAMES
    # NOTE: scalar entries (no magnitude) keep an empty bin tuple; sample_record stores 0.0 for them.
    return tuple(
        (name, tuple(float(v) for v in mags.tolist()) if mags.ndim > 0 else (), signed)
        for name, (mags, signed) in table.items()
    )


def record_rng(seed: int, uid: str, index: int) -> np.random.Generator:
    """Per-view generator derived from `(seed, uid, index)` with a stable hash.

    Records therefore depend on neither worker count, batch size nor sample order, and a resumed build samples
    exactly the records of an uninterrupted one.
    """
    digest = hashlib.sha256(f"{seed}/{uid}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _rrc_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator) -> list:
    # torchvision RandomResizedCrop.get_params, drawing from an explicit generator instead of torch's global RNG.
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return [i, j, h, w]
    # Fallback to a central crop at the closest allowed aspect ratio (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def sample_record(width: int, height: int, rng: np.random.Generator, cfg: AugmentCfg | None = None) -> list:
    """Sample one DataCompDR augmentation record for a `width` x `height` image.

    Args:
        width: Original image width in pixels.
        height: Original image height in pixels.
        rng: Generator to draw from (see `record_rng`).
        cfg: Augmentation parameters; defaults to `AugmentCfg()`.

    Returns:
        A JSON-able record `[[i, j, h, w], (flip,) [[op, magnitude] x num_ops] | None]` (the RandAugment entry is
        absent when `cfg.rand_augment` is False).
    """
    cfg = cfg or AugmentCfg()
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    record: list = [_rrc_box(width, height, cfg.scale, cfg.ratio, rng)]
    if cfg.hflip:
        record.append(bool(rng.random() < 0.5))
    if cfg.rand_augment:
        # NOTE: torchvision skips with `rand > p`, so p = 1 never skips; one draw per view keeps streams aligned.
        if rng.random() > cfg.p:
            record.append(None)
        else:
            table = op_magnitudes(cfg.num_bins, cfg.crop_size)
            ops = []
            for _ in range(cfg.num_ops):
                op = int(rng.integers(len(table)))
                _, bins, signed = table[op]
                magnitude = bins[cfg.magnitude] if bins else 0.0
                if signed and rng.integers(2):
                    magnitude = -magnitude
                ops.append([op, magnitude])
            record.append(ops)
    return record


def parse_record(record: Sequence) -> tuple[tuple[int, int, int, int], bool, list[tuple[int, float]] | None]:
    """Split a record into `(box, flip, ops)`; accepts every form `sample_record` writes.

    Raises:
        ValueError: On a malformed record.
    """
    if not isinstance(record, (list, tuple)) or not record:
        raise ValueError(f"augmentation record must be a non-empty list, got {record!r}")
    box = record[0]
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"augmentation record must start with a crop box [i, j, h, w], got {box!r}")
    flip = False
    ops = None
    for entry in record[1:]:
        if isinstance(entry, bool):
            flip = entry
        elif entry is None:
            ops = None
        elif isinstance(entry, (list, tuple)):
            ops = []
            for op in entry:
                if not isinstance(op, (list, tuple)) or len(op) != 2 or not 0 <= int(op[0]) < len(OP_NAMES):
                    raise ValueError(f"bad RandAugment op {op!r} in record {record!r}")
                ops.append((int(op[0]), float(op[1])))
        else:
            raise ValueError(f"unexpected entry {entry!r} in augmentation record {record!r}")
    i, j, h, w = (int(v) for v in box)
    if h < 1 or w < 1:
        raise ValueError(f"empty crop box {box!r}")
    return (i, j, h, w), flip, ops


def _apply_op(img: Image.Image, name: str, magnitude: float) -> Image.Image:
    # Same semantics as torchvision.transforms.autoaugment._apply_op on PIL images, with RandAugment's defaults
    # (NEAREST, fill None), written with the public functional API.
    nearest = InterpolationMode.NEAREST
    if name == "ShearX":
        # NOTE: shear angle = atan(magnitude) around the top-left corner, as torchvision/AutoAugment.
        return F.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(magnitude)), 0.0], nearest, None, [0, 0])
    if name == "ShearY":
        return F.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(magnitude))], nearest, None, [0, 0])
    if name == "TranslateX":
        # NOTE: absolute pixels, truncated toward zero; not rescaled to the replay size (DataCompDR quirk).
        return F.affine(img, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], nearest, None)
    if name == "TranslateY":
        return F.affine(img, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], nearest, None)
    if name == "Rotate":
        return F.rotate(img, magnitude, nearest, fill=None)
    if name == "Brightness":
        return F.adjust_brightness(img, 1.0 + magnitude)
    if name == "Color":
        return F.adjust_saturation(img, 1.0 + magnitude)
    if name == "Contrast":
        return F.adjust_contrast(img, 1.0 + magnitude)
    if name == "Sharpness":
        return F.adjust_sharpness(img, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(img, int(magnitude))
    if name == "Solarize":
        return F.solarize(img, magnitude)
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Identity":
        return img
    raise ValueError(f"unknown RandAugment op {name!r}")


def replay(
    img: Image.Image, record: Sequence, size: int | Sequence[int], interpolation: Interpolation = "bicubic"
) -> Image.Image:
    """Re-create the view a record describes: crop box -> resize to `size` -> flip -> RandAugment ops.

    Args:
        img: The original RGB image (see `mcd_common.images.decode_image`), the one the record's box refers to.
        record: A record from `sample_record` or a DataCompDR `paug.json`.
        size: Output side (or `(height, width)`); the box is resized to it, e.g. the student's resolution.
        interpolation: Filter of the crop resize (PIL resampling, always antialiased).

    Returns:
        The augmented RGB view of shape `size`.
    """
    (i, j, h, w), flip, ops = parse_record(record)
    out_size = [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    view = F.resized_crop(img, i, j, h, w, out_size, interpolation_mode(interpolation), antialias=True)
    if flip:
        view = F.hflip(view)
    for op, magnitude in ops or ():
        view = _apply_op(view, OP_NAMES[op], magnitude)
    return view


def decode_param_aug(obj: object) -> list[list]:
    """The list of records from a `paug.json` member in any of its published forms.

    Accepts the parsed dict (`{"param_aug": [...]}`), the bare list, raw bytes/str of either, and Hugging Face's
    DataCompDR copies, where `param_aug` (or the whole member) is itself a JSON string.

    Raises:
        ValueError: When no list of records can be found.
    """
    for _ in range(4):  # unwrap at most a few layers of string / dict nesting
        if isinstance(obj, (bytes, bytearray)):
            obj = obj.decode("utf-8")
        if isinstance(obj, str):
            obj = json.loads(obj)
            continue
        if isinstance(obj, dict):
            if "param_aug" not in obj:
                raise ValueError(f"paug.json has no 'param_aug' key (keys: {sorted(obj)})")
            obj = obj["param_aug"]
            continue
        break
    if not isinstance(obj, list):
        raise ValueError(f"param_aug must be a list of records, got {type(obj).__name__}")
    return obj
