"""Student files: save in open_clip's directory layout, read saved students, state dicts and Lightning checkpoints.

`save_student` writes `open_clip_config.json` + `open_clip_model.safetensors`, a directory that
`open_clip.create_model("local-dir:" + out_dir)` loads directly (every student except those with the MCt text tower;
CoCa students load as open_clip `CoCa`), plus a `distill` section holding the full `StudentCfg`.
`read_saved_student` reads such a directory, a bare safetensors file next to its config, a plain open_clip directory
(config converted with `StudentCfg.from_open_clip`), or a Lightning `.ckpt` written by `distill train`;
`students.factory.load_student` builds the model from what it returns.

`normalize_state_dict` is the one place where a state dict read from any file becomes our (open_clip
`CustomTextCLIP` / `CoCa`) keys; every weight read of `students` passes through it.

MCt students: open_clip has no MCt text tower (open_clip#958), so their `text_cfg` carries the key
`students.config.MCT_OPEN_CLIP_MARKER`; open_clip then fails with
`CLIPTextCfg.__init__() got an unexpected keyword argument 'mct_text_tower_is_not_in_open_clip_load_with_students_...'`.
Load those with `students.load_student(path)`.

Hugging Face text towers: the directory also holds the encoder's `config.json` and tokenizer files, and both the
open_clip `text_cfg` (`hf_model_name`) and the `StudentCfg` name the directory itself, so the student rebuilds
offline without the directory it was built from. Reading a moved directory uses the files where they are now
(open_clip, which reads `hf_model_name` as written, needs the directory at the path it was saved to).

Weights are read only through `mcd_common.weights` (safetensors, or `torch.load(weights_only=True)` with no
fallback): nothing here unpickles.

References:
    open_clip local-dir / hf-hub layout: https://github.com/mlfoundations/open_clip (src/open_clip/factory.py)
    safetensors: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import convert_to_custom_text_state_dict
from safetensors.torch import save_file

from mcd_common import UsageError
from mcd_common._open_clip import find_checkpoint_in_dir
from mcd_common.files import atomic_path, atomic_write_text
from mcd_common.weights import read_state_dict_file, read_weights, state_dict_mismatch
from students.config import StudentCfg
from students.hf_text import HF_CONFIG_NAME, HFTextTower, save_hf_files
from students.published import adapt_state_dict, read_published_checkpoint
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "SavedStudent",
    "find_weights",
    "load_student_weights",
    "normalize_state_dict",
    "read_saved_student",
    "read_state_dict",
    "read_student_cfg",
    "save_student",
]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
FORMAT_VERSION = 1
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Suffixes of torch files read as Lightning checkpoints by `read_saved_student` (the config inside them)."""


@dataclass(frozen=True)
class SavedStudent:
    """What a saved student holds: its architecture and its weights (already in our keys)."""

    cfg: StudentCfg
    """The architecture."""
    state: dict[str, torch.Tensor]
    """The weights, normalised by `normalize_state_dict`."""
    reparameterized: bool
    """Whether the weights are folded (`reparam_conv`) ones, so the model must be folded before loading them."""
    source: Path
    """The file the weights came from (for messages)."""


