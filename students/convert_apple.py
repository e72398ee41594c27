"""Apple's MobileCLIP v1 checkpoints (`mobileclip_s0.pt` ... `mobileclip_b.pt`) -> student (open_clip + timm) keys.

Apple's files are `state_dict()`s of `mobileclip.clip.CLIP` (apple/ml-mobileclip, layout read at commit
4144bb1f081a, recorded in `tests/students/fixtures/apple_mobileclip_v1_keys.json`): `image_encoder.model.*` (Apple's
own FastViT "MCi" or ViT-B/16), `text_encoder.*` (a pre-norm transformer, or for S0 the MCt: RepMixer block +
4 transformer layers + RepMixer block) and `logit_scale`. Our students hold the same functions under open_clip
`CustomTextCLIP` keys with timm towers (`visual.trunk.*`, `text.*`), so converting is renaming plus:

- MCi image towers: Apple's flat `network.N` list becomes timm's `stages.S.{downsample,pos_emb,blocks}`; MobileOne
  branch names (`rbr_conv`/`rbr_scale`/`rbr_skip`, `lkb_origin`) become timm's (`conv_kxk`/`conv_scale`/`identity`,
  `large_conv`); layer scales gain timm's `.gamma`.
- the image projection: Apple's `head.proj` / `classifier.proj` is `[in, out]` used as `x @ P` with no bias; timm's
  head is a `Linear` (`weight [out, in]` + bias): transpose, and the bias is loaded as zeros.
- MobileCLIP-B: `pos_embed [1, 1, N, D]` -> `[1, N, D]`; Apple's ViT also pads its first stem conv by 1 and uses
  LayerNorm eps 1e-5 where timm's `vit_base_mci_224` has 0 and 1e-6, so `apple_student_cfg` sets
  `ImageTowerCfg.apple_vit` (with timm's definition image embeddings only reach cosine ~0.999).
- text: `qkv_proj` -> `in_proj_*` (same [q; k; v] row order), positional embedding `[1, 1, 77, D]` -> `[77, D]`; the
  text projection is `[D, E]` used as `x @ P` on both sides (no transpose).
- MCt: Conv2d `(1, k)` kernels `[D, 1, 1, k]` -> Conv1d `[D, 1, k]`, 1x1 convs `[H, D, 1, 1]` -> `[H, D, 1]`,
  layer scales `[D, 1, 1]` -> `[D, 1]`.

Files re-parameterised with Apple's `reparameterize_model` convert too (their MCt ConvFFN BatchNorm, which Apple
does not fold, is folded into the conv as our folded tower expects). Every Apple key is used exactly once; a key
no rule knows raises `UsageError` naming it.

References:
    https://github.com/apple/ml-mobileclip (mobileclip/clip.py, text_encoder.py, models/mci.py, models/vit.py,
    modules/text/repmixer.py, modules/common/mobileone.py)
    timm `fastvit.py` / `vision_transformer_hybrid.py` (target layouts of `fastvit_mci*`, `vit_base_mci_224`)
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import torch

from mcd_common import UsageError
from students.config import ImageTowerCfg, StudentCfg, TextTowerCfg

_logger = logging.getLogger(__name__)

__all__ = [
    "APPLE_COMMIT",
    "APPLE_VARIANTS",
    "is_apple_state_dict",
    "apple_variant",
    "apple_student_cfg",
    "convert_apple_state_dict",
]

APPLE_COMMIT = "4144bb1f081a"
"""apple/ml-mobileclip commit the layout was read from."""

_IMAGE = "image_encoder.model."
_TEXT = "text_encoder."
_BN_EPS = 1e-5  # nn.BatchNorm2d default, which Apple's MCt ConvFFN uses

# MCi variant by (blocks per stage, stage-0 width): mobileclip/models/mci.py mci0/mci1/mci2
_MCI = {((2, 6, 10, 2), 64): "fastvit_mci0", ((4, 12, 20, 4), 64): "fastvit_mci1", ((4, 12, 24, 4), 80): "fastvit_mci2"}
# registered student per image tower (mobileclip/configs/mobileclip_*.json) and its text tower
APPLE_VARIANTS = {
    "fastvit_mci0": ("mobileclip_s0", TextTowerCfg(kind="mct", width=512, heads=8, layers=4, causal=False)),
    "fastvit_mci1": ("mobileclip_s1", TextTowerCfg(width=512, heads=8, layers=12, causal=False)),
    "fastvit_mci2": ("mobileclip_s2", TextTowerCfg(width=512, heads=8, layers=12, causal=False)),
    "vit_base_mci_224": ("mobileclip_b", TextTowerCfg(width=512, heads=8, layers=12, causal=True)),
}

Tensor = torch.Tensor
_Rule = tuple[str, str, Callable[[Tensor], Tensor] | None]


def _ident(x: Tensor) -> Tensor:
    return x


def _squeeze_h(x: Tensor) -> Tensor:
    # Conv2d (1, k) kernel [D, 1, 1, k] -> Conv1d kernel [D, 1, k]
    return x.reshape(x.shape[0], x.shape[1], x.shape[3])


def _squeeze_1x1(x: Tensor) -> Tensor:
    # 1x1 Conv2d [H, D, 1, 1] -> kernel-1 Conv1d [H, D, 1]
    return x.reshape(x.shape[0], x.shape[1], 1)


def _layer_scale_1d(x: Tensor) -> Tensor:
    # [D, 1, 1] (broadcast over [B, D, 1, L]) -> [D, 1] (over [B, D, L])
    return x.reshape(x.shape[0], 1)


def _pos_embed(x: Tensor) -> Tensor:
    # [1, 1, N, D] -> [1, N, D] (timm ViT keeps a leading batch dim)
    return x.reshape(1, x.shape[-2], x.shape[-1])


def _text_pos(x: Tensor) -> Tensor:
    # [1, 1, L, D] -> [L, D]
    return x.reshape(x.shape[-2], x.shape[-1])


# -- rule tables: (regex on the Apple key without its tower prefix, replacement, tensor transform) -------------------
_VIT_RULES: list[_Rule] = [
    (r"cls_token", r"cls_token", None),
    (r"pos_embed\.pos_embed\.pos_embed", r"pos_embed", _pos_embed),
    (r"patch_emb\.(\d)\.block\.conv\.(\w+)", r"patch_embed.backbone.\1.conv.\2", None),
    (r"patch_emb\.(\d)\.block\.norm\.(\w+)", r"patch_embed.backbone.\1.bn.\2", None),
    (r"transformer\.(\d+)\.pre_norm_mha\.0\.(\w+)", r"blocks.\1.norm1.\2", None),
    (r"transformer\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.(\w+)", r"blocks.\1.attn.qkv.\2", None),
    (r"transformer\.(\d+)\.pre_norm_mha\.1\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2", None),
    (r"transformer\.(\d+)\.pre_norm_ffn\.0\.(\w+)", r"blocks.\1.norm2.\2", None),
    (r"transformer\.(\d+)\.pre_norm_ffn\.1\.(\w+)", r"blocks.\1.mlp.fc1.\2", None),
    (r"transformer\.(\d+)\.pre_norm_ffn\.4\.(\w+)", r"blocks.\1.mlp.fc2.\2", None),
    (r"post_transformer_norm\.(\w+)", r"norm.\1", None),
]
_TEXT_LAYER_RULES: list[_Rule] = [
    (r"pre_norm_mha\.0\.(\w+)", r"ln_1.\1", None),
    (r"pre_norm_mha\.1\.qkv_proj\.weight", r"attn.in_proj_weight", None),
    (r"pre_norm_mha\.1\.qkv_proj\.bias", r"attn.in_proj_bias", None),
    (r"pre_norm_mha\.1\.out_proj\.(\w+)", r"attn.out_proj.\1", None),
    (r"pre_norm_ffn\.0\.(\w+)", r"ln_2.\1", None),
    (r"pre_norm_ffn\.1\.(\w+)", r"mlp.c_fc.\1", None),
    (r"pre_norm_ffn\.4\.(\w+)", r"mlp.c_proj.\1", None),
]
_MIXER_RULES: list[_Rule] = [
    (r"layer_scale", r"layer_scale", _layer_scale_1d),
    (r"token_mixer\.layer_scale", r"token_mixer.layer_scale", _layer_scale_1d),
    (r"token_mixer\.norm\.rbr_skip\.(\w+)", r"token_mixer.norm.\1", None),
    (r"token_mixer\.mixer\.rbr_skip\.(\w+)", r"token_mixer.mixer_skip.\1", None),
    (r"token_mixer\.mixer\.rbr_conv\.0\.conv\.weight", r"token_mixer.mixer_conv.weight", _squeeze_h),
    (r"token_mixer\.mixer\.rbr_conv\.0\.bn\.(\w+)", r"token_mixer.mixer_bn.\1", None),
    (r"token_mixer\.reparam_conv\.weight", r"token_mixer.reparam_conv.weight", _squeeze_h),
    (r"token_mixer\.reparam_conv\.bias", r"token_mixer.reparam_conv.bias", None),
    (r"convffn\.conv\.conv\.weight", r"convffn.conv.weight", _squeeze_h),
    (r"convffn\.conv\.bn\.(\w+)", r"convffn.bn.\1", None),
    (r"convffn\.(fc1|fc2)\.weight", r"convffn.\1.weight", _squeeze_1x1),
    (r"convffn\.(fc1|fc2)\.bias", r"convffn.\1.bias", None),
]
# MCi: within a block / downsample / stem unit (after the network index is resolved)
_MCI_UNIT_TOKENS = {
    "rbr_skip": "identity",
    "rbr_scale": "conv_scale",
    "rbr_conv": "conv_kxk",
    "lkb_origin": "large_conv",
    "lkb_reparam": "reparam_conv",
    "convffn": "mlp",
    "reduce": "fc1",
    "expand": "fc2",
}


def _apply_rules(key: str, value: Tensor, rules: list[_Rule]) -> tuple[str, Tensor] | None:
    for pattern, repl, fn in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", repl, key), (fn or _ident)(value)
    return None


def is_apple_state_dict(state: dict[str, Tensor]) -> bool:
    """Whether `state` has Apple's ml-mobileclip v1 layout (`image_encoder.model.*` / `text_encoder.*` keys)."""
    return any(k.startswith((_IMAGE, _TEXT)) for k in state)


