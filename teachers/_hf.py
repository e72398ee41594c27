"""Shared Hugging Face loading helpers: local/offline resolution, error messages, resample codes."""

from __future__ import annotations

import os
from typing import Any

from ._registry import WeightSpec

__all__ = ["hf_location", "hf_offline_error", "interp_from_resample"]


def interp_from_resample(resample: Any) -> str:
    """A transformers image processor's ``resample`` (PIL code or enum) -> ``F.interpolate`` mode."""
    # PIL codes: 0 nearest, 2 bilinear, 3 bicubic (1 lanczos, 4 box, 5 hamming have no interpolate() mode).
    code = int(getattr(resample, "value", resample)) if resample is not None else 3
    return {0: "nearest", 2: "bilinear"}.get(code, "bicubic")


def _hf_offline() -> bool:
    # transformers/huggingface_hub read these at import; read them again so a late setenv is honoured too.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def hf_location(kind: str, name: str, arch: str, weights: WeightSpec) -> tuple[str, bool]:
    """Resolve a Hugging Face source to ``(id_or_dir, local_files_only)``: ``weights.file`` (a directory) wins."""
    if weights.url:
        raise ValueError(f"{kind} {name!r}: Hugging Face sources load from a directory or hub id, not a url")
    location = weights.file or weights.hf_hub or arch
    local = os.path.isdir(location)
    if weights.file and not local:
        raise FileNotFoundError(f"{kind} {name!r}: {location} is not a directory written by save_pretrained")
    return location, local or _hf_offline()


def hf_offline_error(kind: str, name: str, location: str, err: Exception) -> RuntimeError:
    """The error raised when a Hugging Face model cannot be loaded (usually: offline and not cached)."""
    return RuntimeError(
        f"{kind} {name!r}: could not load Hugging Face model {location!r} ({type(err).__name__}: {err}). Without a "
        f"network, save it once with save_pretrained (model and processor) and pass the directory: "
        f"--{kind} hf:/path/to/dir, or --{kind}_weights /path/to/dir."
    )
