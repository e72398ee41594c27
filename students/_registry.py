"""Student registry (timm style): variants are functions named after themselves, registered on import.

A variant is `@register_student def mobileclip_s0(**kwargs) -> CLIPStudent: return _create(CFG, **kwargs)`.
`create_student(name, *, weights=None, **overrides)` builds it; `name` may carry a pretrained tag (`name.tag`) or be
`local-dir:PATH` (a saved student, see `students.io.load_student`).

References:
    timm registry / factory: https://github.com/huggingface/pytorch-image-models (timm/models/_registry.py, _factory.py)
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from students.io import load_student, load_student_weights, read_state_dict, read_student_cfg
from students.towers import CLIPStudent, StudentCfg

_logger = logging.getLogger(__name__)

__all__ = [
    "WeightSpec",
    "register_student",
    "create_student",
    "list_students",
    "get_student_cfg",
    "resolve_weights",
    "LOCAL_DIR_PREFIX",
]

LOCAL_DIR_PREFIX = "local-dir:"
_OFFLINE_HINT = (
    "Without network access, fetch the file elsewhere and pass it as weights=WeightSpec(file=PATH) "
    "(CLI: --student_weights PATH), or pass a saved student directory as --student local-dir:PATH."
)


@dataclass(frozen=True)
class WeightSpec:
    """Where student weights come from; resolved in the order file > hf_hub > url (as timm and `teachers`)."""

    file: str | None = None
    """Local path: a safetensors/torch state dict, a Lightning `.ckpt`, or a saved student directory."""
    hf_hub: str | None = None
    """Hugging Face Hub `org/repo/` (default file open_clip_model.safetensors) or `org/repo/path/in/repo`."""
    url: str | None = None
    """HTTP(S) URL of a state-dict file (cached under torch.hub's directory)."""


_entrypoints: dict[str, Callable[..., CLIPStudent]] = {}
_pretrained_tags: dict[str, dict[str, WeightSpec]] = {}


def register_student(
    fn: Callable[..., CLIPStudent] | None = None, *, pretrained: dict[str, WeightSpec] | None = None
) -> Any:
    """Register a variant function under its own name (use bare or with `pretrained={tag: WeightSpec}`).

    Raises:
        ValueError: a variant of that name is already registered.
    """

    def _register(func: Callable[..., CLIPStudent]) -> Callable[..., CLIPStudent]:
        name = func.__name__
        if name in _entrypoints:
            raise ValueError(f"student {name!r} is already registered")
        _entrypoints[name] = func
        _pretrained_tags[name] = dict(pretrained or {})
        return func

    return _register(fn) if fn is not None else _register


def list_students(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Registered names matching the fnmatch `pattern`; with `pretrained=True`, `name.tag` entries are added."""
    names: list[str] = []
    for name in sorted(_entrypoints):
        if fnmatch.fnmatch(name, pattern):
            names.append(name)
        if pretrained:
            names.extend(f"{name}.{tag}" for tag in sorted(_pretrained_tags[name]) if fnmatch.fnmatch(name, pattern))
    return names


def _split(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, tag or None


def _entrypoint(name: str) -> tuple[Callable[..., CLIPStudent], str | None]:
    arch, tag = _split(name)
    if arch not in _entrypoints:
        close = difflib.get_close_matches(arch, list(_entrypoints), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown student {name!r}.{hint} See students.list_students().")
    if tag is not None and tag not in _pretrained_tags[arch]:
        tags = sorted(_pretrained_tags[arch])
        raise KeyError(f"student {arch!r} has no pretrained tag {tag!r}; known tags: {tags or 'none'}")
    return _entrypoints[arch], tag


def _create(cfg: StudentCfg, *, weights: WeightSpec | None = None, cfg_only: bool = False, **overrides: Any) -> Any:
    """Shared body of every variant: apply overrides, build, load weights.

    `cfg_only=True` returns the overridden `StudentCfg` without building (`get_student_cfg` uses it).
    """
    cfg = cfg.with_overrides(**overrides)
    if cfg_only:
        return cfg
    # NOTE: weights are resolved before the (possibly large) model is built, so a missing file fails fast
    state, path = None, None
    if weights is not None:
        path = resolve_weights(weights)
        state = read_state_dict(_weights_file(path))
    student = CLIPStudent(cfg)
    if state is not None:
        load_student_weights(student, state, source=str(path))
    return student


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        from students.io import _find_weights

        return _find_weights(path)
    return path


def resolve_weights(spec: WeightSpec) -> Path:
    """Local path of the weights named by `spec` (downloading hub/url sources; offline that fails clearly)."""
    if spec.file:
        path = Path(spec.file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"student weights file not found: {path}")
        return path
    if spec.hf_hub:
        parts = spec.hf_hub.strip().split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"hf_hub must look like 'org/repo/' or 'org/repo/filename', got {spec.hf_hub!r}")
        repo_id, filename = "/".join(parts[:2]), "/".join(p for p in parts[2:] if p)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        errors = []
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:  # pragma: no cover - huggingface_hub is an open_clip dependency
            raise RuntimeError(f"huggingface_hub is needed for hf_hub weights. {_OFFLINE_HINT}") from e
        for candidate in candidates:
            try:
                return Path(hf_hub_download(repo_id=repo_id, filename=candidate))
            except Exception as e:  # noqa: BLE001 - any hub failure is reported together below
                errors.append(f"{candidate}: {type(e).__name__}: {e}")
        raise RuntimeError(
            f"could not fetch student weights from the Hugging Face Hub ({spec.hf_hub}): {'; '.join(errors)}. "
            + _OFFLINE_HINT
        )
    if spec.url:
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(spec.url.split("?")[0])
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(spec.url, str(target), progress=False)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"could not download student weights from {spec.url}: {e}. {_OFFLINE_HINT}") from e
        return target
    raise ValueError("WeightSpec is empty: set file, hf_hub or url")


def create_student(name: str, *, weights: WeightSpec | None = None, **overrides: Any) -> CLIPStudent:
    """Build a registered student (randomly initialised unless weights are given).

    Args:
        name: registered name (`mobileclip_s0`), `name.tag` (pretrained weights of that tag), or
            `local-dir:PATH` (a saved student directory / `.safetensors` / `.ckpt`, loaded as is).
        weights: explicit weights (beat a tag's weights).
        **overrides: config overrides (None values dropped), e.g. `image_size=64`, `context_length=32`,
            `embed_dim=256`, `text_layers=2`; see `StudentCfg.with_overrides`.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name.startswith(LOCAL_DIR_PREFIX):
        if overrides or weights is not None:
            raise ValueError(f"{LOCAL_DIR_PREFIX} students are loaded as saved; drop overrides/weights ({overrides})")
        return load_student(name[len(LOCAL_DIR_PREFIX) :])
    fn, tag = _entrypoint(name)
    if weights is None and tag is not None:
        weights = _pretrained_tags[_split(name)[0]][tag]
    return fn(weights=weights, **overrides)


def get_student_cfg(name: str, **overrides: Any) -> StudentCfg:
    """The `StudentCfg` of a registered name or `local-dir:PATH`, with overrides applied (no model is built)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name.startswith(LOCAL_DIR_PREFIX):
        return read_student_cfg(name[len(LOCAL_DIR_PREFIX) :]).with_overrides(**overrides)
    fn, _ = _entrypoint(name)
    return fn(cfg_only=True, **overrides)
