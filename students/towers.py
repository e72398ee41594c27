"""Student architecture configs and the `CLIPStudent` model (open_clip-compatible state-dict keys).

A student is an image tower plus a text tower that embed into one space. Both towers are built with open_clip's own
tower builders (`open_clip.model._build_vision_tower` / `_build_text_tower`), so `CLIPStudent.state_dict()` has
exactly the keys of `open_clip.CustomTextCLIP` (`visual.*`, `text.*`, `logit_scale`) and a saved student loads with
`open_clip.create_model("local-dir:...")`. The one exception is the MobileCLIP-S0 "MCt" text tower
(`students/mct.py`), which open_clip does not implement (mlfoundations/open_clip#958).

A config with a `multimodal` (text decoder) section describes a CoCa student: `CLIPStudent(cfg)` then returns a
`students.coca.CoCaStudent` whose state dict matches open_clip's `CoCa` (adds `text_decoder.*`).

References:
    open_clip model configs: https://github.com/mlfoundations/open_clip (src/open_clip/model.py, model_configs/)
    MobileCLIP (CVPR'24) / MobileCLIP2 (TMLR'25): https://github.com/apple/ml-mobileclip
    CoCa (Yu et al. 2022, arXiv:2205.01917); open_clip `coca_model.py`
    timm re-parameterisation: https://github.com/huggingface/pytorch-image-models (timm/models/_manipulate.py)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_text_tower, _build_vision_tower
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = [
    "ImageTowerCfg",
    "TextTowerCfg",
    "TextDecoderCfg",
    "StudentCfg",
    "CLIPStudent",
    "MCT_OPEN_CLIP_MARKER",
    "APPLE_VIT_TIMM_NAME",
    "make_apple_vit",
    "OPENAI_MEAN",
    "OPENAI_STD",
]

OPENAI_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)  # type: ignore[assignment]
OPENAI_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)  # type: ignore[assignment]

# NOTE: written into the open_clip `text_cfg` of MCt students. open_clip passes text_cfg to `CLIPTextCfg(**text_cfg)`,
# so pointing open_clip at such a directory fails with "unexpected keyword argument '<this name>'", which tells the
# user what to do instead. `StudentCfg.from_open_clip` recognises the key.
# NOTE: the one timm architecture with an Apple-faithful variant (ImageTowerCfg.apple_vit)
APPLE_VIT_TIMM_NAME = "vit_base_mci_224"

MCT_OPEN_CLIP_MARKER = "mct_text_tower_is_not_in_open_clip_load_with_students_load_student"


@dataclass(frozen=True)
class ImageTowerCfg:
    """Image tower: a timm model (`timm_model_name` set) or an open_clip native ViT, plus its preprocessing."""

    image_size: int = 224
    """Square input resolution in pixels."""
    timm_model_name: str | None = None
    """timm architecture (e.g. `fastvit_mci0`); None builds an open_clip native ViT from the fields below."""
    timm_pool: str = "avg"
    """timm feature pooling (`avg`, `token`, ...), as open_clip's `timm_pool`."""
    timm_proj: Literal["linear", "mlp", "none"] | None = "linear"
    """Projection to `embed_dim`: `linear`/`mlp` head; None re-uses the timm classifier as projection (MobileCLIP)."""
    timm_proj_bias: bool = False
    """Bias in the extra projection head."""
    timm_drop: float = 0.0
    """Head dropout."""
    timm_drop_path: float | None = None
    """Stochastic depth of the timm trunk."""
    layers: int = 12
    """Native ViT: number of transformer blocks."""
    width: int = 768
    """Native ViT: token width."""
    head_width: int = 64
    """Native ViT: attention head dim (heads = width // head_width)."""
    patch_size: int = 16
    """Native ViT: patch size in pixels."""
    mlp_ratio: float = 4.0
    """Native ViT: MLP hidden width = int(width * mlp_ratio)."""
    attentional_pool: bool = False
    """Native ViT: pool with open_clip's `AttentionalPooler` (CoCa) instead of the class token."""
    attn_pooler_queries: int = 256
    """Attentional pooler: learned queries; CoCa embeds with the first, the decoder reads the others."""
    attn_pooler_heads: int = 8
    """Attentional pooler: attention heads (`embed_dim` must be divisible by it)."""
    mean: tuple[float, float, float] = OPENAI_MEAN
    """Per-channel normalisation mean, applied by `CLIPStudent.normalize`."""
    std: tuple[float, float, float] = OPENAI_STD
    """Per-channel normalisation std."""
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    """Resize interpolation used when images are resized for this student."""
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    """open_clip preprocessing resize mode."""
    apple_vit: bool = False
    """`vit_base_mci_224` built as Apple's ml-mobileclip builds MobileCLIP-B (first stem conv padding 1, LayerNorm
    eps 1e-5) instead of timm's definition (padding 0, eps 1e-6); same keys. Set when Apple's `mobileclip_b.pt` is
    loaded (`students.convert_apple`). open_clip cannot express it: `local-dir:` in open_clip gives timm's variant."""

    @property
    def is_timm(self) -> bool:
        """Whether the tower is a timm model."""
        return self.timm_model_name is not None

    @property
    def heads(self) -> int:
        """Native ViT attention heads."""
        return self.width // self.head_width

    def open_clip_vision_cfg(self) -> dict[str, Any]:
        """The open_clip `vision_cfg` dict for this tower."""
        if self.is_timm:
            return {
                "timm_model_name": self.timm_model_name,
                "timm_model_pretrained": False,
                "timm_pool": self.timm_pool,
                "timm_proj": self.timm_proj,
                "timm_proj_bias": self.timm_proj_bias,
                "timm_drop": self.timm_drop,
                "timm_drop_path": self.timm_drop_path,
                "image_size": self.image_size,
            }
        cfg: dict[str, Any] = {
            "image_size": self.image_size,
            "layers": self.layers,
            "width": self.width,
            "head_width": self.head_width,
            "patch_size": self.patch_size,
            "mlp_ratio": self.mlp_ratio,
        }
        # NOTE: emitted only when used, so the configs of plain students stay exactly as before
        if self.attentional_pool:
            cfg.update(
                attentional_pool=True,
                attn_pooler_queries=self.attn_pooler_queries,
                attn_pooler_heads=self.attn_pooler_heads,
            )
        return cfg


