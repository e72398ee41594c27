"""Build an open_clip model (CLIP, CustomTextCLIP or CoCa) from a config, never silently with random weights.

Weights are resolved before the model is built (``WeightSpec.file > hf_hub > url``, then the pretrained tag or file,
or a ``local-dir:`` directory's own checkpoint), then read by `load_checkpoint` through ``mcd_common.weights``
(safetensors, or ``torch.load(weights_only=True)`` with no fallback) and loaded with ``strict=True`` after the key
conversions ``open_clip.load_checkpoint`` applies. open_clip's own ``load_checkpoint`` is not used: it retries
``torch.load`` without ``weights_only`` on a ``TypeError``, so with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` a crafted
file could run code. Downloads go through ``open_clip.pretrained.download_pretrained`` (Hugging Face cache first),
so cached checkpoints keep working offline; anything that cannot be fetched raises a ``RuntimeError`` naming the
local-file option. Ref: mlfoundations/open_clip ``src/open_clip/factory.py`` (``load_checkpoint``), ``pretrained.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.convert import convert_state_dict, load_big_vision_weights
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from open_clip.pretrained import download_pretrained
from open_clip.transformer import MultimodalTransformer
from torch import nn

from mcd_common import UnknownNameError, UsageError
from mcd_common._open_clip import find_checkpoint_in_dir
from mcd_common.weights import WeightSpec, read_state_dict_file, state_dict_mismatch

from .local_dir import read_local_dir_config
from .preprocess import Preprocess, checkpoint_preprocess, interpolation_mode
from .registry import LOCAL_DIR_PREFIX
from .teacher import TextTokenizer

_logger = logging.getLogger(__name__)

__all__ = ["LoadedOpenClip", "add_tiny_model_configs", "load_checkpoint", "load_open_clip", "logit_scale_of"]

CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS_ADDED = False
_BIG_VISION_SUFFIXES = (".npz", ".npy")


def add_tiny_model_configs() -> None:
    """Register the tiny test architectures shipped in ``teachers/configs/`` with open_clip (idempotent)."""
    global _CONFIGS_ADDED
    if not _CONFIGS_ADDED:
        open_clip.add_model_config(CONFIG_DIR)
        _CONFIGS_ADDED = True


@dataclass
class LoadedOpenClip:
    """An open_clip model plus what the wrappers need to feed it."""

    model: nn.Module
    tokenizer: TextTokenizer
    model_cfg: dict[str, object]
    preprocess: Preprocess
    """The checkpoint's preprocessing (pretrained tag > directory's ``preprocess_cfg`` > architecture defaults)."""
    checkpoint: Path | None
    """The file the weights were read from (``None`` only for ``allow_random`` models)."""


@dataclass(frozen=True)
class _Source:
    """What to build and where its weights are."""

    model_name: str
    """The name ``open_clip.create_model`` builds (an architecture or ``local-dir:PATH``)."""
    model_cfg: dict[str, object]
    checkpoint: Path | None
    tag_cfg: dict[str, object] = field(default_factory=dict)
    """The pretrained tag's config (preprocessing, ``quick_gelu``); empty without a tag."""
    dir_preprocess: dict[str, object] = field(default_factory=dict)
    """A ``local-dir:`` directory's ``preprocess_cfg``."""


def _offline_error(kind: str, name: str, source: str, err: Exception, flag: str) -> RuntimeError:
    return RuntimeError(
        f"{kind} {name!r}: could not fetch weights from {source} ({type(err).__name__}: {err}). Without a network, "
        f"pass a local checkpoint instead: {flag} PATH (an open_clip state dict, .safetensors or .pt), or use "
        f"{kind} 'local-dir:PATH' (a directory holding open_clip_config.json and the weights)."
    )


def _hub_location(hf_hub: str) -> str:
    # open_clip's convention: "org/repo/" (default file) or "org/repo/filename"; a bare "org/repo" means the repo.
    return hf_hub if hf_hub.count("/") >= 2 else hf_hub.rstrip("/") + "/"


def _download(kind: str, name: str, spec: dict[str, str], flag: str) -> Path:
    source = spec.get("hf_hub") and f"hf-hub:{spec['hf_hub']}" or spec.get("url") or str(spec)
    try:
        path = download_pretrained(spec)
    except Exception as err:  # hub/network errors come in many types (OSError, HfHubHTTPError, RuntimeError, ...)
        raise _offline_error(kind, name, source, err, flag) from err
    if not path:
        raise _offline_error(kind, name, source, FileNotFoundError("nothing downloaded"), flag)
    return Path(path)


