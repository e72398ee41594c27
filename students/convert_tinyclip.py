"""TinyCLIP's released checkpoints (its open_clip fork's `CLIPBase` layout) -> student (open_clip) keys.

TinyCLIP (microsoft/Cream `TinyCLIP/src/open_clip/model.py`, layout read at commit 4a13c4091e78, recorded in
`tests/students/fixtures/tinyclip_manual_keys.json`) wraps open_clip's towers as `_image_encoder.visual.*`,
`_text_encoder.*` and `_logit_scale.logit_scale`, with an extra `.module` after the tower name in DDP-saved files.
Inside the towers the names are open_clip's own (`conv1`, `class_embedding`, `transformer.resblocks.N.attn.in_proj_*`,
`mlp.c_fc`, `ln_post`, `proj`; `token_embedding`, `ln_final`, `text_projection`), so converting is a prefix change.
The manual-inheritance ViTs use GELU (no QuickGELU), head dim 64, a causal text mask, 224 px and embed 512.

The *auto*-inheritance checkpoints (ViT-63M/32, 45M/32, 22M/32) were pruned with L0 masks: each layer keeps its own
number of heads and FFN width. Students have one width per tower, so those files are refused with a message that
says so (as are files still holding `l0_module` masks, and TinyCLIP's ResNet towers).

References:
    TinyCLIP (ICCV'23): https://arxiv.org/abs/2309.12314, https://github.com/microsoft/Cream/tree/main/TinyCLIP
"""

from __future__ import annotations

import logging
import math
import re

import torch

from mcd_common import UsageError
from students.config import ImageTowerCfg, StudentCfg, TextTowerCfg

_logger = logging.getLogger(__name__)

__all__ = [
    "TINYCLIP_COMMIT",
    "is_tinyclip_state_dict",
    "convert_tinyclip_state_dict",
    "check_uniform_layers",
    "native_vit_student_cfg",
]

TINYCLIP_COMMIT = "4a13c4091e78"
"""microsoft/Cream commit the TinyCLIP layout was read from."""

_PREFIXES = ("_image_encoder.", "_text_encoder.", "_logit_scale.")
_HEAD_DIM = 64  # every TinyCLIP-ViT config: vision head_width 64, text heads = width / 64
# (vision width, layers, patch, text width, text layers) -> registered student (TinyCLIP model_configs/*.json)
_MANUAL = {
    (256, 10, 16, 256, 3): "tinyclip_vit_8m_16_text_3m",
    (512, 12, 16, 512, 6): "tinyclip_vit_39m_16_text_19m",
    (512, 12, 32, 512, 6): "tinyclip_vit_40m_32_text_19m",
    (640, 12, 32, 512, 9): "tinyclip_vit_61m_32_text_29m",
}