# ---------------------------------------------------------------------------------------------------------------------
# variant detection
def _mci_stage_layout(image: dict[str, Tensor]) -> tuple[dict[int, tuple[str, int]], tuple[int, ...]]:
    """Map each `network.N` index to (`blocks`/`downsample`/`pos_emb`, stage) and count blocks per stage."""
    kinds: dict[int, str] = {}
    blocks: dict[int, set[int]] = {}
    for key in image:
        m = re.match(r"network\.(\d+)\.(\w+)", key)
        if not m:
            continue
        idx, child = int(m.group(1)), m.group(2)
        kind = "downsample" if child == "proj" else "pos_emb" if child in ("pe", "reparam_conv") else "blocks"
        if kind == "blocks":
            blocks.setdefault(idx, set()).add(int(child))
        if kinds.setdefault(idx, kind) != kind:
            raise UsageError(f"Apple MCi checkpoint: network.{idx} mixes block and downsample keys")
    downsamples = sorted(i for i, k in kinds.items() if k == "downsample")
    # NOTE: Apple's list is [stage0, PE, stage1, PE, stage2, PE, RepCPE, stage3]: the stage of an entry is the number
    # of downsampling PatchEmbeds at or before it (a downsample opens the next stage, as timm's `stages.S.downsample`).
    layout = {i: (k, sum(d <= i for d in downsamples)) for i, k in kinds.items()}
    counts: dict[int, int] = {}
    for idx, members in blocks.items():
        counts[layout[idx][1]] = counts.get(layout[idx][1], 0) + len(members)
    return layout, tuple(counts[s] for s in sorted(counts))


