"""DataCompDR-compatible augmentation records: sample them, store them as JSON, decode them, replay them.

A record describes one augmented view of an image without storing its pixels (dataset reinforcement, Faghri et al.,
ICCV'23, apple/ml-dr; reused by MobileCLIP's DataCompDR)::

    [[i, j, h, w], [[op, magnitude], [op, magnitude]] | null]          (the DataCompDR default)
    [[i, j, h, w], flip, [[op, magnitude], [op, magnitude]] | null]    (what we write with --build.hflip)

The format, as Apple's code defines it (apple/ml-mobileclip 4144bb1f081a, `training/dr/transforms.py`,
`Compose.compress` / `Compose.decompress`, `TRANSFORMATION_TO_NAME`, `NO_PARAM_TRANSFORMS`):

- the transforms are those of the dataset's `config.json` `reinforce.image_augmentation` (an entry whose
  `"enable"` is false is dropped), always composed in the fixed order uint8, resize, center_crop, random_crop,
  random_resized_crop, random_horizontal_flip, rand_augment, to_tensor, random_erase, normalize, mixup, cutmix;
- a record holds one entry per transform with random parameters (all but uint8, center_crop, to_tensor,
  normalize), in that order, decoded **by position**; a `null` entry means that transform was skipped when the
  record was drawn (not reapplied);
- entries: random_resized_crop `[i, j, h, w]` (top, left, height, width in original pixels);
  random_horizontal_flip a bool; rand_augment `[[op index, magnitude] x num_ops]` (`OP_NAMES`, torchvision's
  signed magnitudes, translations in absolute pixels of the crop size the record was drawn for, replayed
  unchanged at other sizes); random_erase `[x, y, h, w]`, rows `x:x+h` and columns `y:y+w` of the float view set
  to 0 (skipped when `x == -1`); resize its size; random_crop `[top, left]`; mixup its `lam`; cutmix
  `[lam, x1, y1, x2, y2]` (rows `x1:x2`, columns `y1:y2` pasted from the partner view);
- when mixup or cutmix is configured, a record starts with the partner image's id (or null when neither mixed);
  with a partner every other entry is a pair `[this image's params, the partner's params]`; mixup gives
  `lam * view + (1 - lam) * partner view`, then cutmix pastes its box from the partner view.

`replay` reproduces torchvision's RandAugment on PIL images (NEAREST for geometric ops, no fill) through public
`torchvision.transforms.functional` ops, so a view replayed at the teacher's size is bit-identical to the one the
teacher embedded, and the student can replay the same box at its own size. Resize and random_crop records are
refused (`RecordLayout.check_replayable`); a mixing record needs its partner's image. Our loader hands out uint8
pixels, so a mixup view is rounded to uint8 (Apple mixes normalised floats: within half a grey level).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mcd_common.errors import UsageError
from mcd_common.images import Interpolation, interpolation_mode

__all__ = [
    "DATACOMPDR_LAYOUT",
    "OP_NAMES",
    "RECORD_FIELDS",
    "AugmentCfg",
    "Record",
    "RecordLayout",
    "ViewParams",
    "decode_param_aug",
    "decode_record",
    "op_magnitudes",
    "record_rng",
    "replay",
    "replay_view",
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

RECORD_FIELDS: tuple[str, ...] = (
    "resize",
    "random_crop",
    "random_resized_crop",
    "random_horizontal_flip",
    "rand_augment",
    "random_erase",
    "mixup",
    "cutmix",
)
"""Transforms that store a record entry, in Apple's composition order (see the module docstring)."""
_MIXING = ("mixup", "cutmix")
_NOT_REPLAYED = ("resize", "random_crop")