# ---------------------------------------------------------------------------------------------------------------------
# saving
def save_student(student: CLIPStudent, out_dir: str | os.PathLike) -> Path:
    """Write `student` as an open_clip directory; returns the directory.

    Files: `open_clip_config.json` (`{"model_cfg", "preprocess_cfg", "distill": {"student_cfg", "format",
    "reparameterized"}}`) and `open_clip_model.safetensors`, plus a Hugging Face text tower's `config.json` and
    tokenizer files. Every file is written atomically, the config last, so a config on disk always has its weights
    (and tokenizer) next to it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = student.cfg
    if isinstance(student.text, HFTextTower):
        # The Hugging Face config + tokenizer go into the student directory, which the written config names as
        # its text tower directory: the saved student no longer needs the directory it was built from.
        save_hf_files(student.text, out)
        cfg = _with_hf_dir(cfg, out.resolve())
    # NOTE: clone so safetensors never sees views sharing storage (it refuses them), and tensors are on the CPU.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in student.state_dict().items()}
    reparameterized = any("reparam_conv" in k for k in tensors)
    config = {
        "model_cfg": cfg.open_clip_model_cfg(),
        "preprocess_cfg": cfg.open_clip_preprocess_cfg(),
        "distill": {"student_cfg": cfg.to_dict(), "format": FORMAT_VERSION, "reparameterized": reparameterized},
    }
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "student": cfg.name})
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if cfg.text.kind == "mct":
        _logger.info("saved MCt student to %s: load it with students.load_student (open_clip cannot)", out)
    return out


def _with_hf_dir(cfg: StudentCfg, directory: Path) -> StudentCfg:
    """`cfg` with its Hugging Face text tower read from `directory`."""
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hf_model_dir=str(directory)))


# ---------------------------------------------------------------------------------------------------------------------
# state dicts
def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # NOTE: keys without the prefix are dropped (a Lightning checkpoint also holds `loss.*`, `teacher.*`, ...)
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def normalize_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a state dict read from any file into student keys (open_clip `CustomTextCLIP` / `CoCa`).

    The one place this happens: strips Lightning's `student.` and DDP's `module.` prefixes, and moves the flat
    open_clip `CLIP` text keys (`positional_embedding`, `text_projection`, `transformer.*`) to `text.*`.
    """
    state = _strip_prefix(dict(state), "student.")
    state = _strip_prefix(state, "module.")
    if "text_projection" in state and "positional_embedding" in state:
        state = convert_to_custom_text_state_dict(state)
    return state


def find_weights(directory: Path) -> Path:
    """The weight file of a saved-student directory: open_clip's choice, else the first `*.pt` / `*.ckpt`.

    Raises:
        UsageError: the directory holds no weight file.
    """
    found = find_checkpoint_in_dir(directory)
    if found is not None:
        return found
    others = sorted(p for s in (".pt", ".ckpt") for p in directory.glob("*" + s))
    if not others:
        raise UsageError(f"no weights (*.safetensors, *.bin, *.pth, *.pt, *.ckpt) in {directory}")
    return others[0]


