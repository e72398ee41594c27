"""Save and load students in open_clip's directory layout (`open_clip_config.json` + `open_clip_model.safetensors`).

`save_student` writes a directory that `open_clip.create_model("local-dir:" + out_dir)` loads directly (every student
except those with the MCt text tower; CoCa students load as open_clip `CoCa`), plus a `distill` section holding the
full `StudentCfg`. `load_student` reads
such a directory, a bare safetensors file next to its config, a plain open_clip directory (config converted with
`StudentCfg.from_open_clip`), or a Lightning `.ckpt` written by `distill train`.

MCt students: open_clip has no MCt text tower (open_clip#958), so their `text_cfg` carries the key
`students.towers.MCT_OPEN_CLIP_MARKER`; open_clip then fails with
`CLIPTextCfg.__init__() got an unexpected keyword argument 'mct_text_tower_is_not_in_open_clip_load_with_students_...'`.
Load those with `students.load_student(path)`.

Nothing here unpickles untrusted data: safetensors, JSON, or `torch.load(weights_only=True)`.

References:
    open_clip local-dir / hf-hub layout: https://github.com/mlfoundations/open_clip (src/open_clip/factory.py)
    safetensors: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from students.published import adapt_state_dict, read_published_checkpoint
from students.towers import CLIPStudent, StudentCfg

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "save_student",
    "load_student",
    "read_student_cfg",
    "read_state_dict",
    "normalize_state_dict",
    "load_student_weights",
]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# open_clip's own preference order for weights inside a directory (factory._find_checkpoint_in_dir)
_WEIGHT_NAMES = (
    WEIGHTS_NAME,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes
def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = _tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# saving
def save_student(student: CLIPStudent, out_dir: str | os.PathLike) -> Path:
    """Write `student` as an open_clip directory; returns the directory.

    Files: `open_clip_config.json` (`{"model_cfg", "preprocess_cfg", "distill": {"student_cfg", "format",
    "reparameterized"}}`) and `open_clip_model.safetensors`. Both are written atomically, weights first, so a
    config on disk always has its weights next to it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = student.cfg
    # NOTE: clone so safetensors never sees views sharing storage (it refuses them), and tensors are on the CPU.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in student.state_dict().items()}
    reparameterized = any("reparam_conv" in k for k in tensors)
    config = {
        "model_cfg": cfg.open_clip_model_cfg(),
        "preprocess_cfg": cfg.open_clip_preprocess_cfg(),
        "distill": {"student_cfg": cfg.to_dict(), "format": FORMAT_VERSION, "reparameterized": reparameterized},
    }
    _atomic_save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "student": cfg.name})
    _atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if cfg.text.kind == "mct":
        _logger.info("saved MCt student to %s: load it with students.load_student (open_clip cannot)", out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# reading
def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (`weights_only=True`), normalised to open_clip keys.

    Handles Lightning checkpoints (`state_dict` with `student.` prefixes), DDP `module.` prefixes and the flat
    open_clip `CLIP` text layout (converted to `CustomTextCLIP` `text.*` keys).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    return normalize_state_dict(state)


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a CLIP state dict to `CustomTextCLIP` keys: strip `student.`/`module.`, move flat text keys to `text.*`."""
    state = _strip_prefix(state, "student.")
    state = _strip_prefix(state, "module.")
    if "text_projection" in state and "positional_embedding" in state:
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    return state


def _find_weights(directory: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) + sorted(
        p for s in _TORCH_SUFFIXES for p in directory.glob("*" + s)
    )
    if not found:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pt, *.pth) in {directory}")
    return found[0]


def _cfg_from_config_json(config_path: Path) -> tuple[StudentCfg, bool]:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    distill = config.get("distill") or {}
    if "student_cfg" in distill:
        fmt = distill.get("format", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise ValueError(f"{config_path} has student format {fmt}; this version reads up to {FORMAT_VERSION}")
        return StudentCfg.from_dict(distill["student_cfg"]), bool(distill.get("reparameterized", False))
    if "model_cfg" not in config:
        raise ValueError(f"{config_path} has neither a 'distill.student_cfg' nor a 'model_cfg' section")
    name = config_path.parent.name or "open_clip"
    return StudentCfg.from_open_clip(config["model_cfg"], config.get("preprocess_cfg"), name=name), False


def _ckpt_cfg(ckpt: dict[str, Any], path: Path) -> tuple[StudentCfg, bool]:
    hparams = ckpt.get("hyper_parameters") or {}
    cfg = hparams.get("student_cfg")
    if cfg is None:
        raise ValueError(f"{path}: checkpoint has no hyper_parameters['student_cfg'] (not written by distill train?)")
    if isinstance(cfg, StudentCfg):
        return cfg, False
    return StudentCfg.from_dict(cfg), False


def read_student_cfg(path: str | os.PathLike) -> StudentCfg:
    """The `StudentCfg` of a saved student (directory, safetensors next to its config, or `.ckpt`), without weights."""
    path = Path(path)
    if path.is_dir():
        return _cfg_from_config_json(path / CONFIG_NAME)[0]
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _ckpt_cfg(torch.load(path, map_location="cpu", weights_only=True), path)[0]
    return _cfg_from_config_json(path.parent / CONFIG_NAME)[0]


def load_student_weights(student: CLIPStudent, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Load `state` into `student` strictly, with an error that lists what does not match.

    If the state dict holds folded (`reparam_conv`) weights and the student does not, the student is
    re-parameterised first. Published layouts (Apple MobileCLIP, TinyCLIP, Hugging Face CLIP) are converted first
    (`students.published.adapt_state_dict`).
    """
    state = adapt_state_dict(student, state, source=source)
    if any("reparam_conv" in k for k in state) and not student.is_reparameterized:
        student.eval().reparameterize()
    own = student.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs student {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if "logit_scale" in state and "logit_scale" in own and state["logit_scale"].ndim != own["logit_scale"].ndim:
        state = dict(state, logit_scale=state["logit_scale"].reshape(own["logit_scale"].shape))
        mismatched = [m for m in mismatched if not m.startswith("logit_scale:")]
    if missing or unexpected or mismatched:

        def _few(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [
            f"missing: {_few(missing)}" if missing else "",
            f"unexpected: {_few(unexpected)}" if unexpected else "",
        ]
        parts.append(f"shape mismatch: {_few(mismatched)}" if mismatched else "")
        raise ValueError(
            f"weights from {source} do not fit student {student.cfg.name!r}: " + "; ".join(p for p in parts if p)
        )
    student.load_state_dict(state, strict=True)


def load_student(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> CLIPStudent:
    """Load a saved student in eval mode.

    Args:
        path: a directory written by `save_student` (or any open_clip directory with `open_clip_config.json` whose
            towers students support), a `.safetensors` file next to such a config, or a Lightning `.ckpt` from
            `distill train` (`hyper_parameters["student_cfg"]` + `student.`-prefixed `state_dict`).
        map_location: device for the returned model.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no saved student at {path}")
    published = read_published_checkpoint(path)  # Apple / TinyCLIP / HF files: architecture inferred from them
    if published is not None:
        (cfg, state), reparameterized, weights_path = published, False, path
    elif path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a saved student / open_clip directory")
        cfg, reparameterized = _cfg_from_config_json(config_path)
        weights_path = _find_weights(path)
        state = read_state_dict(weights_path)
    elif path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a checkpoint dict")
        cfg, reparameterized = _ckpt_cfg(ckpt, path)
        if not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError(f"{path}: checkpoint has no 'state_dict'")
        state = normalize_state_dict(ckpt["state_dict"])
        weights_path = path
    else:
        config_path = path.parent / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} next to it, so the architecture is unknown")
        cfg, reparameterized = _cfg_from_config_json(config_path)
        state = read_state_dict(path)
        weights_path = path
    student = CLIPStudent(cfg)
    if reparameterized:
        student.eval().reparameterize()
    load_student_weights(student, state, source=str(weights_path))
    return student.to(map_location).eval()