def _weights_file(kind: str, name: str, file: str, flag: str) -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        raise UsageError(f"{kind} {name!r}: {flag} {path}: no such file")
    return path


def _builtin_source(
    *, kind: str, name: str, arch: str, pretrained: str | None, weights: WeightSpec, flag: str
) -> _Source:
    """A built-in/registered open_clip architecture and its checkpoint (explicit weights > tag > file)."""
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise UnknownNameError(f"{kind} {name!r}: unknown open_clip architecture {arch!r} (close matches: {close})")
    if weights.file:
        return _Source(arch, model_cfg, _weights_file(kind, name, weights.file, flag))
    if weights.hf_hub:
        return _Source(arch, model_cfg, _download(kind, name, {"hf_hub": _hub_location(weights.hf_hub)}, flag))
    if weights.url:
        return _Source(arch, model_cfg, _download(kind, name, {"url": weights.url}, flag))
    if not pretrained:
        return _Source(arch, model_cfg, None)
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return _Source(arch, model_cfg, _download(kind, name, tag_cfg, flag), tag_cfg=dict(tag_cfg))
    if Path(pretrained).expanduser().is_file():
        return _Source(arch, model_cfg, Path(pretrained).expanduser())
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise UsageError(
        f"{kind} {name!r}: {pretrained!r} is neither a pretrained tag of {arch!r} nor an existing file "
        f"(tags: {tags or 'none'})"
    )


def _local_dir_source(*, kind: str, name: str, arch: str, weights: WeightSpec, flag: str) -> _Source:
    """A ``local-dir:PATH`` open_clip directory: its config, its preprocessing and its checkpoint."""
    path = Path(arch[len(LOCAL_DIR_PREFIX) :]).expanduser()
    config = read_local_dir_config(path, kind=kind, name=name)
    checkpoint = _weights_file(kind, name, weights.file, flag) if weights.file else find_checkpoint_in_dir(path)
    return _Source(
        LOCAL_DIR_PREFIX + str(path),
        config["model_cfg"],
        checkpoint,
        dir_preprocess=dict(config.get("preprocess_cfg") or {}),
    )


def _init_uninitialised(model: nn.Module) -> None:
    # NOTE: open_clip 3.3.0's CoCa never initialises the decoder's text_projection (its init_parameters() is never
    # called and would fail on a missing attribute), so it stays torch.empty: arbitrary memory, nondeterministic,
    # possibly NaN or denormal (very slow on CPU). Harmless when a checkpoint overwrites it; for random test
    # models use the std open_clip's init_parameters intends.
    for module in model.modules():
        if isinstance(module, MultimodalTransformer) and module.text_projection is not None:
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


def _build(
    source: _Source, *, kind: str, name: str, arch: str, image_size: int | None, context_length: int | None
) -> nn.Module:
    """``open_clip.create_model`` without weights (random init seeded, so test models are reproducible)."""
    # NOTE: a tag trained with QuickGELU on a GELU config is a silent accuracy bug in open_clip (it only warns);
    # building the activation the checkpoint was trained with is always right.
    quick_gelu = bool(source.tag_cfg.get("quick_gelu", False)) and not source.model_cfg.get("quick_gelu", False)
    try:
        # Random (test-only) weights are a fixed function of the architecture: every create_teacher("test_tiny")
        # builds the same model, so embeddings written by one process can be checked by another.
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(0)
            model = open_clip.create_model(
                source.model_name,
                load_weights=False,
                force_quick_gelu=quick_gelu,
                force_image_size=image_size,
                force_context_length=context_length,
                pretrained_image=False,
                pretrained_text=False,  # never fetch tower base weights: a full checkpoint is loaded right after
            )
            if source.checkpoint is None:
                _init_uninitialised(model)
    except TypeError as err:
        raise UsageError(
            f"{kind} {name!r}: open_clip cannot build {arch!r} ({err}); models with the MobileCLIP-S0 MCt text tower "
            "are not open_clip models (open_clip#958): a student directory loads through the students backend that "
            "`import distill` registers (teachers.local_dir; the distill command always has it)"
        ) from None
    return model