def apple_variant(state: dict[str, Tensor]) -> str:
    """The timm image tower of an Apple v1 state dict: `fastvit_mci0/1/2` or `vit_base_mci_224`.

    Raises:
        UsageError: an image tower none of Apple's four configs has.
    """
    image = {k[len(_IMAGE) :]: v for k, v in state.items() if k.startswith(_IMAGE)}
    if not image:
        raise UsageError("Apple MobileCLIP checkpoint without image_encoder.model.* keys: not a full v1 model")
    if "cls_token" in image:
        return "vit_base_mci_224"
    _, counts = _mci_stage_layout(image)
    scale = image.get("network.0.0.layer_scale")
    width = int(scale.shape[0]) if scale is not None else -1
    name = _MCI.get((counts, width))
    if name is None:
        raise UsageError(
            f"Apple MCi checkpoint with {counts} blocks per stage and stage-0 width {width}: not MCi0/1/2 "
            f"(known: {sorted(_MCI)})"
        )
    return name


def apple_student_cfg(state: dict[str, Tensor]) -> StudentCfg:
    """The `StudentCfg` an Apple v1 state dict loads into (the registered `mobileclip_s0/s1/s2/b` architecture).

    The image tower names the variant; text depth, vocabulary, context length and embedding size are read from the
    tensors (Apple's files have the registered sizes; a smaller test file gets a smaller text tower). MobileCLIP-B
    gets `ImageTowerCfg.apple_vit=True` (Apple's stem padding and LayerNorm eps).

    Raises:
        UsageError: a text tower that does not match the variant (MCt for S0, a plain transformer otherwise).
    """
    timm_name = apple_variant(state)
    name, text = APPLE_VARIANTS[timm_name]
    is_vit = timm_name.startswith("vit_")
    image = ImageTowerCfg(
        image_size=224 if is_vit else 256,
        timm_model_name=timm_name,
        timm_pool="token" if is_vit else "avg",
        timm_proj=None,
        timm_drop_path=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
        resize_mode="shortest",
        apple_vit=is_vit,
    )
    body = {k[len(_TEXT) :]: v for k, v in state.items() if k.startswith(_TEXT)}
    names = _text_layer_names(body)
    kind = "mct" if "mixer_in" in names.values() else "transformer"
    if kind != text.kind:
        raise UsageError(f"Apple checkpoint: {name} has a {text.kind} text tower, this file a {kind} one")
    try:
        token, pos, proj = (
            body[k] for k in ("embedding_layer.weight", "positional_embedding.pos_embed.pos_embed", "projection_layer")
        )
    except KeyError as err:
        raise UsageError(f"Apple checkpoint without text_encoder.{err.args[0]}: not a full v1 model") from None
    text = dataclasses.replace(
        text,
        width=int(token.shape[1]),
        heads=int(token.shape[1]) // 64,  # head dim 64 in every Apple text config (512 wide, 8 heads)
        layers=len(names) - (2 if kind == "mct" else 0),
        vocab_size=int(token.shape[0]),
        context_length=int(pos.shape[-2]),
    )
    return StudentCfg(name=name, embed_dim=int(proj.shape[1]), image=image, text=text)


