"""Hugging Face `transformers` `CLIPModel` checkpoints (e.g. the TinyCLIP ports `wkcn/TinyCLIP-*`) -> student keys.

A `CLIPModel` directory holds `config.json` (`text_config`, `vision_config`, `projection_dim`) and `model.safetensors`
(or `pytorch_model.bin`). Its ViT and text transformer are open_clip's, renamed: separate `q/k/v_proj` become the
fused `in_proj_*` (rows in q, k, v order), `layer_norm1/2` -> `ln_1/2`, `fc1/fc2` -> `c_fc/c_proj`,
`pre_layrnorm`/`post_layernorm` -> `ln_pre`/`ln_post`, and the bias-free `visual_projection` / `text_projection`
Linears (`[E, D]`, `y = W x`) become open_clip's `proj` / `text_projection` (`[D, E]`, `y = x @ P`): transposed.
`position_ids` buffers (older transformers versions saved them) are dropped.

What the keys cannot say comes from `config.json`: the activation (`quick_gelu` or `gelu`, one for both towers),
the head counts, LayerNorm eps (must be open_clip's 1e-5) and the pooled EOS token (argmax pooling needs the EOS id
to be the largest token id, as in CLIP's BPE, or transformers' legacy `eos_token_id == 2` rule).

References:
    transformers `models/clip/modeling_clip.py` (v5.23, installed here); TinyCLIP HF ports:
    https://huggingface.co/collections/wkcn/tinyclip-model-zoo-6581aa105311fe07be88cb0d
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch

from mcd_common import UsageError
from students.config import OPENAI_MEAN, OPENAI_STD, StudentCfg
from students.convert_tinyclip import check_uniform_layers, native_vit_student_cfg

_logger = logging.getLogger(__name__)

__all__ = [
    "HF_CONFIG_NAME",
    "HF_WEIGHT_NAMES",
    "is_hf_clip_state_dict",
    "convert_hf_clip_state_dict",
    "read_hf_clip_config",
    "hf_clip_student_cfg",
    "check_hf_clip_config",
]

HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_PREPROCESSOR_NAME = "preprocessor_config.json"
_LAYER_MAP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def is_hf_clip_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` has transformers' `CLIPModel` layout (`vision_model.*` / `text_model.*` keys)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in state) or "visual_projection.weight" in state


def _convert_layer(tower: str, i: str, rest: str, value: torch.Tensor, out: dict, qkv: dict) -> bool:
    m = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
    if m:
        qkv.setdefault((tower, i, m.group(2)), {})[m.group(1)] = value
        return True
    name, _, leaf = rest.rpartition(".")
    if name not in _LAYER_MAP:
        return False
    out[f"{tower}.transformer.resblocks.{i}.{_LAYER_MAP[name]}.{leaf}"] = value
    return True


def convert_hf_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPModel` keys -> our keys (`visual.*`, `text.*`, `logit_scale`).

    Raises:
        UsageError: keys no rule knows (listed), an incomplete q/k/v triple, or per-layer widths.
    """
    direct = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
        "logit_scale": "logit_scale",
    }
    norms = {
        "vision_model.pre_layrnorm": "visual.ln_pre",
        "vision_model.post_layernorm": "visual.ln_post",
        "text_model.final_layer_norm": "text.ln_final",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        base, _, leaf = key.rpartition(".")
        m = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key in direct:
            out[direct[key]] = value
        elif base in norms and leaf in ("weight", "bias"):
            out[f"{norms[base]}.{leaf}"] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()  # Linear [E, D] -> open_clip [D, E]
        elif key == "text_projection.weight":
            out["text.text_projection"] = value.t().contiguous()
        elif key.endswith("embeddings.position_ids"):
            continue  # a buffer holding arange(positions): nothing to load
        elif not (
            m
            and _convert_layer("visual" if m.group(1) == "vision" else "text", m.group(2), m.group(3), value, out, qkv)
        ):
            unknown.append(key)
    for (tower, i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UsageError(
                f"HF CLIP checkpoint: layer {i} of the {tower} tower lacks {sorted({'q', 'k', 'v'} - set(parts))}_proj"
            )
        # NOTE: nn.MultiheadAttention's in_proj rows are [q; k; v], each head-major as in transformers
        name = "in_proj_weight" if leaf == "weight" else "in_proj_bias"
        out[f"{tower}.transformer.resblocks.{i}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        few = ", ".join(sorted(unknown)[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise UsageError(f"Hugging Face CLIP checkpoint: unknown keys {few}")
    check_uniform_layers(out, "Hugging Face CLIP")
    return out


def read_hf_clip_config(path: str | os.PathLike) -> dict | None:
    """The `CLIPModel` `config.json` of a directory (or of the directory holding a weight file); None if absent."""
    path = Path(path)
    config_path = path / HF_CONFIG_NAME if path.is_dir() else path.parent / HF_CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or "text_config" not in config or "vision_config" not in config:
        return None
    preprocessor = config_path.parent / _PREPROCESSOR_NAME
    if preprocessor.is_file():
        config = dict(config, _preprocessor=json.loads(preprocessor.read_text(encoding="utf-8")))
    return config


def _activation(config: dict) -> bool:
    """Whether the towers use QuickGELU; refuses other or mixed activations (students have one flag)."""
    acts = {
        config["text_config"].get("hidden_act", "quick_gelu"),
        config["vision_config"].get("hidden_act", "quick_gelu"),
    }
    if not acts <= {"gelu", "quick_gelu"} or len(acts) > 1:
        raise UsageError(
            f"HF CLIP config: hidden_act {sorted(acts)}; students support one of gelu / quick_gelu for both towers"
        )
    return acts == {"quick_gelu"}


def check_hf_clip_config(config: dict, cfg: StudentCfg) -> None:
    """Refuse loading a `CLIPModel` into a student whose activation or LayerNorm eps differ from its config.

    Raises:
        UsageError: naming the override that fixes it (`quick_gelu=...`).
    """
    quick = _activation(config)
    if quick != cfg.quick_gelu:
        raise UsageError(
            f"HF CLIP config uses {'quick_gelu' if quick else 'gelu'} but student {cfg.name!r} has quick_gelu="
            f"{cfg.quick_gelu}: create it with quick_gelu={quick} (or load the directory as local-dir:PATH)"
        )
    for tower in ("text_config", "vision_config"):
        eps = float(config[tower].get("layer_norm_eps", 1e-5))
        if abs(eps - 1e-5) > 1e-12:
            raise UsageError(f"HF CLIP {tower}.layer_norm_eps={eps}: students use open_clip's LayerNorm eps 1e-5")
    text = config["text_config"]
    eos, vocab = text.get("eos_token_id", 2), text.get("vocab_size", 49408)
    if eos not in (2, vocab - 1):
        raise UsageError(
            f"HF CLIP text_config.eos_token_id={eos}: students pool the largest token id (argmax), which is the "
            f"EOS token only when it is vocab_size - 1 ({vocab - 1})"
        )


def hf_clip_student_cfg(config: dict, state: dict[str, torch.Tensor], *, name: str | None = None) -> StudentCfg:
    """The `StudentCfg` of a `CLIPModel` from its config and converted (our-key) state dict."""
    vision, text = config["vision_config"], config["text_config"]
    vision_heads = int(vision.get("num_attention_heads", 12))
    cfg = native_vit_student_cfg(
        state,
        vision_head_width=int(state["visual.conv1.weight"].shape[0]) // vision_heads,
        text_heads=int(text.get("num_attention_heads", 8)),
        quick_gelu=_activation(config),
        name=name,
    )
    pre = config.get("_preprocessor") or {}
    mean = tuple(float(v) for v in pre.get("image_mean", OPENAI_MEAN))
    std = tuple(float(v) for v in pre.get("image_std", OPENAI_STD))
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, mean=mean, std=std))
    check_hf_clip_config(config, cfg)
    return cfg
