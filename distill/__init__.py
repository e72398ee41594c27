"""mobileclip-distill: train small, fast CLIP students from big CLIP teachers (MobileCLIP / TinyCLIP recipes).

`distill` holds the CLI, the Lightning system, losses, training and evaluation; the model zoos live in `students`
and `teachers`, data generation in `reinforced_data`, deployment in `export`. Attributes are imported lazily so
that `import distill` (and `distill --help`) stays light.
"""

from __future__ import annotations

import importlib

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
    "LossArgs": "distill.args",
    "OptimArgs": "distill.args",
    "TrainerArgs": "distill.args",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
