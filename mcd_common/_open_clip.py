"""The one adapter over open_clip's private functions (tower builders, checkpoint lookup, two private methods).

Students build their towers with open_clip's own builders so their state dicts are open_clip's, and `local-dir:`
teachers find their checkpoint the way open_clip does. Those functions are not open_clip's public API, so they are
called only here. `check_open_clip()` (run on import) compares their parameters with the ones this adapter was
written against (open_clip_torch 3.3.0, the pinned version) and fails with one message naming the function and
what changed, instead of an obscure `TypeError` deep inside a model build; `tests/mcd_common/test_open_clip.py`
also exercises every function on a tiny config. `students` and `teachers` may not import each other, so the
adapter lives in the leaf package both may import. `import mcd_common` does not import this module.

References:
    open_clip: https://github.com/mlfoundations/open_clip (src/open_clip/model.py, coca_model.py, factory.py,
    transformer.py), read at the 3.3.0 release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import open_clip
import torch
from open_clip import coca_model, factory
from open_clip import model as open_clip_model
from open_clip.coca_model import CoCa
from open_clip.transformer import MultimodalTransformer, TextTransformer, VisionTransformer
from torch import nn

__all__ = [
    "OpenClipAPIError",
    "build_text_decoder_tower",
    "build_text_tower",
    "build_vision_tower",
    "check_open_clip",
    "coca_encode_image",
    "find_checkpoint_in_dir",
    "padding_trimmable",
    "text_forward_without_padding",
    "vision_global_pool",
]

TESTED_VERSION = "3.3.0"
"""The open_clip_torch release these signatures were read from (setup.cfg pins it)."""


class OpenClipAPIError(ImportError):
    """The installed open_clip changed a private function this toolkit calls."""


def _private() -> dict[str, tuple[Callable[..., object], tuple[str, ...]]]:
    # name -> (the callable, the parameter names this adapter passes, in order)
    return {
        "open_clip.model._build_vision_tower": (
            open_clip_model._build_vision_tower,
            ("embed_dim", "vision_cfg", "quick_gelu", "cast_dtype"),
        ),
        "open_clip.model._build_text_tower": (
            open_clip_model._build_text_tower,
            ("embed_dim", "text_cfg", "quick_gelu", "cast_dtype"),
        ),
        "open_clip.coca_model._build_text_decoder_tower": (
            coca_model._build_text_decoder_tower,
            ("embed_dim", "multimodal_cfg", "quick_gelu", "cast_dtype"),
        ),
        "open_clip.factory._find_checkpoint_in_dir": (factory._find_checkpoint_in_dir, ("dir_path",)),
        "open_clip.coca_model.CoCa._encode_image": (CoCa._encode_image, ("self", "images", "normalize")),
        "open_clip.transformer.VisionTransformer._global_pool": (VisionTransformer._global_pool, ("self", "x")),
    }


def check_open_clip() -> None:
    """Raise `OpenClipAPIError` if a private open_clip function this adapter calls is missing or changed.

    Raises:
        OpenClipAPIError: one line naming the function, the parameters expected and found, and the fix.
    """
    try:
        table = _private()
    except AttributeError as err:
        raise OpenClipAPIError(
            f"open_clip_torch {open_clip.__version__} no longer has a private function mobileclip-distill calls "
            f"({err}); install open_clip_torch=={TESTED_VERSION} or update mcd_common/_open_clip.py"
        ) from None
    for name, (fn, expected) in table.items():
        found = tuple(inspect.signature(fn).parameters)
        if found != expected:
            raise OpenClipAPIError(
                f"open_clip_torch {open_clip.__version__} changed {name}: expected parameters {expected}, found "
                f"{found}; install open_clip_torch=={TESTED_VERSION} or update mcd_common/_open_clip.py"
            )


def build_vision_tower(embed_dim: int, vision_cfg: Mapping[str, object], quick_gelu: bool) -> nn.Module:
    """open_clip's image tower (`TimmModel` or `VisionTransformer`) from a `vision_cfg` dict."""
    return open_clip_model._build_vision_tower(embed_dim, dict(vision_cfg), quick_gelu=quick_gelu)


def build_text_tower(embed_dim: int, text_cfg: Mapping[str, object], quick_gelu: bool) -> nn.Module:
    """open_clip's `TextTransformer` from a `text_cfg` dict."""
    return open_clip_model._build_text_tower(embed_dim, dict(text_cfg), quick_gelu=quick_gelu)


def build_text_decoder_tower(
    vocab_size: int, multimodal_cfg: Mapping[str, object], quick_gelu: bool
) -> MultimodalTransformer:
    """open_clip's CoCa decoder; its output projection is `vocab_size` wide (open_clip passes it as `embed_dim`)."""
    return coca_model._build_text_decoder_tower(vocab_size, dict(multimodal_cfg), quick_gelu=quick_gelu)


def find_checkpoint_in_dir(directory: Path) -> Path | None:
    """The weight file open_clip's `local-dir:` loading would pick in `directory` (None when there is none)."""
    found = factory._find_checkpoint_in_dir(Path(directory))
    return Path(found) if found else None


def coca_encode_image(
    model: CoCa, images: torch.Tensor, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip `CoCa._encode_image`: the image latent `[B, D]` and the decoder's image tokens `[B, Q, D]`."""
    return model._encode_image(images, normalize=normalize)


def vision_global_pool(vit: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip `VisionTransformer._global_pool`: pooled features and the remaining tokens of `x` `[B, N, W]`."""
    return vit._global_pool(x)


def padding_trimmable(tower: nn.Module) -> bool:
    """Whether `text_forward_without_padding` gives `tower`'s own outputs: a plain causal open_clip `TextTransformer`.

    That is: causal mask, no pad mask, no appended CLS token (CoCa), pooling at the first or the EOT position,
    pooled output only, and neither a forward patched onto the instance (the L0 pruner's masked forward) nor a
    compiled one (`Module.compile()`, which a second entry point would bypass).
    """
    return (
        isinstance(tower, TextTransformer)
        and tower.attn_mask is not None
        and tower.cls_emb is None
        and not tower.use_pad_mask
        and tower.pool_type in ("argmax", "eos", "first")
        and not tower.output_tokens
        and "forward" not in tower.__dict__
        and getattr(tower, "_compiled_call_impl", None) is None
    )


def text_forward_without_padding(tower: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """`tower(tokens)` without the columns that are padding in every row (for towers where `padding_trimmable`).

    Under the causal mask no position attends to a later one, and the pooled position (EOT, or the first) comes
    before a row's padding, so the pooled features equal the full-length forward's (to float rounding) while the
    cost follows the longest caption of the batch, not the context length. open_clip's `_embeds` slices the
    positional embedding to the input's length but hands its full-size causal mask on unless a pad mask is used, so
    the mask is sliced for the duration of the call; the tower itself runs (its hooks too).
    """
    used = (tokens != tower.pad_id).any(dim=0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 1
    if keep >= tokens.shape[1]:
        return tower(tokens)
    full_mask = tower.attn_mask
    tower.attn_mask = full_mask[:keep, :keep]  # a registered (non-persistent) buffer: restored below
    try:
        return tower(tokens[:, :keep])
    finally:
        tower.attn_mask = full_mask


check_open_clip()