def is_tinyclip_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` has TinyCLIP's `_image_encoder` / `_text_encoder` / `_logit_scale` layout."""
    return any(k.startswith(_PREFIXES) for k in state)


def convert_tinyclip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TinyCLIP fork keys -> our keys (`visual.*`, `text.*`, `logit_scale`); refuses auto (L0) and ResNet files.

    Raises:
        UsageError: L0 masks, a ResNet image tower, per-layer widths (auto inheritance) or unknown keys.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if ".l0_module." in key or key.startswith("l0_module."):
            raise UsageError(
                f"TinyCLIP checkpoint with L0 pruning masks ({key}): a checkpoint from automatic-inheritance training "
                "before pruning; students load only pruned or manual-inheritance checkpoints"
            )
        m = re.fullmatch(r"_(image|text)_encoder\.(?:module\.)?(.+)", key)
        if m and m.group(1) == "image" and m.group(2).startswith("visual."):
            out[m.group(2)] = value
        elif m and m.group(1) == "text":
            out["text." + m.group(2)] = value
        elif re.fullmatch(r"_logit_scale\.(?:module\.)?logit_scale", key):
            out["logit_scale"] = value
        else:
            unknown.append(key)
    if unknown:
        few = ", ".join(sorted(unknown)[:8])
        raise UsageError(f"TinyCLIP checkpoint (layout of microsoft/Cream {TINYCLIP_COMMIT}): unknown keys {few}")
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in out):
        raise UsageError("TinyCLIP ResNet checkpoints are not supported: student image towers are ViTs or timm models")
    check_uniform_layers(out, "TinyCLIP")
    return out


def _layer_signatures(state: dict[str, torch.Tensor], prefix: str) -> dict[int, tuple[int, int]]:
    """Per transformer layer of one tower: (attention in-projection rows, FFN width); -1 where a layer has none."""
    layers: dict[int, tuple[int, int]] = {}
    for key in state:
        m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", key)
        if m:
            i = int(m.group(1))
            base = f"{prefix}transformer.resblocks.{i}."
            attn = state.get(base + "attn.in_proj_weight")
            fc = state.get(base + "mlp.c_fc.weight")
            layers[i] = (int(attn.shape[0]) if attn is not None else -1, int(fc.shape[0]) if fc is not None else -1)
    return layers


def check_uniform_layers(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a CLIP state dict (our keys) whose transformer layers differ in heads or FFN width within a tower.

    Raises:
        UsageError: naming the first layers that differ (TinyCLIP auto inheritance prunes per layer).
    """
    for prefix, tower in (("visual.", "image"), ("text.", "text")):
        layers = _layer_signatures(state, prefix)
        emb = state.get(prefix + ("conv1.weight" if prefix == "visual." else "token_embedding.weight"))
        if not layers or emb is None:
            continue
        width = int(emb.shape[0] if prefix == "visual." else emb.shape[1])
        signatures = sorted(set(layers.values()))
        if len(signatures) > 1 or signatures[0][0] != 3 * width:
            shown = ", ".join(
                f"layer {i}: {'no attention' if a < 0 else f'{a // 3} attention dims'}, "
                f"{'no FFN' if f < 0 else f'FFN {f}'}"
                for i, (a, f) in sorted(layers.items())[:4]
            )
            raise UsageError(
                f"{what} checkpoint with per-layer widths in the {tower} tower ({shown}, token width {width}): this "
                "is an automatic-inheritance (L0-pruned) checkpoint; students need one width per tower, so use a "
                "manual-inheritance checkpoint (TinyCLIP ViT-8M/16, 39M/16, 40M/32, 61M/32)"
            )


def native_vit_student_cfg(
    state: dict[str, torch.Tensor],
    *,
    vision_head_width: int = _HEAD_DIM,
    text_heads: int | None = None,
    quick_gelu: bool = False,
    name: str | None = None,
) -> StudentCfg:
    """Infer the `StudentCfg` of a native-ViT + causal-transformer CLIP state dict in our keys (TinyCLIP, HF CLIP).

    Shapes give every size except the number of heads, which is `width / 64` unless given (TinyCLIP's configs).
    A size equal to one of TinyCLIP's manual models gets that registered name.
    """
    try:
        conv1 = state["visual.conv1.weight"]  # [W, 3, P, P]
        grid = state["visual.positional_embedding"].shape[0] - 1
        token = state["text.token_embedding.weight"]  # [V, Wt]
        proj = state["visual.proj"]  # [W, E]
    except KeyError as err:
        raise UsageError(
            f"not a ViT CLIP state dict (no {err.args[0]}): cannot infer the student architecture"
        ) from None
    width, patch = int(conv1.shape[0]), int(conv1.shape[-1])
    side = math.isqrt(grid)
    if side * side != grid:
        raise UsageError(f"visual.positional_embedding has {grid} patch positions: not a square grid")
    text_width = int(token.shape[1])
    if width % vision_head_width or (text_heads is None and text_width % _HEAD_DIM):
        raise UsageError(
            f"cannot infer the attention heads of a ViT {width} / text {text_width} wide CLIP from its weights "
            f"(TinyCLIP's head dim {_HEAD_DIM} does not divide them): build the student by name with these weights "
            "(create_student(NAME, weights=WeightSpec(file=...)))"
        )
    image_layers = len(_layer_signatures(state, "visual."))
    text_sig = _layer_signatures(state, "text.")
    image = ImageTowerCfg(
        image_size=side * patch,
        width=width,
        layers=image_layers,
        head_width=vision_head_width,
        patch_size=patch,
        mlp_ratio=_layer_signatures(state, "visual.")[0][1] / width,
    )
    text = TextTowerCfg(
        context_length=int(state["text.positional_embedding"].shape[0]),
        vocab_size=int(token.shape[0]),
        width=text_width,
        heads=text_heads or text_width // _HEAD_DIM,
        layers=len(text_sig),
        mlp_ratio=text_sig[0][1] / text_width,
        causal=True,
    )
    key = (width, image_layers, patch, text_width, len(text_sig))
    default = _MANUAL.get(key, "tinyclip_custom") if image.image_size == 224 else "tinyclip_custom"
    return StudentCfg(name=name or default, embed_dim=int(proj.shape[1]), image=image, text=text, quick_gelu=quick_gelu)
