"""Students: small two-tower CLIP models distilled from large teachers (MobileCLIP, TinyCLIP, tiny test models).

Importing the package registers every variant (`students.mobileclip`, `students.tinyclip`, `students.tiny`).
Layout: `config` (architecture dataclasses), `towers` (`CLIPStudent`, the re-parameterisation walk), `coca`
(`CoCaStudent`), `mct` (the MCt text tower), `hf_text` (pretrained Hugging Face text towers), `registry` (variant
names -> configs), `factory` (`create_student`, `build_student`, `load_student`), `io` (saving and reading files),
`inherit` / `prune` (weight inheritance), `lock` (LiT-style tower locking).
State dicts use open_clip `CustomTextCLIP` keys, so saved students load with `open_clip.create_model("local-dir:")`
(except MCt text towers, which only `load_student` reads). CoCa students (a config with a `multimodal` decoder
section) use open_clip `CoCa` keys and also train a captioning loss.

References:
    MobileCLIP: https://github.com/apple/ml-mobileclip ; TinyCLIP: https://github.com/microsoft/Cream
    CoCa: arXiv:2205.01917 (open_clip `coca_model.py`)
    open_clip: https://github.com/mlfoundations/open_clip ; timm: https://github.com/huggingface/pytorch-image-models
"""

from students import mobileclip, tiny, tinyclip  # noqa: F401  (registration on import)
from students.coca import CoCaStudent
from students.config import (
    MCT_OPEN_CLIP_MARKER,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTowerCfg,
    StudentCfg,
    TextDecoderCfg,
    TextTowerCfg,
)
from students.factory import build_student, create_student, get_student_cfg, load_student, resolve_weights
from students.hf_text import HFTextTower
from students.inherit import InheritReport, inherit_weights, uniform_layer_indices
from students.io import read_state_dict, read_student_cfg, save_student
from students.lock import TowerLock, lock_image_tower, lock_student, lock_text_tower
from students.mct import MCtTextTower
from students.prune import L0Pruner, TowerPlan
from students.registry import LOCAL_DIR_PREFIX, WeightSpec, list_students, register_student
from students.towers import CLIPStudent, reparameterize_model

__all__ = [
    "CLIPStudent",
    "CoCaStudent",
    "HFTextTower",
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
    "TowerLock",
    "TowerPlan",
    "WeightSpec",
    "build_student",
    "create_student",
    "get_student_cfg",
    "inherit_weights",
    "list_students",
    "load_student",
    "lock_image_tower",
    "lock_student",
    "lock_text_tower",
    "read_state_dict",
    "read_student_cfg",
    "register_student",
    "reparameterize_model",
    "resolve_weights",
    "save_student",
    "uniform_layer_indices",
]
