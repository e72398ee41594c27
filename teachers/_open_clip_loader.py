"""Build an open_clip model (CLIP, CustomTextCLIP or CoCa) from a config, never silently with random weights.

Weights are resolved before the model is built (``WeightSpec.file > hf_hub > url``, then the pretrained tag or file),
then loaded with ``open_clip.load_checkpoint(strict=True)``, which reads safetensors or
``torch.load(weights_only=True)``. Downloads go through ``open_clip.pretrained.download_pretrained`` (Hugging Face
cache first), so cached checkpoints keep working offline; anything that cannot be fetched raises a ``RuntimeError``
naming the local-file option. Ref: mlfoundations/open_clip ``src/open_clip/factory.py``, ``pretrained.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._registry import LOCAL_DIR_PREFIX, WeightSpec

_logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS_ADDED = False


def add_tiny_model_configs() -> None:
    """Register the tiny test architectures shipped in ``teachers/configs/`` with open_clip (idempotent)."""
    global _CONFIGS_ADDED
    if not _CONFIGS_ADDED:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _CONFIGS_ADDED = True


@dataclass
class LoadedOpenClip:
    """An open_clip model plus what the wrappers need to feed it."""

    model: nn.Module
    tokenizer: Any
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any]
    """Merged preprocessing: ``size``, ``mean``, ``std``, ``interpolation`` (pretrained tag > directory > defaults)."""
    checkpoint: str | None
    """The file the weights were read from (``None`` only for ``allow_random`` models)."""


def _offline_error(kind: str, name: str, source: str, err: Exception, flag: str) -> RuntimeError:
    return RuntimeError(
        f"{kind} {name!r}: could not fetch weights from {source} ({type(err).__name__}: {err}). Without a network, "
        f"pass a local checkpoint instead: {flag} PATH (an open_clip state dict, .safetensors or .pt), or use "
        f"{kind} 'local-dir:PATH' (a directory holding open_clip_config.json and the weights)."
    )


def _hub_location(hf_hub: str) -> str:
    # open_clip's convention: "org/repo/" (default file) or "org/repo/filename"; a bare "org/repo" means the repo.
    return hf_hub if hf_hub.count("/") >= 2 else hf_hub.rstrip("/") + "/"


def _download(kind: str, name: str, spec: dict[str, str], flag: str) -> str:
    from open_clip.pretrained import download_pretrained

    source = spec.get("hf_hub") and f"hf-hub:{spec['hf_hub']}" or spec.get("url") or str(spec)
    try:
        path = download_pretrained(spec)
    except Exception as err:  # hub/network errors come in many types (OSError, HfHubHTTPError, RuntimeError, ...)
        raise _offline_error(kind, name, source, err, flag) from err
    if not path:
        raise _offline_error(kind, name, source, FileNotFoundError("nothing downloaded"), flag)
    return path


def _resolve_checkpoint(
    *, kind: str, name: str, arch: str, pretrained: str | None, weights: WeightSpec, flag: str
) -> tuple[str | None, dict[str, Any]]:
    """Return ``(checkpoint file or None, pretrained-tag cfg or {})`` for a built-in open_clip architecture."""
    import open_clip

    if weights.file:
        if not os.path.isfile(weights.file):
            raise FileNotFoundError(f"{kind} {name!r}: weights file not found: {weights.file}")
        return weights.file, {}
    if weights.hf_hub:
        return _download(kind, name, {"hf_hub": _hub_location(weights.hf_hub)}, flag), {}
    if weights.url:
        return _download(kind, name, {"url": weights.url}, flag), {}
    if not pretrained:
        return None, {}
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return _download(kind, name, tag_cfg, flag), tag_cfg
    if os.path.isfile(pretrained):
        return pretrained, {}
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ValueError(
        f"{kind} {name!r}: {pretrained!r} is neither a pretrained tag of {arch!r} nor an existing file "
        f"(tags: {tags or 'none'})"
    )


def _read_local_dir(kind: str, name: str, arch: str) -> tuple[Path, dict[str, Any]]:
    path = Path(arch[len(LOCAL_DIR_PREFIX) :]).expanduser()
    config_path = path / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{kind} {name!r}: {config_path} not found; local-dir:PATH must name an open_clip directory "
            "(open_clip_config.json with 'model_cfg' + weights), e.g. a student saved by this toolkit"
        )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if "model_cfg" not in config:
        raise ValueError(f"{kind} {name!r}: {config_path} has no 'model_cfg'")
    return path, config


def _find_dir_checkpoint(path: Path) -> str | None:
    from open_clip.factory import _find_checkpoint_in_dir

    return _find_checkpoint_in_dir(path)


def _init_uninitialised(model: nn.Module) -> None:
    # NOTE: open_clip 3.3.0's CoCa never initialises the decoder's text_projection (its init_parameters() is never
    # called and would fail on a missing attribute), so it stays torch.empty: arbitrary memory, nondeterministic,
    # possibly NaN or denormal (very slow on CPU). Harmless when a checkpoint overwrites it; for random test
    # models use the std open_clip's init_parameters intends.
    for module in model.modules():
        if type(module).__name__ == "MultimodalTransformer" and module.text_projection is not None:
            nn.init.normal_(module.text_projection, std=module.width**-0.5)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    # open_clip warns on the root logger that the model is random because we build with load_weights=False and
    # load the checkpoint ourselves right after; that warning would be false, so drop it while building.
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def load_open_clip(
    *,
    kind: str,
    name: str,
    arch: str,
    pretrained: str | None,
    weights: WeightSpec,
    allow_random: bool,
    image_size: int | None = None,
    context_length: int | None = None,
    flag: str = "--teacher_weights",
) -> LoadedOpenClip:
    """Build an open_clip model with resolved weights, frozen and in eval mode.

    Args:
        kind: ``"teacher"`` or ``"captioner"`` (for messages).
        name: Registry name or spec (for messages).
        arch: Built-in/registered open_clip architecture, or ``local-dir:PATH``.
        pretrained: open_clip pretrained tag or file (ignored for ``local-dir:``).
        weights: Explicit weights; take precedence over ``pretrained`` and the directory's checkpoint.
        allow_random: Permit random init when no weights are given (tiny test models only).
        image_size: Force the vision tower's input size (position embeddings are resized on load).
        context_length: Force the text context length.
        flag: The CLI option that passes a local weights file, named in offline errors.

    Raises:
        RuntimeError: Weights cannot be fetched, or no weights at all and ``allow_random`` is False.
    """
    import open_clip

    add_tiny_model_configs()
    tag_cfg: dict[str, Any] = {}
    dir_preprocess: dict[str, Any] = {}
    if arch.startswith(LOCAL_DIR_PREFIX):
        path, config = _read_local_dir(kind, name, arch)
        model_cfg = config["model_cfg"]
        dir_preprocess = config.get("preprocess_cfg", {})
        if weights.file:
            if not os.path.isfile(weights.file):
                raise FileNotFoundError(f"{kind} {name!r}: weights file not found: {weights.file}")
            checkpoint = weights.file
        else:
            checkpoint = _find_dir_checkpoint(path)
        model_name = LOCAL_DIR_PREFIX + str(path)
    else:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
            raise KeyError(f"{kind} {name!r}: unknown open_clip architecture {arch!r} (close matches: {close})")
        checkpoint, tag_cfg = _resolve_checkpoint(
            kind=kind, name=name, arch=arch, pretrained=pretrained, weights=weights, flag=flag
        )
        model_name = arch
    if checkpoint is None and not allow_random:
        raise RuntimeError(
            f"{kind} {name!r}: no weights for {arch!r} (no pretrained tag, no weights file); refusing to use random "
            f"weights. Pass {flag} PATH or a pretrained tag."
        )

    # NOTE: a tag trained with QuickGELU on a GELU config is a silent accuracy bug in open_clip (it only warns);
    # building the activation the checkpoint was trained with is always right.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
    try:
        # Random (test-only) weights are a fixed function of the architecture: every create_teacher("test_tiny")
        # builds the same model, so embeddings written by one process can be checked by another.
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(0)
            model = open_clip.create_model(
                model_name,
                load_weights=False,
                force_quick_gelu=quick_gelu,
                force_image_size=image_size,
                force_context_length=context_length,
                pretrained_image=False,
                pretrained_text=False,  # never fetch tower base weights: a full checkpoint is loaded right after
            )
            if checkpoint is None:
                _init_uninitialised(model)
    except TypeError as err:
        raise ValueError(
            f"{kind} {name!r}: open_clip cannot build {arch!r} ({err}); models with the MobileCLIP-S0 MCt text tower "
            "are not open_clip models (open_clip#958)"
        ) from err
    if checkpoint is not None:
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
        _logger.info("%s %s: loaded weights from %s", kind, name, checkpoint)
    else:
        _logger.warning("%s %s: random weights (allow_random, test model)", kind, name)
    model.eval().requires_grad_(False)

    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess.update({k: dir_preprocess[k] for k in ("mean", "std", "interpolation") if k in dir_preprocess})
    preprocess.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation") if k in tag_cfg})
    try:
        tokenizer = _tokenizer(model_name, context_length)
    except Exception as err:  # HF tokenizers (SigLIP) are fetched from the hub on first use
        raise RuntimeError(
            f"{kind} {name!r}: could not load the tokenizer of {arch!r} ({type(err).__name__}: {err}). Without a "
            "network, use a local-dir:PATH directory that holds the tokenizer files, or a cached Hugging Face hub."
        ) from err
    return LoadedOpenClip(model, tokenizer, model_cfg, preprocess, checkpoint)


@functools.lru_cache(maxsize=16)
def _tokenizer(model_name: str, context_length: int | None) -> Any:
    # Building open_clip's SimpleTokenizer parses 49k BPE merges (~0.3 s); tokenizers are stateless apart from a
    # memo cache, so teachers of the same architecture share one.
    import open_clip

    return open_clip.get_tokenizer(model_name, context_length=context_length)


def logit_scale_of(model: nn.Module) -> float:
    """The checkpoint's learned temperature ``exp(logit_scale)`` as a float."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise AttributeError("model has no logit_scale")
    return float(torch.as_tensor(scale).detach().float().exp().reshape(-1)[0])


def square_size(size: Any) -> int:
    """An open_clip ``image_size`` (int or ``(h, w)``) as an int, refusing non-square sizes."""
    if isinstance(size, int):
        return size
    h, w = (int(s) for s in size)
    if h != w:
        raise ValueError(f"non-square image size {size} is not supported")
    return h
