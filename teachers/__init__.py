"""Frozen CLIP teachers (open_clip, Hugging Face transformers, ensembles) and synthetic-caption generators.

Public API: ``create_teacher`` / ``create_captioner`` and their registries, the ``Teacher`` interface,
``TeacherEnsemble`` / ``as_ensemble``, and the frozen ``TeacherCfg`` / ``CaptionerCfg`` / ``WeightSpec`` configs.
Heavy modules (open_clip, transformers) load on first use, so importing this package stays cheap. Contracts:
docs/DESIGN.md "teachers".
"""

from . import zoo  # noqa: F401  (registers the named teachers and captioners)
from ._registry import (
    CaptionerCfg,
    TeacherCfg,
    WeightSpec,
    create_captioner,
    create_teacher,
    get_captioner_cfg,
    get_teacher_cfg,
    list_captioners,
    list_teachers,
    register_captioner,
    register_teacher,
)


def __getattr__(name: str):  # PEP 562: keep torch/open_clip out of `import teachers`
    if name in ("Teacher", "OpenClipTeacher"):
        from . import open_clip_teacher

        return getattr(open_clip_teacher, name)
    if name == "HFTeacher":
        from . import hf_teacher

        return hf_teacher.HFTeacher
    if name in ("TeacherEnsemble", "as_ensemble"):
        from . import ensemble

        return getattr(ensemble, name)
    if name in ("Captioner", "clean_caption"):
        from . import captioners

        return getattr(captioners, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
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
    "list_teachers",
    "register_captioner",
    "register_teacher",
]