@dataclass(frozen=True)
class TextTowerCfg:
    """Text tower: an open_clip text transformer or the MobileCLIP-S0 MCt tower (RepMixer + transformer + RepMixer)."""

    kind: Literal["transformer", "mct"] = "transformer"
    """`transformer` (open_clip TextTransformer) or `mct` (students.mct.MCtTextTower)."""
    context_length: int = 77
    """Token sequence length."""
    vocab_size: int = 49408
    """Vocabulary size (CLIP BPE: 49408)."""
    width: int = 512
    """Token width."""
    heads: int = 8
    """Attention heads."""
    layers: int = 12
    """Transformer layers (MCt: the layers between its two RepMixer blocks)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(width * mlp_ratio)."""
    causal: bool = True
    """Causal attention mask (open_clip `no_causal_mask = not causal`)."""
    mixer_kernel_size: int = 11
    """MCt only: RepMixer convolution kernel over the sequence."""
    embed_cls: bool = False
    """Append a learned CLS token whose output is the text embedding (CoCa); adds one position."""

    def open_clip_text_cfg(self) -> dict[str, Any]:
        """The open_clip `text_cfg` dict (MCt towers get a marker key that open_clip rejects with a clear name)."""
        cfg: dict[str, Any] = {
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "heads": self.heads,
            "layers": self.layers,
            "mlp_ratio": self.mlp_ratio,
            "no_causal_mask": not self.causal,
        }
        if self.embed_cls:
            cfg["embed_cls"] = True
        if self.kind == "mct":
            cfg[MCT_OPEN_CLIP_MARKER] = {"mixer_kernel_size": self.mixer_kernel_size}
        return cfg


