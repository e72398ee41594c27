"""Build students: `create_student`, `build_student` and `load_student`.

`create_student` takes a registered name, `name.tag` or a saved-student path; `build_student` turns a config into
the right model class; `load_student` turns a saved student into its model.

The factory chooses the class, as open_clip's `create_model` does: a config with a `multimodal` (decoder) section
builds a `CoCaStudent`, any other a `CLIPStudent`. Weights are resolved and read before the (possibly large) model
is built, so a missing or unreadable file fails fast.

References:
    timm factory: https://github.com/huggingface/pytorch-image-models (timm/models/_factory.py)
    open_clip factory: https://github.com/mlfoundations/open_clip (src/open_clip/factory.py)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.hub
from huggingface_hub import hf_hub_download

from mcd_common import UsageError
from mcd_common.weights import WeightSpec
from students.coca import CoCaStudent
from students.config import StudentCfg
from students.hf_text import HFTextTower, load_pretrained_encoder
from students.io import load_student_weights, read_saved_student, read_state_dict, read_student_cfg
from students.registry import LOCAL_DIR_PREFIX, saved_student_path, variant_cfg
from students.towers import CLIPStudent

_logger = logging.getLogger(__name__)

__all__ = ["build_student", "create_student", "get_student_cfg", "load_student", "resolve_weights"]

_OFFLINE_HINT = (
    "Without network access, fetch the file elsewhere and pass it as weights=WeightSpec(file=PATH) "
    "(CLI: --student_weights PATH), or pass a saved student directory as --student local-dir:PATH."
)
_HUB_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def build_student(cfg: StudentCfg) -> CLIPStudent:
    """A randomly initialised student of `cfg`: a `CoCaStudent` when `cfg.multimodal` is set, else a `CLIPStudent`."""
    return CoCaStudent(cfg) if cfg.multimodal is not None else CLIPStudent(cfg)


def load_student(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> CLIPStudent:
    """Load a saved student in eval mode.

    Args:
        path: a directory written by `save_student` (or any open_clip directory with `open_clip_config.json` whose
            towers students support), a `.safetensors` file next to such a config, or a Lightning `.ckpt` from
            `distill train`; see `students.io.read_saved_student`.
        map_location: device for the returned model.

    Raises:
        UsageError: no such path, no config, unreadable weights or weights that do not fit the config.
    """
    saved = read_saved_student(path)
    student = build_student(saved.cfg)
    if saved.reparameterized:
        student.eval().reparameterize()
    load_student_weights(student, saved.state, source=str(saved.source))
    return student.to(map_location).eval()


def _download_hub(hf_hub: str) -> Path:
    parts = hf_hub.strip().split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(p for p in parts[2:] if p)
    errors = []
    for candidate in [filename] if filename else _HUB_DEFAULT_FILES:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=candidate))
        except Exception as e:  # noqa: BLE001 - hub failures come in many types; reported together below
            errors.append(f"{candidate}: {type(e).__name__}: {e}")
    raise RuntimeError(
        f"could not fetch student weights from the Hugging Face Hub ({hf_hub}): {'; '.join(errors)}. " + _OFFLINE_HINT
    )


def _download_url(url: str) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as e:  # noqa: BLE001 - network failures come in many types
            raise RuntimeError(f"could not download student weights from {url}: {e}. {_OFFLINE_HINT}") from e
    return target


def resolve_weights(spec: WeightSpec) -> Path:
    """Local path of the weights named by `spec` (downloading hub/url sources; offline that fails clearly).

    Raises:
        UsageError: an empty spec or a missing local file.
        RuntimeError: a hub or URL source that cannot be fetched (the message names the local-file option).
    """
    if spec.file:
        path = Path(spec.file).expanduser()
        if not path.exists():
            raise UsageError(f"--student_weights: no such file or directory: {path}")
        return path
    if spec.hf_hub:
        return _download_hub(spec.hf_hub)
    if spec.url:
        return _download_url(spec.url)
    raise UsageError("student WeightSpec is empty: set file, hf_hub or url")


def create_student(name: str, *, weights: WeightSpec | None = None, **overrides: object) -> CLIPStudent:
    """Build a student (randomly initialised unless weights are given).

    Args:
        name: registered name (`mobileclip_s0`), `name.tag` (pretrained weights of that tag), or a saved student
            (`local-dir:PATH`, or a path such as `./runs/x` / `runs/x/last.ckpt`: a directory, `.safetensors` or
            `.ckpt`, loaded as is).
        weights: explicit weights (beat a tag's weights). Without them, a Hugging Face text tower
            (`text.kind == "hf"`) starts from the pretrained encoder in its `hf_model_dir`.
        **overrides: config overrides (None values dropped), e.g. `image_size=64`, `context_length=32`,
            `embed_dim=256`, `text_layers=2`, `hf_model_dir=PATH`; see `StudentCfg.with_overrides`.

    Raises:
        UnknownNameError: unknown name or tag (close matches listed).
        UsageError: a saved-student path that does not exist, overrides for a saved student, unreadable weights
            or weights that do not fit.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    saved = saved_student_path(name)
    if saved is not None:
        if overrides or weights is not None:
            raise UsageError(
                f"student {name!r} is loaded as saved ({LOCAL_DIR_PREFIX}/path); drop overrides/weights ({overrides})"
            )
        return load_student(saved)
    cfg, tag_weights = variant_cfg(name)
    cfg = cfg.with_overrides(**overrides)
    weights = weights if weights is not None else tag_weights
    # NOTE: weights are resolved and read before the (possibly large) model is built, so a bad file fails fast
    state, path = None, None
    if weights is not None:
        path = resolve_weights(weights)
        state = read_state_dict(path, what="--student_weights")
    student = build_student(cfg)
    if state is not None:
        load_student_weights(student, state, source=str(path))
    elif isinstance(student.text, HFTextTower):
        load_pretrained_encoder(student.text)  # a new student starts from its pretrained Hugging Face encoder
    return student


def get_student_cfg(name: str, **overrides: object) -> StudentCfg:
    """The `StudentCfg` of a registered name or saved-student path, with overrides applied (no model is built)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    saved = saved_student_path(name)
    cfg = read_student_cfg(saved) if saved is not None else variant_cfg(name)[0]
    return cfg.with_overrides(**overrides)