def _to_open_clip_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key conversions of ``open_clip.load_checkpoint`` (3.3.0), applied to a state dict we read ourselves."""
    if state and next(iter(state)).startswith("module"):  # DDP prefix, stripped as open_clip does
        state = {k[7:]: v for k, v in state.items()}
    state = convert_state_dict(model, state)  # third-party layouts (e.g. timm/big_vision exports)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # flat CLIP text keys -> CustomTextCLIP's text.*
    for key in ("logit_scale", "logit_bias"):  # scalar vs [1] parameters
        own = getattr(model, key, None)
        if key in state and isinstance(own, torch.Tensor) and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)  # HF text towers after transformers 4.31
    try:
        resize_pos_embed(state, model)  # another image size (force_image_size) resamples the patch grid
        resize_text_pos_embed(state, model)
    except (AssertionError, RuntimeError, ValueError):
        # NOTE: open_clip asserts on a width change: that is another architecture, which the caller's
        # state_dict_mismatch check reports key by key, so the embeddings are left as read.
        pass
    return state


def load_checkpoint(model: nn.Module, path: Path, *, what: str) -> None:
    """Load an open_clip checkpoint file into ``model`` (strict), never unpickling.

    Args:
        model: The open_clip model.
        path: A safetensors or torch state dict (or training checkpoint holding one), or big_vision ``.npz``.
        what: What the file is, for messages (``"--teacher_weights"``, ``"captioner 'x' checkpoint"``).

    Raises:
        UsageError: unreadable, unsafe or wrong-architecture file (one line naming it and what differs).
    """
    if path.suffix in _BIG_VISION_SUFFIXES:
        # NOTE: numpy archives are read with np.load's default allow_pickle=False, so they cannot run code either.
        try:
            load_big_vision_weights(model, str(path))
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{what} {path}: not a readable big_vision checkpoint ({err})") from None
        return
    state = _to_open_clip_keys(model, read_state_dict_file(path, what=what))
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise UsageError(f"{what} {path} does not fit the open_clip model: {mismatch}")
    model.load_state_dict(state, strict=True)


def _checkpoint_preprocess(model: nn.Module, source: _Source) -> Preprocess:
    """The checkpoint's preprocessing: pretrained tag > directory's ``preprocess_cfg`` > architecture defaults."""
    pp = dict(open_clip.get_model_preprocess_cfg(model))
    keys = ("mean", "std", "interpolation")
    pp.update({k: source.dir_preprocess[k] for k in keys if k in source.dir_preprocess})
    pp.update({k: source.tag_cfg[k] for k in keys if k in source.tag_cfg})
    return checkpoint_preprocess(pp["size"], pp["mean"], pp["std"], interpolation_mode(pp.get("interpolation")))


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
        flag: The CLI option that passes a local weights file, named in messages.

    Raises:
        UsageError: Missing, unreadable or wrong-architecture weights; no weights at all and ``allow_random``
            False; an unknown architecture.
        RuntimeError: Weights cannot be fetched (offline); names the local-file option.
    """
    add_tiny_model_configs()
    if arch.startswith(LOCAL_DIR_PREFIX):
        source = _local_dir_source(kind=kind, name=name, arch=arch, weights=weights, flag=flag)
    else:
        source = _builtin_source(kind=kind, name=name, arch=arch, pretrained=pretrained, weights=weights, flag=flag)
    if source.checkpoint is None and not allow_random:
        raise UsageError(
            f"{kind} {name!r}: no weights for {arch!r} (no pretrained tag, no weights file); refusing to use random "
            f"weights. Pass {flag} PATH or a pretrained tag."
        )
    model = _build(source, kind=kind, name=name, arch=arch, image_size=image_size, context_length=context_length)
    if source.checkpoint is not None:
        what = flag if weights.file else f"{kind} {name!r} checkpoint"
        load_checkpoint(model, source.checkpoint, what=what)
        _logger.info("%s %s: loaded weights from %s", kind, name, source.checkpoint)
    else:
        _logger.warning("%s %s: random weights (allow_random, test model)", kind, name)
    model.eval().requires_grad_(False)
    try:
        tokenizer = _tokenizer(source.model_name, context_length)
    except Exception as err:  # HF tokenizers (SigLIP) are fetched from the hub on first use
        raise RuntimeError(
            f"{kind} {name!r}: could not load the tokenizer of {arch!r} ({type(err).__name__}: {err}). Without a "
            "network, use a local-dir:PATH directory that holds the tokenizer files, or a cached Hugging Face hub."
        ) from err
    return LoadedOpenClip(model, tokenizer, source.model_cfg, _checkpoint_preprocess(model, source), source.checkpoint)


@functools.lru_cache(maxsize=16)
def _tokenizer(model_name: str, context_length: int | None) -> TextTokenizer:
    # Building open_clip's SimpleTokenizer parses 49k BPE merges (~0.3 s); tokenizers are stateless apart from a
    # memo cache, so teachers of the same architecture share one.
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def logit_scale_of(model: nn.Module) -> float:
    """The checkpoint's learned temperature ``exp(logit_scale)`` as a float."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise AttributeError("model has no logit_scale")
    return float(torch.as_tensor(scale).detach().float().exp().reshape(-1)[0])