@dataclass(frozen=True)
class TextDecoderCfg:
    """CoCa captioning decoder (open_clip `MultimodalTransformer`): causal self-attention over the caption tokens,
    cross-attention to the image tokens, then a projection to the vocabulary.

    Its context length and vocabulary are the text tower's. The MLP ratio is fixed at 4: open_clip's
    `_build_text_decoder_tower` does not pass `multimodal_cfg.mlp_ratio` on.
    """

    width: int = 512
    """Token width; must equal `embed_dim` (image tokens) and the text tower width (caption tokens)."""
    heads: int = 8
    """Attention heads (self- and cross-attention)."""
    layers: int = 12
    """Decoder layers, each a self-attention block followed by a cross-attention block."""


def _tuple3(value: Any) -> tuple[float, float, float]:
    return tuple(float(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class StudentCfg:
    """A complete student architecture: enough to rebuild it without the registry."""

    name: str = "custom"
    """Registry name (informational)."""
    embed_dim: int = 512
    """Shared embedding dimension."""
    image: ImageTowerCfg = field(default_factory=ImageTowerCfg)
    """Image tower."""
    text: TextTowerCfg = field(default_factory=TextTowerCfg)
    """Text tower."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial log of the contrastive logit scale (CLIP: log(1/0.07))."""
    quick_gelu: bool = False
    """Use QuickGELU in native open_clip towers (needed to match OpenAI-trained weights)."""
    multimodal: TextDecoderCfg | None = None
    """CoCa captioning decoder; None for a plain two-tower CLIP student."""

    def __post_init__(self) -> None:
        if self.image.attentional_pool and self.image.is_timm:
            raise ValueError("image.attentional_pool needs a native ViT image tower (timm_model_name=None)")
        if self.text.embed_cls and self.text.kind != "transformer":
            raise ValueError("text.embed_cls needs the open_clip transformer text tower (kind='transformer')")
        if self.image.apple_vit and self.image.timm_model_name != APPLE_VIT_TIMM_NAME:
            raise ValueError(f"image.apple_vit needs timm_model_name={APPLE_VIT_TIMM_NAME!r}")
        if self.multimodal is not None:
            self._check_coca()

    def _check_coca(self) -> None:
        # NOTE: open_clip's CoCa feeds attentional-pool outputs (embed_dim wide) and text tokens (text width) to
        # cross-/self-attention blocks of the decoder width, with no projections in between.
        m = self.multimodal
        assert m is not None
        problems = []
        if self.image.is_timm or not self.image.attentional_pool:
            problems.append("the image tower must be a native ViT with attentional_pool=True")
        if self.text.kind != "transformer" or not self.text.embed_cls:
            problems.append("the text tower must be a transformer with embed_cls=True")
        if not self.embed_dim == self.text.width == m.width:
            problems.append(
                f"embed_dim ({self.embed_dim}), text width ({self.text.width}) and decoder width "
                f"({m.width}) must be equal"
            )
        if m.width % m.heads:
            problems.append(f"decoder width {m.width} is not divisible by its {m.heads} heads")
        if self.embed_dim % self.image.attn_pooler_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by attn_pooler_heads")
        if self.image.attn_pooler_queries < 2:
            problems.append("attn_pooler_queries must be >= 2 (one contrastive query plus decoder tokens)")
        if problems:
            raise ValueError(f"invalid CoCa student {self.name!r}: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists in JSON; `from_dict` restores them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentCfg:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        data = dict(data)
        image = dict(data.pop("image", {}) or {})
        text = dict(data.pop("text", {}) or {})
        multimodal = data.pop("multimodal", None)
        decoder = dict(multimodal or {})
        nested = {"image", "text", "multimodal"}
        for sub, sub_cls, where in (
            (image, ImageTowerCfg, "image"),
            (text, TextTowerCfg, "text"),
            (decoder, TextDecoderCfg, "multimodal"),
            (data, cls, ""),
        ):
            known = {f.name for f in dataclasses.fields(sub_cls)} - (nested if sub_cls is cls else set())
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"unknown StudentCfg {where + ' ' if where else ''}key(s): {sorted(unknown)}")
        for key in ("mean", "std"):
            if key in image:
                image[key] = _tuple3(image[key])
        return cls(
            image=ImageTowerCfg(**image),
            text=TextTowerCfg(**text),
            multimodal=None if multimodal is None else TextDecoderCfg(**decoder),
            **data,
        )

    def with_overrides(self, **overrides: Any) -> StudentCfg:
        """Return a copy with flat overrides applied (None values are dropped).

        A key is looked up in `StudentCfg`, then in whichever tower config uniquely has it (`image_size`,
        `context_length`, `timm_model_name`, `heads`, ...). Names both towers have (`width`, `layers`, `mlp_ratio`)
        must be prefixed: `image_width=...`, `text_layers=...`. The CoCa decoder is reached only with a `decoder_`
        prefix (`decoder_layers=...`). Unknown keys raise ValueError.
        """
        top: dict[str, Any] = {}
        image: dict[str, Any] = {}
        text: dict[str, Any] = {}
        decoder: dict[str, Any] = {}
        top_fields = {f.name for f in dataclasses.fields(self)} - {"image", "text", "multimodal"}
        decoder_fields = {f.name for f in dataclasses.fields(TextDecoderCfg)}
        image_fields = {f.name for f in dataclasses.fields(ImageTowerCfg)}
        text_fields = {f.name for f in dataclasses.fields(TextTowerCfg)}
        for key, value in overrides.items():
            if value is None:
                continue
            if key in top_fields:
                top[key] = value
            elif key in image_fields and key in text_fields:
                raise ValueError(f"override {key!r} is ambiguous: use image_{key}=... or text_{key}=...")
            elif key in image_fields:
                image[key] = value
            elif key in text_fields:
                text[key] = value
            elif key.startswith("image_") and key[6:] in image_fields:
                image[key[6:]] = value
            elif key.startswith("text_") and key[5:] in text_fields:
                text[key[5:]] = value
            elif key.startswith("decoder_") and key[8:] in decoder_fields:
                if self.multimodal is None:
                    raise ValueError(f"override {key!r}: student {self.name!r} has no text decoder (not a CoCa)")
                decoder[key[8:]] = value
            else:
                raise ValueError(f"unknown student override {key!r}")
        if "mean" in image:
            image["mean"] = _tuple3(image["mean"])
        if "std" in image:
            image["std"] = _tuple3(image["std"])
        if decoder:
            top["multimodal"] = dataclasses.replace(self.multimodal, **decoder)
        return dataclasses.replace(
            self,
            image=dataclasses.replace(self.image, **image),
            text=dataclasses.replace(self.text, **text),
            **top,
        )

    # ----------------------------------------------------------------------------------------------------------------
    def open_clip_model_cfg(self) -> dict[str, Any]:
        """open_clip model config: `{"embed_dim", "vision_cfg", "text_cfg", "custom_text": true}`.

        CoCa students add `multimodal_cfg` (which makes open_clip build a `CoCa`) and `output_tokens: true` in both
        tower configs, since the decoder reads the towers' token outputs.
        """
        cfg: dict[str, Any] = {
            "embed_dim": self.embed_dim,
            "vision_cfg": self.image.open_clip_vision_cfg(),
            "text_cfg": self.text.open_clip_text_cfg(),
            "custom_text": True,
        }
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        if self.multimodal is not None:
            cfg["vision_cfg"]["output_tokens"] = True
            cfg["text_cfg"]["output_tokens"] = True
            cfg["multimodal_cfg"] = {
                "context_length": self.text.context_length,
                "vocab_size": self.text.vocab_size,
                "width": self.multimodal.width,
                "heads": self.multimodal.heads,
                "layers": self.multimodal.layers,
            }
        return cfg

    def open_clip_preprocess_cfg(self) -> dict[str, Any]:
        """open_clip preprocess config: `{"size", "mean", "std", "interpolation", "resize_mode"}`."""
        return {
            "size": self.image.image_size,
            "mean": list(self.image.mean),
            "std": list(self.image.std),
            "interpolation": self.image.interpolation,
            "resize_mode": self.image.resize_mode,
        }

    @classmethod
    def from_open_clip(
        cls, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None, *, name: str = "open_clip"
    ) -> StudentCfg:
        """Build a StudentCfg from an open_clip model config (+ optional preprocess config).

        Covers timm and native-ViT image towers (with or without attentional pooling), transformer (or our MCt)
        text towers, and CoCa (`multimodal_cfg`); any other open_clip feature (HF text towers, ...) raises
        ValueError naming the key.
        """
        vision = dict(model_cfg["vision_cfg"])
        text = dict(model_cfg["text_cfg"])
        pre = dict(preprocess_cfg or {})
        extra_top = set(model_cfg) - {
            "embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "multimodal_cfg"
        }  # fmt: skip
        if extra_top:
            raise ValueError(f"unsupported open_clip model_cfg key(s) for a student: {sorted(extra_top)}")
        is_coca = "multimodal_cfg" in model_cfg
        # NOTE: token outputs are what a CoCa decoder reads; a plain student returns embeddings only
        for tower, tower_cfg in (("vision_cfg", vision), ("text_cfg", text)):
            if bool(tower_cfg.pop("output_tokens", is_coca)) != is_coca:
                raise ValueError(f"unsupported open_clip {tower} output_tokens (a student only has it in CoCa)")

        image_kw: dict[str, Any] = {}
        if vision.get("timm_model_name"):
            mapping = ("timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path")
            allowed = set(mapping) | {"image_size", "timm_model_pretrained"}
        else:
            mapping = ("layers", "width", "head_width", "patch_size", "mlp_ratio")
            mapping += ("attentional_pool", "attn_pooler_queries", "attn_pooler_heads")
            allowed = set(mapping) | {"image_size"}
            if not isinstance(vision.get("attentional_pool", False), bool):  # 'parallel'/'cascade' WIP variants
                raise ValueError(f"unsupported open_clip attentional_pool={vision['attentional_pool']!r}")
        unknown = set(vision) - allowed
        if unknown:
            raise ValueError(f"unsupported open_clip vision_cfg key(s) for a student: {sorted(unknown)}")
        image_kw.update({k: vision[k] for k in mapping if k in vision})
        if isinstance(image_kw.get("layers"), (list, tuple)):
            raise ValueError("ModifiedResNet image towers (list-valued `layers`) are not supported by students")
        if "image_size" in vision:
            size = vision["image_size"]
            image_kw["image_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
        if "size" in pre:
            size = pre["size"]
            image_kw["image_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
        for key in ("mean", "std"):
            if key in pre:
                image_kw[key] = _tuple3(pre[key])
        for key in ("interpolation", "resize_mode"):
            if key in pre:
                image_kw[key] = pre[key]

        text_kw: dict[str, Any] = {}
        mct = text.pop(MCT_OPEN_CLIP_MARKER, None)
        if mct is not None:
            text_kw["kind"] = "mct"
            text_kw.update(mct)
        if "no_causal_mask" in text:
            text_kw["causal"] = not text.pop("no_causal_mask")
        text_map = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "embed_cls")
        unknown = set(text) - set(text_map)
        if unknown:
            raise ValueError(f"unsupported open_clip text_cfg key(s) for a student: {sorted(unknown)}")
        text_kw.update({k: text[k] for k in text_map if k in text})
        text_cfg = TextTowerCfg(**text_kw)
        multimodal = _decoder_from_open_clip(model_cfg["multimodal_cfg"], text_cfg) if is_coca else None
        return cls(
            name=name,
            embed_dim=int(model_cfg["embed_dim"]),
            image=ImageTowerCfg(**image_kw),
            text=text_cfg,
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
            multimodal=multimodal,
        )


def _decoder_from_open_clip(multimodal_cfg: dict[str, Any], text: TextTowerCfg) -> TextDecoderCfg:
    """The `TextDecoderCfg` of an open_clip `multimodal_cfg`, checking what students derive from the text tower."""
    m = dict(multimodal_cfg)
    # NOTE: open_clip's MultimodalCfg carries fields its decoder builder never reads; they cannot change the model.
    for unused in ("mlp_ratio", "dim_head", "n_queries", "attn_pooler_heads"):
        m.pop(unused, None)
    for key, ours in (("context_length", text.context_length), ("vocab_size", text.vocab_size)):
        # open_clip's own defaults (MultimodalCfg extends CLIPTextCfg) apply to a missing key
        theirs = m.pop(key, 77 if key == "context_length" else 49408)
        if theirs != ours:
            raise ValueError(f"multimodal_cfg {key}={theirs} differs from the text tower's {ours}: unsupported")
    decoder_map = ("width", "heads", "layers")
    unknown = set(m) - set(decoder_map)
    if unknown:
        raise ValueError(f"unsupported open_clip multimodal_cfg key(s) for a student: {sorted(unknown)}")
    return TextDecoderCfg(**{k: m[k] for k in decoder_map if k in m})


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int):  # noqa: ANN202 - open_clip SimpleTokenizer
    # NOTE: cached per context length: loading the BPE merges takes a noticeable fraction of a second, and the
    # tokenizer is stateless. Kept off the module so deepcopy/pickling a student stays cheap.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def make_apple_vit(visual: nn.Module) -> None:
    """Turn an open_clip `TimmModel` around timm's `vit_base_mci_224` into Apple's MobileCLIP-B image tower, in place.

    apple/ml-mobileclip (`mobileclip/models/vit.py`, commit 4144bb1f081a): the first ConvStem conv (kernel 4, stride 4)
    pads by 1 (timm: 0; both give 56x56 at 224 px) and every LayerNorm is `LayerNormFP32` with eps 1e-5 (timm: 1e-6).
    Parameters are untouched, so the state dict is the same.
    """
    trunk = visual.trunk
    trunk.patch_embed.backbone[0].conv.padding = (1, 1)
    for module in trunk.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-5


def build_text_tower(cfg: StudentCfg) -> nn.Module:
    """Build the text tower of `cfg` (open_clip TextTransformer or MCt)."""
    if cfg.text.kind == "mct":
        from students.mct import MCtTextTower

        t = cfg.text
        return MCtTextTower(
            embed_dim=cfg.embed_dim,
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.heads,
            layers=t.layers,
            mlp_ratio=t.mlp_ratio,
            kernel_size=t.mixer_kernel_size,
            causal=t.causal,
            quick_gelu=cfg.quick_gelu,
        )
    return _build_text_tower(cfg.embed_dim, cfg.open_clip_model_cfg()["text_cfg"], quick_gelu=cfg.quick_gelu)


class CLIPStudent(nn.Module):
    """A two-tower CLIP student whose state dict matches open_clip's `CustomTextCLIP`.

    `CLIPStudent(cfg)` with a `cfg.multimodal` section returns a `students.coca.CoCaStudent` (the subclass with
    open_clip's CoCa decoder), the way `pathlib.Path(...)` returns a `PosixPath`: every place that builds a
    student from a config (registry, `load_student`, inheritance, pruning) then gets the right model.

    Args:
        cfg: the architecture.

    Attributes:
        visual: image tower (open_clip `TimmModel` or `VisionTransformer`).
        text: text tower (open_clip `TextTransformer` or `students.mct.MCtTextTower`).
        logit_scale: learnable log of the contrastive temperature, as in open_clip.
        caption_loss_enabled: whether the student has a captioning loss (`forward_train`; CoCa students only).
    """

    caption_loss_enabled: bool = False

    def __new__(cls, cfg: StudentCfg | None = None, *args: Any, **kwargs: Any) -> CLIPStudent:
        # NOTE: cfg defaults to None because copy/pickle re-create modules with `cls.__new__(cls)` alone.
        if cls is CLIPStudent and cfg is not None and cfg.multimodal is not None:
            from students.coca import CoCaStudent

            cls = CoCaStudent
        return super().__new__(cls)

    def __init__(self, cfg: StudentCfg) -> None:
        super().__init__()
        self.cfg = cfg
        vision_cfg = cfg.open_clip_model_cfg()["vision_cfg"]
        self.visual = _build_vision_tower(cfg.embed_dim, vision_cfg, quick_gelu=cfg.quick_gelu)
        if cfg.image.apple_vit:
            make_apple_vit(self.visual)
        self.text = build_text_tower(cfg)
        self.logit_scale = nn.Parameter(torch.ones([]) * cfg.init_logit_scale)
        # NOTE: non-persistent: preprocessing lives in the config, so state dicts stay open_clip-identical.
        self.register_buffer("pixel_mean", torch.tensor(cfg.image.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.image.std).view(1, 3, 1, 1), persistent=False)

    # -- properties ---------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Input resolution."""
        return self.cfg.image.image_size

    @property
    def context_length(self) -> int:
        """Token sequence length."""
        return self.cfg.text.context_length

    @property
    def embed_dim(self) -> int:
        """Embedding dimension."""
        return self.cfg.embed_dim

    @property
    def mean(self) -> tuple[float, float, float]:
        """Normalisation mean."""
        return self.cfg.image.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Normalisation std."""
        return self.cfg.image.std

    @property
    def interpolation(self) -> str:
        """Resize interpolation."""
        return self.cfg.image.interpolation

    @property
    def is_reparameterized(self) -> bool:
        """Whether any re-parameterisable block has been folded (its state-dict keys then differ)."""
        return any("reparam_conv" in k for k in self.state_dict())

    # -- encoding -----------------------------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixels (`uint8` or float in [0, 1], `[B, 3, H, W]`) to the normalised float input of `encode_image`."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise TypeError(f"expected uint8 or float pixels, got {x.dtype}")
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed ALREADY normalised images `[B, 3, H, W]` (open_clip semantics) -> `[B, D]`."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed tokens `[B, L]` -> `[B, D]`."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """CLIP BPE tokens `[N, context_length]` (open_clip `SimpleTokenizer`, works offline)."""
        if isinstance(texts, str):
            texts = [texts]
        return _tokenizer(self.context_length)(list(texts))

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Return `{"image_features", "text_features", "logit_scale"}` (features L2-normalised, scale = exp).

        Args:
            image: normalised images `[B, 3, H, W]` (call `normalize` on raw pixels first).
            text: tokens `[B, L]`.
        """
        out: dict[str, torch.Tensor] = {}
        if image is not None:
            if image.dtype == torch.uint8:
                raise TypeError("CLIPStudent.forward expects normalised float images: call student.normalize(pixels)")
            out["image_features"] = self.encode_image(image, normalize=True)
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        out["logit_scale"] = self.logit_scale.exp()
        return out

    # -- utilities ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> CLIPStudent:
        """Fold every MobileOne/RepMixer/RepCPE (and MCt RepMixer) block in place; returns self.

        Same walk as `timm.utils.model.reparameterize_model`: a child with `fuse()` is replaced by its result, one
        with `reparameterize()` (or `switch_to_deploy()`) is folded in place. Use it on an `eval()` model: folding
        bakes in the BatchNorm running statistics.
        """

        def _fold(module: nn.Module) -> None:
            for child_name, child in list(module.named_children()):
                if hasattr(child, "fuse"):
                    child = child.fuse()
                    setattr(module, child_name, child)
                elif hasattr(child, "reparameterize"):
                    child.reparameterize()
                elif hasattr(child, "switch_to_deploy"):
                    child.switch_to_deploy()
                _fold(child)

        _fold(self)
        return self

    def param_counts(self) -> dict[str, int]:
        """Parameter counts `{"image", "text", "total"}` (total includes `logit_scale`)."""
        image = sum(p.numel() for p in self.visual.parameters())
        text = sum(p.numel() for p in self.text.parameters())
        return {"image": image, "text": text, "total": sum(p.numel() for p in self.parameters())}

    def extra_repr(self) -> str:
        return f"name={self.cfg.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"
