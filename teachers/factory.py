"""Build teachers and captioners: `create_teacher` and `create_captioner` dispatch a config to its backend.

The registry (``teachers.registry``) is data; this module picks the backend (open_clip, Hugging Face, an ensemble
of members built here, or a ``local-dir:`` backend registered in ``teachers.local_dir``) as open_clip's
``create_model`` and timm's ``create_model`` do. Every backend is imported at
the top; ``import teachers`` stays light because ``teachers/__init__.py`` loads this module on first use.
"""

from __future__ import annotations

import logging

from mcd_common import UsageError
from mcd_common.weights import WeightSpec

from .captioners import Captioner, build_hf_captioner, build_open_clip_captioner
from .ensemble import TeacherEnsemble, member_cfgs
from .hf_teacher import build_hf_teacher
from .local_dir import local_dir_backend
from .open_clip_teacher import build_open_clip_teacher
from .registry import CaptionerCfg, TeacherCfg, apply_overrides, get_captioner_cfg, get_teacher_cfg
from .teacher import Teacher

_logger = logging.getLogger(__name__)

__all__ = ["create_captioner", "create_teacher"]


def create_teacher(
    name: str | TeacherCfg, *, weights: WeightSpec | None = None, **overrides: object
) -> Teacher | TeacherEnsemble:
    """Build a frozen, eval-mode teacher (or ensemble) from a name, source spec or config.

    Args:
        name: See `teachers.registry.get_teacher_cfg`; a ``TeacherCfg`` is used as is.
        weights: Explicit weights replacing the config's source (e.g. a local file when offline).
        **overrides: ``TeacherCfg`` fields to replace (``logit_scale=100.0``, ``image_size=...``); ``None`` values
            are ignored.

    Returns:
        A ``Teacher`` for a single model, a ``TeacherEnsemble`` for ensembles and comma-separated names.

    Raises:
        UnknownNameError: Unknown name (with close matches).
        UsageError: Missing, unreadable, unsafe or wrong-architecture weights; one weights file for an ensemble.
        RuntimeError: Weights that cannot be fetched (e.g. offline); the message names the local-file option.
    """
    cfg = name if isinstance(name, TeacherCfg) else get_teacher_cfg(name)
    if cfg.source == "ensemble" and weights is not None and not weights.is_empty:
        raise UsageError(
            f"teacher {cfg.name!r} is an ensemble: one weights file cannot serve several members; pass the members "
            "as a comma-separated list of local-dir:PATH or open_clip:ARCH@FILE instead"
        )
    cfg = apply_overrides(cfg, weights, overrides)
    if cfg.source == "ensemble":
        members = [create_teacher(member) for member in member_cfgs(cfg)]
        _logger.info("teacher ensemble %s: %s", cfg.name, {t.name: t.logit_scale for t in members})
        return TeacherEnsemble(members, name=cfg.name)
    if cfg.source == "hf":
        return build_hf_teacher(cfg)
    found = local_dir_backend(cfg)  # a local-dir: model open_clip cannot build (e.g. an MCt student)
    if found is not None:
        backend, directory = found
        return backend.build(cfg, directory)
    return build_open_clip_teacher(cfg)


def create_captioner(name: str | CaptionerCfg, *, weights: WeightSpec | None = None, **overrides: object) -> Captioner:
    """Build a frozen, eval-mode captioner.

    Args:
        name: A registered name or source spec (see `teachers.registry.get_captioner_cfg`), or a ``CaptionerCfg``.
        weights: Explicit weights replacing the config's source.
        **overrides: ``CaptionerCfg`` fields to replace (``tag="coca"``); ``None`` values are ignored.

    Raises:
        UnknownNameError: Unknown name (with close matches).
        UsageError: Missing, unreadable, unsafe or wrong-architecture weights; a model that is not a captioner.
        RuntimeError: Weights that cannot be fetched (e.g. offline); the message names the local-file option.
    """
    cfg = name if isinstance(name, CaptionerCfg) else get_captioner_cfg(name)
    cfg = apply_overrides(cfg, weights, overrides)
    if cfg.source == "hf":
        return build_hf_captioner(cfg)
    return build_open_clip_captioner(cfg)
