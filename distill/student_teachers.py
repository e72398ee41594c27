"""The ``local-dir:`` teacher backend for trained students: every student `distill train` wrote is a teacher.

It serves the student directories open_clip cannot build the way the student does.

`distill train` writes `<run>/student/` in open_clip's directory layout, so most students load as open_clip teachers
(`teachers.open_clip_teacher`; unchanged). Three kinds do not: the MobileCLIP-S0 MCt text tower (open_clip has none,
open_clip#958), Apple's own ViT-B stem (`apple_vit`: open_clip builds timm's variant) and Hugging Face text towers
(their tokenizer and pooling are the student's; open_clip finds the encoder only at the path it was saved to). For
those, `StudentTeacher` wraps the `students.CLIPStudent` itself: frozen, eval mode, its own tokenizer, mean/std,
image size and learned logit scale, so its embeddings are exactly the student's `encode_image` / `encode_text`.

`teachers` may not import `students` (docs/DESIGN.md), so `distill/__init__.py` registers this backend with
`teachers.local_dir` on import (`register`); `distill build-data` and `distill train` run through `distill.cli`, so
the backend is always there for the CLI. Programs calling `reinforced_data` / `teachers` directly must
`import distill` first (or call `distill.student_teachers.register()`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from mcd_common import UsageError
from students import MCT_OPEN_CLIP_MARKER, CLIPStudent, load_student, read_state_dict
from students.io import load_student_weights
from teachers.local_dir import register_local_dir_backend
from teachers.preprocess import checkpoint_preprocess, resolve_preprocess
from teachers.registry import TeacherCfg
from teachers.teacher import Teacher

_logger = logging.getLogger(__name__)

__all__ = ["BACKEND_NAME", "StudentTeacher", "build_student_teacher", "is_student_only_dir", "register"]

BACKEND_NAME = "students"


def is_student_only_dir(config: Mapping[str, object]) -> bool:
    """Whether a ``local-dir:`` config (parsed ``open_clip_config.json``) is a student open_clip cannot build as the
    student does: an MCt text tower, Apple's ViT-B variant, or a Hugging Face text tower."""
    model_cfg = config.get("model_cfg")
    text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, Mapping) else None
    if isinstance(text_cfg, Mapping) and MCT_OPEN_CLIP_MARKER in text_cfg:
        return True
    section = config.get("distill")
    student_cfg = section.get("student_cfg") if isinstance(section, Mapping) else None
    if not isinstance(student_cfg, Mapping):
        return False  # a plain open_clip directory: open_clip's own business
    text, image = student_cfg.get("text") or {}, student_cfg.get("image") or {}
    return text.get("kind") in ("mct", "hf") or bool(image.get("apple_vit"))


class StudentTeacher(Teacher):
    """A trained student used as a frozen teacher.

    Args:
        cfg: Resolved config (preprocessing and context length are the student's).
        student: The student; frozen and put in eval mode here.
    """

    def __init__(self, cfg: TeacherCfg, student: CLIPStudent) -> None:
        learned = float(student.logit_scale.detach().float().exp())
        super().__init__(cfg, embed_dim=student.embed_dim, learned_logit_scale=learned)
        self.student = student
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.student.tokenize(list(texts))

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.encode_image(x, normalize=False)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.student.encode_text(tokens, normalize=False)


def build_student_teacher(cfg: TeacherCfg, directory: Path) -> StudentTeacher:
    """Load the student in `directory` as a teacher (``cfg.weights.file`` replaces its weights, as for open_clip).

    Raises:
        UsageError: unreadable student, hub/url weights, or an image size / context length other than the
            student's (its position embeddings are not resampled).
    """
    student = load_student(directory)
    if cfg.weights.file:
        state = read_state_dict(cfg.weights.file, what="--teacher_weights")
        load_student_weights(student, state, source=str(cfg.weights.file))
    elif not cfg.weights.is_empty:
        raise UsageError(f"teacher {cfg.name!r}: a student directory takes --teacher_weights as a local file only")
    found = checkpoint_preprocess(student.image_size, student.mean, student.std, student.interpolation)
    resolved = resolve_preprocess(cfg, found)
    context_length = cfg.context_length or student.context_length
    if resolved.image_size != student.image_size or context_length != student.context_length:
        raise UsageError(
            f"teacher {cfg.name!r}: image_size {resolved.image_size} / context_length {context_length} differ from "
            f"the student's {student.image_size} / {student.context_length}; a student teacher runs at its own sizes"
        )
    resolved = dataclasses.replace(resolved, context_length=context_length)
    _logger.info("teacher %s: trained student %s (%s text tower)", cfg.name, student.cfg.name, student.cfg.text.kind)
    return StudentTeacher(resolved, student)


def register() -> None:
    """Register this backend with `teachers.local_dir` (idempotent; `import distill` calls it)."""
    register_local_dir_backend(BACKEND_NAME, accepts=is_student_only_dir, build=build_student_teacher)
