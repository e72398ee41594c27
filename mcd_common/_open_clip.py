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


MIN_BUCKET_ROWS = 64
"""Rows per length bucket of `text_forward_without_padding`: below this a bucket's smaller matmuls cost more than
the padding they skip."""
MAX_BUCKETS = 4


def _bucket_plan(lengths: list[int]) -> list[tuple[int, int]]:
    """`(end, length)` bounds of the length buckets of rows sorted by length (ascending): equal-row buckets of at
    least `MIN_BUCKET_ROWS`, the count (1..`MAX_BUCKETS`) that computes the fewest token positions."""
    n = len(lengths)
    best: list[tuple[int, int]] = [(n, lengths[-1])]
    best_cost = n * lengths[-1]
    for count in range(2, min(MAX_BUCKETS, n // MIN_BUCKET_ROWS) + 1):
        ends = [round(n * (i + 1) / count) for i in range(count)]
        plan = [(end, lengths[end - 1]) for end in ends]
        cost = sum((end - start) * length for (end, length), start in zip(plan, [0, *ends[:-1]], strict=True))
        # NOTE: one bucket more must save >= 10 % of the positions: each costs another pass of per-call overheads.
        if cost < 0.9 * best_cost:
            best, best_cost = plan, cost
    return best


def _sharded(tower: nn.Module) -> bool:
    """Whether FSDP shards `tower`'s parameters: there every tower pass gathers them, so one pass is cheaper."""
    return any("FullyShard" in type(m).__name__ or "FSDP" in type(m).__name__ for m in tower.modules())


def _forward_trimmed(tower: TextTransformer, tokens: torch.Tensor, keep: int) -> torch.Tensor:
    if keep >= tokens.shape[1]:
        return tower(tokens)
    full_mask = tower.attn_mask
    tower.attn_mask = full_mask[:keep, :keep]  # a registered (non-persistent) buffer: restored below
    try:
        return tower(tokens[:, :keep])
    finally:
        tower.attn_mask = full_mask


def text_forward_without_padding(tower: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """`tower(tokens)` without computing padding (for towers where `padding_trimmable`).

    Under the causal mask no position attends to a later one, and the pooled position (EOT, or the first) comes
    before a row's padding, so a row's pooled features depend neither on the padding after it nor on the other rows
    (layer norms are per token): the output equals the full-length forward's to float rounding. A batch of at least
    `2 * MIN_BUCKET_ROWS` rows is grouped by caption length into up to `MAX_BUCKETS` buckets (`_bucket_plan`), each
    run cut at its longest caption, and the rows are put back in order; a smaller batch runs once, cut at its
    longest. So the cost follows the captions' lengths, not the context length nor the batch's longest caption.
    open_clip's `_embeds` slices the positional embedding to the input's length but hands its full-size causal mask
    on unless a pad mask is used, so the mask is sliced for the duration of each call; the tower itself runs (its
    hooks too, once per bucket).
    """
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    lengths = ((tokens != tower.pad_id) * positions).amax(dim=1).clamp(min=1)  # last non-pad position + 1
    if tokens.shape[0] < 2 * MIN_BUCKET_ROWS or _sharded(tower):
        return _forward_trimmed(tower, tokens, int(lengths.max()))
    order = torch.argsort(lengths, stable=True)
    plan = _bucket_plan(lengths[order].tolist())
    if len(plan) == 1:
        return _forward_trimmed(tower, tokens, plan[0][1])
    parts, start = [], 0
    for end, keep in plan:
        parts.append(_forward_trimmed(tower, tokens[order[start:end]], keep))
        start = end
    return torch.cat(parts)[torch.argsort(order)]


check_open_clip()