# ---------------------------------------------------------------------------------------------------------------------
# conversion
def _mci_unit(rest: str) -> str:
    """Rename MobileOne / RepMixer sub-keys to timm's FastViT names (`rbr_conv` -> `conv_kxk`, layer scales ...)."""
    tokens = [_MCI_UNIT_TOKENS.get(t, t) for t in rest.split(".")]
    if re.fullmatch(r"layer_scale(_\d)?", tokens[-1]):
        tokens.append("gamma")  # timm wraps layer scales in a LayerScale2d module
    return ".".join(tokens)


def _convert_mci(image: dict[str, Tensor], out: dict[str, Tensor], unknown: list[str]) -> None:
    layout, _ = _mci_stage_layout(image)
    for key, value in image.items():
        head, _, rest = key.partition(".")
        if key == "head.proj":
            # NOTE: Apple's GlobalPool2D projects with `x @ proj` ([in, out], no bias); timm's head is a Linear
            weight = value.t().contiguous()
            out["head.fc.weight"] = weight
            out["head.fc.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        elif head == "patch_embed":
            out["stem." + _mci_unit(rest)] = value
        elif head == "conv_exp":
            out["final_conv." + _mci_unit(rest)] = value
        elif head == "network":
            idx, _, sub = rest.partition(".")
            kind, stage = layout[int(idx)]
            if kind == "pos_emb":
                sub = sub.replace("pe.", "pos_enc.", 1) if sub.startswith("pe.") else sub
            out[f"stages.{stage}.{kind}." + _mci_unit(sub)] = value
        else:
            unknown.append(_IMAGE + key)


def _convert_vit(image: dict[str, Tensor], out: dict[str, Tensor], unknown: list[str]) -> None:
    for key, value in image.items():
        if key == "classifier.proj":
            weight = value.t().contiguous()  # [in, out] -> Linear [out, in]; Apple's projection has no bias
            out["head.weight"] = weight
            out["head.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            continue
        hit = _apply_rules(key, value, _VIT_RULES)
        if hit is None:
            unknown.append(_IMAGE + key)
        else:
            out[hit[0]] = hit[1]


def _fold_convffn_bn(block: dict[str, Tensor]) -> None:
    """Fold a re-parameterised Apple MCt block's ConvFFN BatchNorm into its depthwise conv (our folded layout)."""
    bn = {name: block.pop(f"convffn.bn.{name}") for name in ("weight", "bias", "running_mean", "running_var")}
    block.pop("convffn.bn.num_batches_tracked", None)
    a = bn["weight"] / torch.sqrt(bn["running_var"] + _BN_EPS)
    block["convffn.conv.weight"] = block["convffn.conv.weight"] * a.view(-1, 1, 1)
    block["convffn.conv.bias"] = bn["bias"] - bn["running_mean"] * a


def _text_layer_names(text: dict[str, Tensor]) -> dict[int, str]:
    """Our prefix for each Apple `transformer.N` layer (base: all transformer layers; MCt: mixer, layers, mixer)."""
    layers = sorted({int(m.group(1)) for k in text if (m := re.match(r"transformer\.(\d+)\.", k))})
    mixers = sorted({int(m.group(1)) for k in text if (m := re.match(r"transformer\.(\d+)\.token_mixer\.", k))})
    if not mixers:
        return {i: f"transformer.resblocks.{i}" for i in layers}
    if mixers != [layers[0], layers[-1]] or len(layers) < 3:
        raise UsageError(
            f"Apple text encoder with RepMixer blocks at layers {mixers} of {len(layers)}: only the MCt layout "
            "(first and last layer) is supported"
        )
    names = {i: f"transformer.resblocks.{i - 1}" for i in layers[1:-1]}
    names.update({layers[0]: "mixer_in", layers[-1]: "mixer_out"})
    return names


def _convert_text(text: dict[str, Tensor], out: dict[str, Tensor], unknown: list[str]) -> None:
    names = _text_layer_names(text)
    blocks: dict[str, dict[str, Tensor]] = {}
    for key, value in text.items():
        m = re.match(r"transformer\.(\d+)\.(.+)", key)
        if m:
            prefix = names[int(m.group(1))]
            rules = _MIXER_RULES if prefix.startswith("mixer_") else _TEXT_LAYER_RULES
            hit = _apply_rules(m.group(2), value, rules)
            if hit is None:
                unknown.append(_TEXT + key)
            else:
                blocks.setdefault(prefix, {})[hit[0]] = hit[1]
        elif key == "embedding_layer.weight":
            out["token_embedding.weight"] = value
        elif key == "positional_embedding.pos_embed.pos_embed":
            out["positional_embedding"] = _text_pos(value)
        elif key in ("final_layer_norm.weight", "final_layer_norm.bias"):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "projection_layer":
            out["text_projection"] = value  # [D, E], `x @ P` in both models
        else:
            unknown.append(_TEXT + key)
    for prefix, block in blocks.items():
        if "token_mixer.reparam_conv.weight" in block and "convffn.bn.weight" in block:
            _fold_convffn_bn(block)
        out.update({f"{prefix}.{k}": v for k, v in block.items()})


def convert_apple_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and reshape) an Apple v1 state dict to our student keys (`visual.trunk.*`, `text.*`, `logit_scale`).

    Raises:
        UsageError: keys no rule knows (listed), or an unknown image/text layout.
    """
    image = {k[len(_IMAGE) :]: v for k, v in state.items() if k.startswith(_IMAGE)}
    text = {k[len(_TEXT) :]: v for k, v in state.items() if k.startswith(_TEXT)}
    unknown = [k for k in state if not k.startswith((_IMAGE, _TEXT)) and k != "logit_scale"]
    visual: dict[str, Tensor] = {}
    (_convert_vit if apple_variant(state).startswith("vit_") else _convert_mci)(image, visual, unknown)
    text_out: dict[str, Tensor] = {}
    _convert_text(text, text_out, unknown)
    if unknown:
        few = ", ".join(sorted(unknown)[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise UsageError(f"Apple MobileCLIP checkpoint (layout of ml-mobileclip {APPLE_COMMIT}): unknown keys {few}")
    out = {"visual.trunk." + k: v for k, v in visual.items()}
    out.update({"text." + k: v for k, v in text_out.items()})
    if "logit_scale" in state:
        out["logit_scale"] = state["logit_scale"]
    return out
