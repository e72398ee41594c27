"""Frozen CLIP teachers (open_clip, Hugging Face transformers, ensembles) and synthetic-caption generators.

Public API: ``create_teacher`` / ``create_captioner`` (``teachers.factory``) and their registries
(``teachers.registry``; the published checkpoints are registered in ``teachers.published``), the ``local-dir:``
backend hook (``teachers.local_dir``: ``distill`` registers trained students there), the ``Teacher`` interface,
``TeacherEnsemble`` / ``as_ensemble``, and the frozen ``TeacherCfg`` / ``CaptionerCfg`` / ``WeightSpec`` configs.
Contracts: docs/DESIGN.md "teachers".

``import teachers`` imports only the registries (no torch, no open_clip), so listing names stays cheap
(``distill zoo``); the factory and the model classes are imported on first access (PEP 562 ``__getattr__``).
"""

import importlib

from . import published  # noqa: F401  (registers the named teachers and captioners)
from .local_dir import list_local_dir_backends, register_local_dir_backend
from .registry import (
    DEFAULT_KD_LOGIT_SCALE,
    CaptionerCfg,
    TeacherCfg,
    WeightSpec,
    get_captioner_cfg,
    get_teacher_cfg,
    list_captioners,
    list_teachers,
    register_captioner,
    register_teacher,
)

# name -> the module defining it; these import torch and open_clip, so they load on first access
_LAZY = {
    "create_teacher": "factory",
    "create_captioner": "factory",
    "Teacher": "teacher",
    "OpenClipTeacher": "open_clip_teacher",
    "HFTeacher": "hf_teacher",
    "TeacherEnsemble": "ensemble",
    "as_ensemble": "ensemble",
    "Captioner": "captioners",
    "clean_caption": "captioners",
}


def __getattr__(name: str) -> object:  # PEP 562: keep torch/open_clip out of `import teachers`
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_KD_LOGIT_SCALE",
    "CaptionerCfg",
    "TeacherCfg",
    "WeightSpec",
    "Teacher",
    "OpenClipTeacher",
    "HFTeacher",
    "TeacherEnsemble",
    "Captioner",
    "as_ensemble",
    "clean_caption",
    "create_captioner",
    "create_teacher",
    "get_captioner_cfg",
    "get_teacher_cfg",
    "list_captioners",
    "list_local_dir_backends",
    "list_teachers",
    "register_captioner",
    "register_local_dir_backend",
    "register_teacher",
]
