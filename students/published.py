"""Published checkpoints in other layouts, detected from their keys: Apple MobileCLIP v1, TinyCLIP, Hugging Face CLIP.

`students.io` calls two functions here, so every place that accepts student weights takes these files with no
flag: `adapt_state_dict` inside `load_student_weights` (`create_student(..., weights=...)`, tags, `_create`) and
`read_published_checkpoint` inside `load_student` (`local-dir:`, `--student_weights`, `--inherit.source`), which also
infers the architecture of a bare published file that has no `open_clip_config.json` of ours next to it.

| format | detected by | converter |
| --- | --- | --- |
| `open_clip` | anything else (our own keys; open_clip `CLIP`/`CustomTextCLIP`) | `students.io.normalize_state_dict` |
| `apple` | `image_encoder.model.*`, `text_encoder.*` | `students.convert_apple` |
| `tinyclip` | `_image_encoder.*`, `_text_encoder.*`, `_logit_scale.*` | `students.convert_tinyclip` |
| `hf` | `vision_model.*`, `text_model.*` (+ `config.json`) | `students.convert_hf` |
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from mcd_common import UsageError
from mcd_common.weights import read_state_dict_file
from students.config import APPLE_VIT_TIMM_NAME, StudentCfg
from students.convert_apple import (
    APPLE_VARIANTS,
    apple_student_cfg,
    apple_variant,
    convert_apple_state_dict,
    is_apple_state_dict,
)
from students.convert_hf import (
    HF_WEIGHT_NAMES,
    check_hf_clip_config,
    convert_hf_clip_state_dict,
    hf_clip_student_cfg,
    is_hf_clip_state_dict,
    read_hf_clip_config,
)
from students.convert_tinyclip import convert_tinyclip_state_dict, is_tinyclip_state_dict, native_vit_student_cfg
from students.towers import CLIPStudent, make_apple_vit

_logger = logging.getLogger(__name__)

__all__ = [
    "WeightFormat",
    "WEIGHT_FORMATS",
    "detect_format",
    "convert_published",
    "adapt_state_dict",
    "read_published_checkpoint",
    "accepted_formats",
    "copy_student_weights",
]

WeightFormat = Literal["open_clip", "apple", "tinyclip", "hf"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("open_clip", "apple", "tinyclip", "hf")
_OUR_CONFIG = "open_clip_config.json"  # students.io.CONFIG_NAME (io imports this module)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def detect_format(state: dict[str, torch.Tensor]) -> WeightFormat:
    """The layout of a state dict, from its keys.

    Raises:
        UsageError: keys of more than one published layout in one file.
    """
    found = [
        fmt
        for fmt, hit in (
            ("apple", is_apple_state_dict(state)),
            ("tinyclip", is_tinyclip_state_dict(state)),
            ("hf", is_hf_clip_state_dict(state)),
        )
        if hit
    ]
    if len(found) > 1:
        raise UsageError(f"state dict mixes the key layouts of {found}: save one model per file")
    return found[0] if found else "open_clip"


def convert_published(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], WeightFormat]:
    """Convert a published layout to our keys; our own (open_clip) layout is returned as is."""
    fmt = detect_format(state)
    if fmt == "apple":
        return convert_apple_state_dict(state), fmt
    if fmt == "tinyclip":
        return convert_tinyclip_state_dict(state), fmt
    if fmt == "hf":
        return convert_hf_clip_state_dict(state), fmt
    return state, fmt


def adapt_state_dict(student: CLIPStudent, state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Convert a published state dict for `student` (called by `load_student_weights` before its strict load).

    Apple's MobileCLIP-B weights switch a timm `vit_base_mci_224` student to Apple's own ViT (`apple_vit`, in
    place); Hugging Face weights are checked against the `config.json` next to `source` when there is one.
    """
    converted, fmt = convert_published(state)
    if fmt == "open_clip":
        return state
    image = student.cfg.image
    if fmt == "apple" and apple_variant(state) == APPLE_VIT_TIMM_NAME == image.timm_model_name and not image.apple_vit:
        _logger.info(
            "%s: Apple MobileCLIP-B weights; building Apple's ViT-B (stem padding 1, LayerNorm eps 1e-5) instead of "
            "timm's vit_base_mci_224",
            source,
        )
        student.cfg = dataclasses.replace(student.cfg, image=dataclasses.replace(image, apple_vit=True))
        make_apple_vit(student.visual)
    if fmt == "hf" and os.path.exists(source):
        config = read_hf_clip_config(source)
        if config is not None:
            check_hf_clip_config(config, student.cfg)
    _logger.info("%s: %s layout, %d keys converted to %d student keys", source, fmt, len(state), len(converted))
    return converted


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP-saved files (TinyCLIP's factory strips the same prefix)
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _published_files(path: Path) -> tuple[Path, dict | None] | None:
    """The weight file to inspect (and a Hugging Face config), or None where the path is one of ours."""
    if path.is_dir():
        if (path / _OUR_CONFIG).is_file():
            return None
        config = read_hf_clip_config(path)
        weights = next((path / n for n in HF_WEIGHT_NAMES if (path / n).is_file()), None)
        return (weights, config) if weights is not None and config is not None else None
    if (path.parent / _OUR_CONFIG).is_file() or path.suffix == ".ckpt":
        return None
    if path.suffix not in _TORCH_SUFFIXES + (".safetensors",):
        return None
    return path, read_hf_clip_config(path)


def read_published_checkpoint(path: str | os.PathLike) -> tuple[StudentCfg, dict[str, torch.Tensor]] | None:
    """The architecture and converted weights of a published checkpoint with no config of ours; else None.

    Takes Apple's `mobileclip_*.pt`, TinyCLIP's `TinyCLIP-*.pt`, and a Hugging Face `CLIPModel` directory (or its
    weight file next to `config.json`). Returns None for our own directories, `.ckpt` files, files next to an
    `open_clip_config.json`, and open_clip-layout files (the caller reports those as before).

    Raises:
        UsageError: a published layout that cannot be loaded (auto TinyCLIP, unknown Apple variant, ...), or a
            Hugging Face state dict without its `config.json`.
    """
    found = _published_files(Path(path).expanduser())
    if found is None:
        return None
    weights, hf_config = found
    state = _strip_module(read_state_dict_file(weights, what="student weights"))
    converted, fmt = convert_published(state)
    if fmt == "open_clip":
        return None
    if fmt == "apple":
        cfg = apple_student_cfg(state)
    elif fmt == "tinyclip":
        cfg = native_vit_student_cfg(converted)
    elif hf_config is None:
        raise UsageError(f"{weights}: a Hugging Face CLIP state dict needs its config.json next to it")
    else:
        cfg = hf_clip_student_cfg(hf_config, converted)
    _logger.info("%s: %s checkpoint, loaded as %s", weights, fmt, cfg.name)
    return cfg, converted


def accepted_formats(cfg: StudentCfg) -> list[WeightFormat]:
    """Which weight layouts a student architecture can load (`distill zoo`).

    `open_clip` always (our keys); `apple` when the towers are those of one of Apple's v1 models; `tinyclip` / `hf`
    for an open_clip ViT with a plain causal transformer text tower (what TinyCLIP's fork and `CLIPModel` express).
    """
    formats: list[WeightFormat] = ["open_clip"]
    variant = APPLE_VARIANTS.get(cfg.image.timm_model_name or "")
    if variant is not None and cfg.text == variant[1] and cfg.embed_dim == 512 and cfg.multimodal is None:
        formats.append("apple")
    image, text = cfg.image, cfg.text
    plain_vit = not image.is_timm and not image.attentional_pool
    plain_text = text.kind == "transformer" and text.causal and not text.embed_cls
    if plain_vit and plain_text and cfg.multimodal is None:
        formats += ["tinyclip", "hf"]
    return formats


def copy_student_weights(target: CLIPStudent, source: CLIPStudent) -> None:
    """Load `source`'s weights into `target` strictly, adopting the image-tower variant the keys cannot carry.

    A student loaded from Apple's `mobileclip_b.pt` has Apple's own ViT stem and LayerNorm eps (`apple_vit`) but the
    same keys as timm's; copying only its state dict would silently fall back to timm's definition.
    """
    target.load_state_dict(source.state_dict(), strict=True)
    if source.cfg.image.apple_vit and not target.cfg.image.apple_vit:
        if target.cfg.image.timm_model_name != APPLE_VIT_TIMM_NAME:
            raise UsageError(f"Apple ViT-B weights do not fit student {target.cfg.name!r}")
        target.cfg = dataclasses.replace(target.cfg, image=dataclasses.replace(target.cfg.image, apple_vit=True))
        make_apple_vit(target.visual)
