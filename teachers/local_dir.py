"""Backends for ``local-dir:PATH`` teachers that open_clip cannot build (a hook other packages register into).

A ``local-dir:`` directory is an open_clip directory (``open_clip_config.json`` + weights). Most of them, every
student trained here among them, are open_clip models and load with open_clip (``teachers.open_clip_teacher``).
Some students are not: the MobileCLIP-S0 MCt text tower (open_clip#958), Apple's own ViT-B stem, Hugging Face text
towers whose tokenizer and pooling are the student's. ``teachers`` may not import ``students`` (docs/DESIGN.md
import direction), so the package that may, ``distill``, registers a backend here when it is imported: a predicate
on the directory's parsed config and a builder returning a ``Teacher``. ``teachers.factory.create_teacher`` asks the
registered backends, in registration order, before falling back to open_clip.

Limit: a program that builds teachers through ``teachers`` or ``reinforced_data`` without importing ``distill``
has no such backend; an MCt directory then fails in open_clip with a message saying to ``import distill`` first
(the ``distill`` console script always does).

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mcd_common import UsageError

from .registry import LOCAL_DIR_PREFIX, TeacherCfg

if TYPE_CHECKING:  # annotations only: the Teacher class imports torch
    from .teacher import Teacher

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "LocalDirBackend",
    "list_local_dir_backends",
    "local_dir_backend",
    "read_local_dir_config",
    "register_local_dir_backend",
]

CONFIG_NAME = "open_clip_config.json"

LocalDirConfig = Mapping[str, object]
"""A directory's parsed ``open_clip_config.json``."""


@dataclass(frozen=True)
class LocalDirBackend:
    """A way to build ``local-dir:`` teachers that open_clip cannot build."""

    name: str
    """Backend name (for messages)."""
    accepts: Callable[[LocalDirConfig], bool]
    """Whether this backend builds the directory with this config."""
    build: Callable[[TeacherCfg, Path], Teacher]
    """Build the frozen, eval-mode teacher of ``cfg`` from the directory."""


_BACKENDS: dict[str, LocalDirBackend] = {}


def register_local_dir_backend(
    name: str, *, accepts: Callable[[LocalDirConfig], bool], build: Callable[[TeacherCfg, Path], Teacher]
) -> LocalDirBackend:
    """Register a ``local-dir:`` teacher backend; registering the same name again replaces it (re-imports).

    Args:
        name: Backend name.
        accepts: Predicate on the directory's parsed ``open_clip_config.json``.
        build: ``(cfg, directory) -> Teacher``; ``cfg`` is the teacher config with ``weights``/overrides applied.
    """
    backend = LocalDirBackend(name, accepts, build)
    _BACKENDS[name] = backend
    return backend


def list_local_dir_backends() -> list[str]:
    """Registered backend names, in the order they are asked."""
    return list(_BACKENDS)


def local_dir_path(cfg: TeacherCfg) -> Path | None:
    """The directory of a ``local-dir:`` teacher config (``None`` for any other source)."""
    if cfg.source != "open_clip" or not cfg.arch.startswith(LOCAL_DIR_PREFIX):
        return None
    return Path(cfg.arch[len(LOCAL_DIR_PREFIX) :]).expanduser()


def read_local_dir_config(directory: Path, *, kind: str = "teacher", name: str = "") -> dict[str, object]:
    """The parsed ``open_clip_config.json`` of a ``local-dir:`` directory.

    Raises:
        UsageError: no such directory, no config file, unreadable JSON, or no ``model_cfg``.
    """
    if not directory.is_dir():
        raise UsageError(f"{kind} {name!r}: no such directory: {directory}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(
            f"{kind} {name!r}: {config_path} not found; local-dir:PATH must name an open_clip directory "
            f"({CONFIG_NAME} with 'model_cfg' + weights), e.g. a student saved by this toolkit"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{kind} {name!r}: {config_path} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise UsageError(f"{kind} {name!r}: {config_path} has no 'model_cfg'")
    return config


def local_dir_backend(cfg: TeacherCfg) -> tuple[LocalDirBackend, Path] | None:
    """The registered backend that builds this ``local-dir:`` teacher and its directory, or ``None`` (open_clip).

    Raises:
        UsageError: the directory or its config is missing or unreadable.
    """
    directory = local_dir_path(cfg)
    if directory is None or not _BACKENDS:
        return None
    config = read_local_dir_config(directory, name=cfg.name)
    for backend in _BACKENDS.values():
        if backend.accepts(config):
            _logger.debug("teacher %s: local-dir backend %s", cfg.name, backend.name)
            return backend, directory
    return None