def read_state_dict(path: str | os.PathLike, *, what: str = "student weights") -> dict[str, torch.Tensor]:
    """Read a state dict (safetensors, torch file, Lightning `.ckpt`, or a directory holding one) in student keys.

    Args:
        path: The file, or a directory (its weight file is found with `find_weights`).
        what: What the file is, for messages (`"--student_weights"`).

    Raises:
        UsageError: missing, empty, unreadable or unsafe file (one line naming it).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_weights(path)
    return normalize_state_dict(read_state_dict_file(path, what=what))


def load_student_weights(
    student: CLIPStudent, state: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Load `state` into `student` strictly; weights of another architecture raise one line saying what differs.

    If the state dict holds folded (`reparam_conv`) weights and the student does not, the student is
    re-parameterised first. Published layouts (Apple MobileCLIP, TinyCLIP, Hugging Face CLIP) are converted first
    (`students.published.adapt_state_dict`).

    Raises:
        UsageError: missing or unexpected keys, or shape mismatches (the first few of each, named).
    """
    state = adapt_state_dict(student, dict(state), source=source)
    if any("reparam_conv" in k for k in state) and not student.is_reparameterized:
        student.eval().reparameterize()
    own = student.state_dict()
    # open_clip writes logit_scale as a scalar or as [1] depending on version; both mean the same parameter
    if "logit_scale" in state and "logit_scale" in own and state["logit_scale"].ndim != own["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    mismatch = state_dict_mismatch(own, state)
    if mismatch:
        raise UsageError(f"weights from {source} do not fit student {student.cfg.name!r}: {mismatch}")
    student.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# saved students
def _read_config_json(config_path: Path) -> tuple[StudentCfg, bool]:
    """`(cfg, reparameterized)` of an `open_clip_config.json` (ours, or a plain open_clip one)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{config_path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    distill = config.get("distill") or {}
    if "student_cfg" in distill:
        fmt = distill.get("format", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise UsageError(f"{config_path} has student format {fmt}; this version reads up to {FORMAT_VERSION}")
        cfg, reparameterized = StudentCfg.from_dict(distill["student_cfg"]), bool(distill.get("reparameterized"))
    elif "model_cfg" in config:
        name = config_path.parent.name or "open_clip"
        cfg = StudentCfg.from_open_clip(config["model_cfg"], config.get("preprocess_cfg"), name=name)
        reparameterized = False
    else:
        raise UsageError(f"{config_path} has neither a 'distill.student_cfg' nor a 'model_cfg' section")
    if cfg.text.kind == "hf" and (config_path.parent / HF_CONFIG_NAME).is_file():
        # NOTE: a saved student's own Hugging Face files win over the path recorded when it was saved (it may
        # have been moved or copied since)
        cfg = _with_hf_dir(cfg, config_path.parent.resolve())
    return cfg, reparameterized


def _config_next_to(path: Path) -> Path:
    config_path = path / CONFIG_NAME if path.is_dir() else path.parent / CONFIG_NAME
    if not config_path.is_file():
        where = f"{path} has no {CONFIG_NAME}" if path.is_dir() else f"{path}: no {CONFIG_NAME} next to it"
        raise UsageError(f"{where}, so the architecture is unknown: not a saved student / open_clip directory")
    return config_path


def _read_checkpoint(path: Path) -> tuple[StudentCfg, dict[str, torch.Tensor]]:
    """`(cfg, raw state dict)` of a Lightning checkpoint written by `distill train`."""
    ckpt = read_weights(path, what="student checkpoint")
    if not isinstance(ckpt, dict):
        raise UsageError(f"student checkpoint {path}: not a checkpoint dict (found {type(ckpt).__name__})")
    cfg = (ckpt.get("hyper_parameters") or {}).get("student_cfg")
    if not isinstance(cfg, dict):
        raise UsageError(
            f"student checkpoint {path}: no hyper_parameters['student_cfg'] (not written by distill train?)"
        )
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UsageError(f"student checkpoint {path}: no 'state_dict'")
    return StudentCfg.from_dict(cfg), state


def read_student_cfg(path: str | os.PathLike) -> StudentCfg:
    """The `StudentCfg` of a saved student (directory, safetensors next to its config, or `.ckpt`), without weights.

    Raises:
        UsageError: no such path, or no readable config.
    """
    path = _existing(path)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return _read_checkpoint(path)[0]
    return _read_config_json(_config_next_to(path))[0]


def read_saved_student(path: str | os.PathLike) -> SavedStudent:
    """Read a saved student: its config and weights, without building the model.

    Args:
        path: a directory written by `save_student` (or any open_clip directory with `open_clip_config.json` whose
            towers students support), a `.safetensors` file next to such a config, or a Lightning `.ckpt` from
            `distill train` (`hyper_parameters["student_cfg"]` + `student.`-prefixed `state_dict`).

    Raises:
        UsageError: no such path, no config, unreadable or unsafe weights (one line naming the file).
    """
    path = _existing(path)
    published = read_published_checkpoint(path)  # Apple / TinyCLIP / HF files: architecture inferred from them
    if published is not None:
        return SavedStudent(published[0], published[1], False, path)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        cfg, state = _read_checkpoint(path)
        return SavedStudent(cfg, normalize_state_dict(state), False, path)
    cfg, reparameterized = _read_config_json(_config_next_to(path))
    weights_path = find_weights(path) if path.is_dir() else path
    return SavedStudent(cfg, read_state_dict(weights_path), reparameterized, weights_path)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"no saved student at {path}: no such directory or file")
    return path
