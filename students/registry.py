"""Student registry (timm style): each variant is a function named after itself that returns its `StudentCfg`.

A variant is `@register_student def mobileclip_s0() -> StudentCfg: return StudentCfg(...)`, optionally with
`@register_student(pretrained={"tag": WeightSpec(...)})`. The registry is data (names, configs, pretrained tags)
and name resolution; `students.factory` builds models from it. Besides registered names (`arch` or `arch.tag`),
a student may be named by a saved-student path: `local-dir:PATH`, or a path-looking name (`./runs/x`, `~/s0`,
`runs/x/last.ckpt`).

References:
    timm registry: https://github.com/huggingface/pytorch-image-models (timm/models/_registry.py)
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path

from mcd_common import UnknownNameError, UsageError
from mcd_common.weights import WeightSpec
from students.config import StudentCfg

_logger = logging.getLogger(__name__)

__all__ = [
    "LOCAL_DIR_PREFIX",
    "VariantFn",
    "WeightSpec",
    "list_students",
    "register_student",
    "saved_student_path",
    "variant_cfg",
]

LOCAL_DIR_PREFIX = "local-dir:"
_PATH_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")

VariantFn = Callable[[], StudentCfg]
"""A registered variant: returns the variant's architecture."""

_variants: dict[str, VariantFn] = {}
_pretrained_tags: dict[str, dict[str, WeightSpec]] = {}


def register_student(
    fn: VariantFn | None = None, *, pretrained: dict[str, WeightSpec] | None = None
) -> VariantFn | Callable[[VariantFn], VariantFn]:
    """Register a variant function under its own name (use bare or with `pretrained={tag: WeightSpec}`).

    Raises:
        ValueError: a variant of that name is already registered.
    """

    def _register(func: VariantFn) -> VariantFn:
        name = func.__name__
        if name in _variants:
            raise ValueError(f"student {name!r} is already registered")
        _variants[name] = func
        _pretrained_tags[name] = dict(pretrained or {})
        return func

    return _register(fn) if fn is not None else _register


def list_students(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Registered names matching the fnmatch `pattern`; with `pretrained=True`, `name.tag` entries are added."""
    names: list[str] = []
    for name in sorted(_variants):
        if fnmatch.fnmatch(name, pattern):
            names.append(name)
        if pretrained:
            names.extend(f"{name}.{tag}" for tag in sorted(_pretrained_tags[name]) if fnmatch.fnmatch(name, pattern))
    return names


def variant_cfg(name: str) -> tuple[StudentCfg, WeightSpec | None]:
    """The `StudentCfg` of a registered `arch` or `arch.tag`, and the tag's weights (None without a tag).

    Raises:
        UnknownNameError: unknown name (close matches listed) or unknown tag (known tags listed).
    """
    arch, _, tag = name.partition(".")
    if arch not in _variants:
        close = difflib.get_close_matches(arch, list(_variants), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"unknown student {name!r}.{hint} See students.list_students(), or pass a saved student as "
            f"{LOCAL_DIR_PREFIX}PATH."
        )
    if tag and tag not in _pretrained_tags[arch]:
        tags = sorted(_pretrained_tags[arch])
        raise UnknownNameError(f"student {arch!r} has no pretrained tag {tag!r}; known tags: {tags or 'none'}")
    return _variants[arch](), (_pretrained_tags[arch][tag] if tag else None)


def _looks_like_path(name: str) -> bool:
    # NOTE: registry names are snake_case with an optional `.tag`: never a "/", a leading "." / "~", or a file suffix
    return "/" in name or name.startswith((".", "~")) or name.endswith(_PATH_SUFFIXES)


def saved_student_path(name: str) -> Path | None:
    """The path a student name points at (`local-dir:PATH` or a path-looking name), None for a registry name.

    Raises:
        UsageError: the name is a path that does not exist ("no such directory or file").
    """
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser()
    elif _looks_like_path(name):
        path = Path(name).expanduser()
    else:
        return None
    if not path.exists():
        raise UsageError(
            f"student {name!r}: no such directory or file: {path} (expected a saved student directory, a "
            ".safetensors next to its open_clip_config.json, or a .ckpt from distill train)"
        )
    return path