@dataclass(frozen=True)
class RecordLayout:
    """Which entries a dataset's records hold, in order: the random-parameter transforms of its config."""

    fields: tuple[str, ...] = ("random_resized_crop", "rand_augment")
    """Transform names, a subsequence of `RECORD_FIELDS` (default: DataCompDR's published config)."""

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in RECORD_FIELDS]
        order = [f for f in RECORD_FIELDS if f in self.fields]
        if unknown or order != list(self.fields):
            raise ValueError(f"record fields must be a subsequence of {RECORD_FIELDS}, got {self.fields}")

    @property
    def mixing(self) -> bool:
        """Mixup or cutmix is configured: every record starts with a partner id (or null)."""
        return any(f in _MIXING for f in self.fields)

    @classmethod
    def from_config(cls, image_augmentation: Mapping[str, object]) -> RecordLayout:
        """The layout of a `config.json` `reinforce.image_augmentation` block (Apple's `clean_config` rule)."""
        enabled = set()
        for name, cfg in image_augmentation.items():
            if not (isinstance(cfg, Mapping) and not cfg.get("enable", True)):
                enabled.add(name)
        return cls(tuple(f for f in RECORD_FIELDS if f in enabled))

    def check_replayable(self, where: str = "config.json") -> None:
        """Raise `UsageError` when records of this layout cannot be replayed here."""
        unsupported = [f for f in self.fields if f in _NOT_REPLAYED]
        if unsupported or "random_resized_crop" not in self.fields:
            raise UsageError(
                f"{where}: augmentation records with {unsupported or ['no random_resized_crop']} cannot be replayed "
                "(supported: random_resized_crop, random_horizontal_flip, rand_augment, random_erase, mixup, cutmix)"
            )


DATACOMPDR_LAYOUT = RecordLayout()
"""Records of DataCompDR's published config (random_resized_crop + rand_augment), also our default."""


@dataclass(frozen=True)
class ViewParams:
    """The parameters of one image's view in a record."""

    box: tuple[int, int, int, int]
    """RandomResizedCrop `(i, j, h, w)` in original-image pixels."""
    flip: bool = False
    ops: tuple[tuple[int, float], ...] = ()
    """RandAugment `(op index, magnitude)` pairs (empty: skipped or not configured)."""
    erase: tuple[int, int, int, int] | None = None
    """RandomErasing `(x, y, h, w)`: rows `x:x+h`, columns `y:y+w` set to 0."""


@dataclass(frozen=True)
class Record:
    """A decoded record: this image's view and, for mixing records, the partner and how to mix."""

    view: ViewParams
    partner: str | int | None = None
    """Id of the second image (mixup/cutmix records), as stored."""
    partner_view: ViewParams | None = None
    mixup: float | None = None
    """MixUp `lam`: `lam * view + (1 - lam) * partner view`."""
    cutmix: tuple[float, tuple[int, int, int, int]] | None = None
    """CutMix `(lam, (x1, y1, x2, y2))`: rows `x1:x2`, columns `y1:y2` taken from the partner view."""

    @property
    def needs_partner(self) -> bool:
        """The view mixes in the partner's pixels."""
        return self.mixup is not None or self.cutmix is not None


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

    def record_layout(self) -> RecordLayout:
        """The layout of the records `sample_record` draws for this config (that of `to_dr_config()`)."""
        return RecordLayout.from_config(self.to_dr_config())

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


def _ints(value: object, n: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{what} must be a list of {n} numbers, got {value!r}")
    return tuple(int(v) for v in value)


def _view_params(entries: Mapping[str, object]) -> ViewParams:
    box = entries.get("random_resized_crop")
    if box is None:
        raise ValueError("augmentation record has no random_resized_crop box")
    i, j, h, w = _ints(box, 4, "random_resized_crop")
    if h < 1 or w < 1:
        raise ValueError(f"empty crop box {box!r}")
    ops = []
    for op in entries.get("rand_augment") or ():
        if not isinstance(op, (list, tuple)) or len(op) != 2 or not 0 <= int(op[0]) < len(OP_NAMES):
            raise ValueError(f"bad RandAugment op {op!r}")
        ops.append((int(op[0]), float(op[1])))
    flip = entries.get("random_horizontal_flip", False)
    if not isinstance(flip, bool):
        raise ValueError(f"random_horizontal_flip entry must be a bool, got {flip!r}")
    erase = entries.get("random_erase")
    erase = _ints(erase, 4, "random_erase") if erase is not None else None
    return ViewParams((i, j, h, w), flip, tuple(ops), erase)  # type: ignore[arg-type]


def _mix_entries(mix: Mapping[str, object]) -> tuple[float | None, tuple[float, tuple[int, int, int, int]] | None]:
    mixup = float(mix["mixup"]) if mix.get("mixup") is not None else None  # type: ignore[arg-type]
    cutmix = None
    if mix.get("cutmix") is not None:
        p = mix["cutmix"]
        if not isinstance(p, (list, tuple)) or len(p) != 5:
            raise ValueError(f"cutmix entry must be [lam, x1, y1, x2, y2], got {p!r}")
        cutmix = (float(p[0]), _ints(p[1:], 4, "cutmix box"))
    return mixup, cutmix  # type: ignore[return-value]


def decode_record(record: object, layout: RecordLayout = DATACOMPDR_LAYOUT) -> Record:
    """Decode a record by position, as Apple's `Compose.decompress` does (see the module docstring).

    Args:
        record: One entry of `paug.json["param_aug"]`.
        layout: The dataset's layout (`RecordLayout.from_config` of its `config.json`).

    Raises:
        ValueError: On a record that does not fit the layout or holds malformed entries.
    """
    if not isinstance(record, (list, tuple)) or not record:
        raise ValueError(f"augmentation record must be a non-empty list, got {record!r}")
    entries = list(record)
    partner = None
    if layout.mixing:
        partner, entries = entries[0], entries[1:]
        if partner is not None and not isinstance(partner, (str, int)):
            raise ValueError(f"mixing record must start with the partner's id (or null), got {partner!r}")
    if len(entries) != len(layout.fields):
        raise ValueError(
            f"augmentation record {record!r} has {len(entries)} entries where the dataset's config.json "
            f"(reinforce.image_augmentation) defines {len(layout.fields)}: {list(layout.fields)}"
        )
    own: dict[str, object] = {}
    other: dict[str, object] = {}
    mix: dict[str, object] = {}
    for name, p in zip(layout.fields, entries, strict=True):
        if p is None:
            continue  # skipped when the record was drawn
        if name in _MIXING:
            mix[name] = p
        elif partner is not None:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f"{name} entry of a mixing record must be a pair [this, partner], got {p!r}")
            own[name], other[name] = p
        else:
            own[name] = p
    mixup, cutmix = _mix_entries(mix)
    if (mixup is not None or cutmix is not None) and partner is None:
        raise ValueError(f"augmentation record {record!r} mixes images but names no partner")
    partner_view = _view_params(other) if partner is not None else None
    return Record(_view_params(own), partner, partner_view, mixup, cutmix)


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


