"""mobileclip-distill: train small, fast CLIP students from big CLIP teachers (MobileCLIP / TinyCLIP recipes).

`distill` holds the CLI, the Lightning system, losses, training and evaluation; the model zoos live in `students`
and `teachers`, data generation in `reinforced_data`, deployment in `export`. Attributes are imported lazily so
that `import distill` (and `distill --help`) stays light.

Importing `distill` registers the students backend for `local-dir:` teachers (`distill.student_teachers`), so every
student `distill train` wrote, MCt and Hugging Face text towers included, is a teacher for `build-data` and online
`train` (`teachers` may not import `students`, so the hook is registered from here).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from teachers.local_dir import register_local_dir_backend
from teachers.registry import TeacherCfg

if TYPE_CHECKING:  # annotations only: the Teacher class imports torch
    from teachers.teacher import Teacher

__version__ = "0.1.0"

_LAZY = {
    "main": "distill.cli",
    "DistillModule": "distill.module",
    "DistillDataModule": "distill.data",
    "DistillLoss": "distill.losses",
    "ClipLoss": "distill.losses",
    "AffinityKDLoss": "distill.losses",
    "FeatureKDLoss": "distill.losses",
    "ICLLoss": "distill.losses",
    "DataArgs": "distill.args",
    "EvalArgs": "distill.args",
    "InheritArgs": "distill.args",
    "LockArgs": "distill.args",
    "LossArgs": "distill.args",
    "OptimArgs": "distill.args",
    "TrainerArgs": "distill.args",
}

__all__ = sorted(_LAZY)


def _is_student_only_dir(config: Mapping[str, object]) -> bool:
    # NOTE: distill.student_teachers imports torch and students; loaded only when a local-dir teacher is built
    return importlib.import_module("distill.student_teachers").is_student_only_dir(config)


def _build_student_teacher(cfg: TeacherCfg, directory: Path) -> Teacher:
    return importlib.import_module("distill.student_teachers").build_student_teacher(cfg, directory)


register_local_dir_backend("students", accepts=_is_student_only_dir, build=_build_student_teacher)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
