"""Students: small two-tower CLIP models distilled from large teachers (MobileCLIP, TinyCLIP, tiny test models).

Importing the package registers every variant (`students.mobileclip`, `students.tinyclip`, `students.tiny`).
State dicts use open_clip `CustomTextCLIP` keys, so saved students load with `open_clip.create_model("local-dir:")`
(except MCt text towers, which only `load_student` reads). CoCa students (`students.coca.CoCaStudent`, a config
with a `multimodal` decoder section) use open_clip `CoCa` keys and also train a captioning loss.

References:
    MobileCLIP: https://github.com/apple/ml-mobileclip ; TinyCLIP: https://github.com/microsoft/Cream
    CoCa: arXiv:2205.01917 (open_clip `coca_model.py`)
    open_clip: https://github.com/mlfoundations/open_clip ; timm: https://github.com/huggingface/pytorch-image-models
"""

from students import mobileclip, tiny, tinyclip  # noqa: F401  (registration on import)
from students._registry import (
    LOCAL_DIR_PREFIX,
    WeightSpec,
    create_student,
    get_student_cfg,
    list_students,
    register_student,
    resolve_weights,
)
from students.coca import CoCaStudent
from students.inherit import InheritReport, inherit_weights, uniform_layer_indices
from students.io import load_student, read_state_dict, read_student_cfg, save_student
from students.mct import MCtTextTower
from students.prune import L0Pruner, TowerPlan
from students.towers import (
    MCT_OPEN_CLIP_MARKER,
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPStudent,
    ImageTowerCfg,
    StudentCfg,
    TextDecoderCfg,
    TextTowerCfg,
)

__all__ = [
    "CLIPStudent",
    "CoCaStudent",
    "ImageTowerCfg",
    "InheritReport",
    "L0Pruner",
    "LOCAL_DIR_PREFIX",
    "MCT_OPEN_CLIP_MARKER",
    "MCtTextTower",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "StudentCfg",
    "TextDecoderCfg",
    "TextTowerCfg",
    "TowerPlan",
    "WeightSpec",
    "create_student",
    "get_student_cfg",
    "inherit_weights",
    "list_students",
    "load_student",
    "read_state_dict",
    "read_student_cfg",
    "register_student",
    "resolve_weights",
    "save_student",
    "uniform_layer_indices",
]