def replay_view(
    img: Image.Image, view: ViewParams, size: int | Sequence[int], interpolation: Interpolation = "bicubic"
) -> Image.Image:
    """One image's view: crop box -> resize to `size` -> flip -> RandAugment ops -> random erasing."""
    out_size = [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    i, j, h, w = view.box
    out = F.resized_crop(img, i, j, h, w, out_size, interpolation_mode(interpolation), antialias=True)
    if view.flip:
        out = F.hflip(out)
    for op, magnitude in view.ops:
        out = _apply_op(out, OP_NAMES[op], magnitude)
    if view.erase is not None and view.erase[0] != -1:
        # NOTE: absolute pixels of the record's crop size, as for translations; zero in [0, 1] is black in uint8.
        x, y, eh, ew = view.erase
        arr = np.array(out)
        arr[x : x + eh, y : y + ew] = 0
        out = Image.fromarray(arr)
    return out


def replay(
    img: Image.Image,
    record: object,
    size: int | Sequence[int],
    interpolation: Interpolation = "bicubic",
    layout: RecordLayout = DATACOMPDR_LAYOUT,
    partner: Image.Image | None = None,
) -> Image.Image:
    """Re-create the view a record describes at `size` (e.g. the student's resolution).

    Args:
        img: The original RGB image (see `mcd_common.images.decode_image`), the one the record's box refers to.
        record: A raw record (from `sample_record` or a DataCompDR `paug.json`) or a decoded `Record`.
        size: Output side (or `(height, width)`).
        interpolation: Filter of the crop resize (PIL resampling, always antialiased).
        layout: The dataset's record layout (raw records only).
        partner: The partner's original image, needed when the record mixes (mixup / cutmix).

    Returns:
        The augmented RGB view of shape `size`.

    Raises:
        ValueError: On a malformed record, or a mixing record without `partner`.
    """
    rec = record if isinstance(record, Record) else decode_record(record, layout)
    view = replay_view(img, rec.view, size, interpolation)
    if not rec.needs_partner:
        return view
    if partner is None or rec.partner_view is None:
        raise ValueError(f"the record mixes this image with sample {rec.partner!r}: its image is needed to replay it")
    other = np.asarray(replay_view(partner, rec.partner_view, size, interpolation))
    out = np.asarray(view)
    if rec.mixup is not None:
        lam = rec.mixup
        out = np.clip(np.rint(lam * out.astype(np.float64) + (1.0 - lam) * other), 0, 255).astype(np.uint8)
    if rec.cutmix is not None:
        x1, y1, x2, y2 = rec.cutmix[1]
        out = out.copy()
        out[x1:x2, y1:y2] = other[x1:x2, y1:y2]
    return Image.fromarray(out)


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
