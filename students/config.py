"""Student architecture configs: `StudentCfg` with its image, text and (CoCa) decoder sections, and open_clip's form.

A config is frozen data, enough to rebuild a student without the registry; it is written into every saved student
and checkpoint. `StudentCfg.open_clip_model_cfg()` / `open_clip_preprocess_cfg()` give open_clip's config dicts
(so a saved student loads with `open_clip.create_model("local-dir:...")`), and `StudentCfg.from_open_clip` reads
them back. Preprocessing (image size, mean, std, interpolation, resize mode) is resolved here, in `ImageTowerCfg`,
and nowhere else in `students`. A config with a `multimodal` section describes a CoCa student
(`students.factory.build_student` then builds a `students.coca.CoCaStudent`).

References:
    open_clip model configs: https://github.com/mlfoundations/open_clip (src/open_clip/model.py, model_configs/)
    MobileCLIP (CVPR'24) / MobileCLIP2 (TMLR'25): https://github.com/apple/ml-mobileclip
    CoCa (Yu et al. 2022, arXiv:2205.01917); open_clip `coca_model.py`
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from mcd_common import UsageError

_logger = logging.getLogger(__name__)

__all__ = [
    "ImageTowerCfg",
    "TextTowerCfg",
    "TextDecoderCfg",
    "StudentCfg",
    "MCT_OPEN_CLIP_MARKER",
    "APPLE_VIT_TIMM_NAME",
    "HF_POOLERS",
    "OPENAI_MEAN",
    "OPENAI_STD",
]

ConfigDict = dict[str, object]
"""A JSON-like config section (open_clip `vision_cfg`, `text_cfg`, ...)."""

OPENAI_MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)  # type: ignore[assignment]
OPENAI_STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)  # type: ignore[assignment]

# NOTE: written into the open_clip `text_cfg` of MCt students. open_clip passes text_cfg to `CLIPTextCfg(**text_cfg)`,
# so pointing open_clip at such a directory fails with "unexpected keyword argument '<this name>'", which tells the
# user what to do instead. `StudentCfg.from_open_clip` recognises the key.
MCT_OPEN_CLIP_MARKER = "mct_text_tower_is_not_in_open_clip_load_with_students_load_student"

# NOTE: the one timm architecture with an Apple-faithful variant (ImageTowerCfg.apple_vit)
APPLE_VIT_TIMM_NAME = "vit_base_mci_224"

HF_POOLERS: dict[str, str] = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
"""`TextTowerCfg.hf_pooling` -> open_clip's `hf_pooler_type` (`open_clip/hf_model.py`, 3.3.0: `MeanPooler` is the
masked mean, `ClsLastHiddenStatePooler` the first token's last hidden state)."""


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

    def open_clip_vision_cfg(self) -> ConfigDict:
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
        cfg: ConfigDict = {
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
    """Text tower: an open_clip text transformer, the MobileCLIP-S0 MCt tower (RepMixer + transformer + RepMixer),
    or a pretrained Hugging Face encoder (`kind="hf"`, `students.hf_text.HFTextTower`)."""

    kind: Literal["transformer", "mct", "hf"] = "transformer"
    """`transformer` (open_clip TextTransformer), `mct` (students.mct.MCtTextTower) or `hf` (a Hugging Face encoder
    directory, `students.hf_text.HFTextTower`)."""
    context_length: int = 77
    """Token sequence length."""
    vocab_size: int = 49408
    """Vocabulary size (CLIP BPE: 49408). Unused by `hf` towers (their vocabulary is the directory's)."""
    width: int = 512
    """Token width (`hf`: unused, the encoder's `hidden_size`)."""
    heads: int = 8
    """Attention heads (`hf`: unused)."""
    layers: int = 12
    """Transformer layers (MCt: the layers between its two RepMixer blocks; `hf`: unused)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(width * mlp_ratio)."""
    causal: bool = True
    """Causal attention mask (open_clip `no_causal_mask = not causal`)."""
    mixer_kernel_size: int = 11
    """MCt only: RepMixer convolution kernel over the sequence."""
    embed_cls: bool = False
    """Append a learned CLS token whose output is the text embedding (CoCa); adds one position."""
    hf_model_dir: str | None = None
    """`hf` only: a local Hugging Face encoder directory (`save_pretrained` output: `config.json`, tokenizer files
    and, for a new student, the weights), e.g. a sentence-transformers model. Never a hub id: everything loads
    offline. A saved student holds its own copy of the config and tokenizer and points here at itself."""
    hf_pooling: Literal["mean", "cls"] = "mean"
    """`hf` only: `mean` (masked mean of the last hidden states, sentence-transformers' mean pooling) or `cls`
    (the first token's last hidden state)."""
    hf_proj: Literal["linear", "mlp", "none"] = "linear"
    """`hf` only: projection to `embed_dim`, as open_clip's `hf_proj_type`: `linear` (no bias), `mlp` (two bias-free
    linears with GELU, hidden (width + embed_dim) // 2), or `none` (the encoder width must equal `embed_dim`)."""

    def open_clip_text_cfg(self) -> ConfigDict:
        """The open_clip `text_cfg` dict (MCt towers get a marker key that open_clip rejects with a clear name).

        An `hf` tower gives open_clip's `hf_model_name` form (`HFTextEncoder`, with its pooler and projection names),
        pointing at `hf_model_dir`.
        """
        if self.kind == "hf":
            return {
                "context_length": self.context_length,
                "hf_model_name": self.hf_model_dir,
                "hf_tokenizer_name": self.hf_model_dir,
                "hf_model_pretrained": False,
                "hf_pooler_type": HF_POOLERS[self.hf_pooling],
                "hf_proj_type": None if self.hf_proj == "none" else self.hf_proj,
            }
        cfg: ConfigDict = {
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


def _tuple3(value: Iterable[float]) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in value)
    return r, g, b


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
            raise UsageError("image.attentional_pool needs a native ViT image tower (timm_model_name=None)")
        if self.text.embed_cls and self.text.kind != "transformer":
            raise UsageError("text.embed_cls needs the open_clip transformer text tower (kind='transformer')")
        if self.image.apple_vit and self.image.timm_model_name != APPLE_VIT_TIMM_NAME:
            raise UsageError(f"image.apple_vit needs timm_model_name={APPLE_VIT_TIMM_NAME!r}")
        if self.text.hf_model_dir is not None and self.text.kind != "hf":
            # NOTE: otherwise a Hugging Face directory passed to a CLIP-BPE student would be silently ignored
            raise UsageError(
                f"student {self.name!r}: hf_model_dir is only for Hugging Face text towers (text kind 'hf'), "
                f"its text tower is {self.text.kind!r}"
            )
        if self.multimodal is not None:
            self._check_coca(self.multimodal)

    def _check_coca(self, m: TextDecoderCfg) -> None:
        # NOTE: open_clip's CoCa feeds attentional-pool outputs (embed_dim wide) and text tokens (text width) to
        # cross-/self-attention blocks of the decoder width, with no projections in between.
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
            raise UsageError(f"invalid CoCa student {self.name!r}: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> ConfigDict:
        """JSON-serialisable dict (tuples become lists in JSON; `from_dict` restores them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> StudentCfg:
        """Inverse of `to_dict`.

        Raises:
            UsageError: unknown keys (e.g. a config written by a newer version).
        """
        data = dict(data)
        image = dict(data.pop("image", None) or {})
        text = dict(data.pop("text", None) or {})
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
                raise UsageError(f"unknown StudentCfg {where + ' ' if where else ''}key(s): {sorted(unknown)}")
        for key in ("mean", "std"):
            if key in image:
                image[key] = _tuple3(image[key])
        return cls(
            image=ImageTowerCfg(**image),
            text=TextTowerCfg(**text),
            multimodal=None if multimodal is None else TextDecoderCfg(**decoder),
            **data,
        )

    def with_overrides(self, **overrides: object) -> StudentCfg:
        """Return a copy with flat overrides applied (None values are dropped).

        A key is looked up in `StudentCfg`, then in whichever tower config uniquely has it (`image_size`,
        `context_length`, `timm_model_name`, `heads`, ...). Names both towers have (`width`, `layers`, `mlp_ratio`)
        must be prefixed: `image_width=...`, `text_layers=...`. The CoCa decoder is reached only with a `decoder_`
        prefix (`decoder_layers=...`).

        Raises:
            UsageError: an unknown or ambiguous key, or a `decoder_` key for a student without a decoder.
        """
        sections: dict[str, ConfigDict] = {"top": {}, "image": {}, "text": {}, "decoder": {}}
        for key, value in overrides.items():
            if value is not None:
                section, field_name = self._override_target(key)
                sections[section][field_name] = value
        top, image, text, decoder = (sections[k] for k in ("top", "image", "text", "decoder"))
        for key in ("mean", "std"):
            if key in image:
                image[key] = _tuple3(image[key])
        if decoder:
            assert self.multimodal is not None  # _override_target refuses decoder_ keys otherwise
            top["multimodal"] = dataclasses.replace(self.multimodal, **decoder)
        return dataclasses.replace(
            self,
            image=dataclasses.replace(self.image, **image),
            text=dataclasses.replace(self.text, **text),
            **top,
        )

    def _override_target(self, key: str) -> tuple[str, str]:
        """`(section, field)` that the flat override `key` sets (see `with_overrides`)."""
        top_fields = {f.name for f in dataclasses.fields(self)} - {"image", "text", "multimodal"}
        image_fields = {f.name for f in dataclasses.fields(ImageTowerCfg)}
        text_fields = {f.name for f in dataclasses.fields(TextTowerCfg)}
        decoder_fields = {f.name for f in dataclasses.fields(TextDecoderCfg)}
        if key in top_fields:
            return "top", key
        if key in image_fields and key in text_fields:
            raise UsageError(f"override {key!r} is ambiguous: use image_{key}=... or text_{key}=...")
        if key in image_fields:
            return "image", key
        if key in text_fields:
            return "text", key
        if key.startswith("image_") and key[6:] in image_fields:
            return "image", key[6:]
        if key.startswith("text_") and key[5:] in text_fields:
            return "text", key[5:]
        if key.startswith("decoder_") and key[8:] in decoder_fields:
            if self.multimodal is None:
                raise UsageError(f"override {key!r}: student {self.name!r} has no text decoder (not a CoCa)")
            return "decoder", key[8:]
        raise UsageError(f"unknown student override {key!r}")

    # ----------------------------------------------------------------------------------------------------------------
    def open_clip_model_cfg(self) -> ConfigDict:
        """open_clip model config: `{"embed_dim", "vision_cfg", "text_cfg", "custom_text": true}`.

        CoCa students add `multimodal_cfg` (which makes open_clip build a `CoCa`) and `output_tokens: true` in both
        tower configs, since the decoder reads the towers' token outputs.
        """
        vision_cfg, text_cfg = self.image.open_clip_vision_cfg(), self.text.open_clip_text_cfg()
        cfg: ConfigDict = {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
            "custom_text": True,
        }
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        if self.multimodal is not None:
            vision_cfg["output_tokens"] = True
            text_cfg["output_tokens"] = True
            cfg["multimodal_cfg"] = self.open_clip_multimodal_cfg()
        return cfg

    def open_clip_multimodal_cfg(self) -> ConfigDict:
        """open_clip `multimodal_cfg` of the CoCa decoder (context length and vocabulary are the text tower's)."""
        if self.multimodal is None:
            raise ValueError(f"student {self.name!r} has no text decoder (not a CoCa)")
        return {
            "context_length": self.text.context_length,
            "vocab_size": self.text.vocab_size,
            "width": self.multimodal.width,
            "heads": self.multimodal.heads,
            "layers": self.multimodal.layers,
        }

    def open_clip_preprocess_cfg(self) -> ConfigDict:
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
        cls,
        model_cfg: Mapping[str, object],
        preprocess_cfg: Mapping[str, object] | None = None,
        *,
        name: str = "open_clip",
    ) -> StudentCfg:
        """Build a StudentCfg from an open_clip model config (+ optional preprocess config).

        Covers timm and native-ViT image towers (with or without attentional pooling), transformer (or our MCt)
        text towers, Hugging Face text towers (`hf_model_name` a local directory; mean or last-hidden-state CLS
        pooling), and CoCa (`multimodal_cfg`).

        Raises:
            UsageError: any other open_clip feature (ModifiedResNet, BERT pooler-output pooling, ...), naming the key.
        """
        extra_top = set(model_cfg) - {
            "embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "multimodal_cfg"
        }  # fmt: skip
        if extra_top:
            raise UsageError(f"unsupported open_clip model_cfg key(s) for a student: {sorted(extra_top)}")
        vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
        is_coca = "multimodal_cfg" in model_cfg
        # NOTE: token outputs are what a CoCa decoder reads; a plain student returns embeddings only
        for tower, tower_cfg in (("vision_cfg", vision), ("text_cfg", text)):
            if bool(tower_cfg.pop("output_tokens", is_coca)) != is_coca:
                raise UsageError(f"unsupported open_clip {tower} output_tokens (a student only has it in CoCa)")
        text_cfg = _text_from_open_clip(text)
        return cls(
            name=name,
            embed_dim=int(model_cfg["embed_dim"]),
            image=_image_from_open_clip(vision, dict(preprocess_cfg or {})),
            text=text_cfg,
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
            multimodal=_decoder_from_open_clip(model_cfg["multimodal_cfg"], text_cfg) if is_coca else None,
        )


def _image_size(size: object) -> int:
    # open_clip sizes are an int or an (h, w) pair; students are square
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _image_from_open_clip(vision: ConfigDict, preprocess: ConfigDict) -> ImageTowerCfg:
    """The `ImageTowerCfg` of an open_clip `vision_cfg` plus `preprocess_cfg` (the preprocess values win)."""
    if vision.get("timm_model_name"):
        mapping = ("timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path")
        allowed = set(mapping) | {"image_size", "timm_model_pretrained"}
    else:
        mapping = ("layers", "width", "head_width", "patch_size", "mlp_ratio")
        mapping += ("attentional_pool", "attn_pooler_queries", "attn_pooler_heads")
        allowed = set(mapping) | {"image_size"}
        if not isinstance(vision.get("attentional_pool", False), bool):  # 'parallel'/'cascade' WIP variants
            raise UsageError(f"unsupported open_clip attentional_pool={vision['attentional_pool']!r}")
    unknown = set(vision) - allowed
    if unknown:
        raise UsageError(f"unsupported open_clip vision_cfg key(s) for a student: {sorted(unknown)}")
    kw: ConfigDict = {k: vision[k] for k in mapping if k in vision}
    if isinstance(kw.get("layers"), (list, tuple)):
        raise UsageError("ModifiedResNet image towers (list-valued `layers`) are not supported by students")
    for size in (vision.get("image_size"), preprocess.get("size")):
        if size is not None:
            kw["image_size"] = _image_size(size)
    for key in ("mean", "std"):
        if key in preprocess:
            kw[key] = _tuple3(preprocess[key])
    for key in ("interpolation", "resize_mode"):
        if key in preprocess:
            kw[key] = preprocess[key]
    return ImageTowerCfg(**kw)


def _hf_text_from_open_clip(text: ConfigDict) -> TextTowerCfg:
    """The `TextTowerCfg` of an open_clip Hugging Face `text_cfg` (`hf_model_name`, open_clip's `HFTextEncoder`)."""
    poolings = {v: k for k, v in HF_POOLERS.items()}
    pooler = text.pop("hf_pooler_type", "mean_pooler")  # open_clip's CLIPTextCfg default
    if pooler not in poolings:
        raise UsageError(f"unsupported open_clip hf_pooler_type {pooler!r} for a student (supported: {list(poolings)})")
    proj = text.pop("hf_proj_type", "mlp")  # open_clip's CLIPTextCfg default
    if proj not in ("linear", "mlp", None):
        raise UsageError(f"unsupported open_clip hf_proj_type {proj!r} for a student (linear, mlp or null)")
    kw: ConfigDict = {"kind": "hf", "hf_model_dir": str(text.pop("hf_model_name"))}
    kw.update(hf_pooling=poolings[pooler], hf_proj="none" if proj is None else proj)
    # NOTE: the tokenizer is always the model directory's own; the pretrained flag only matters to open_clip's build
    for ignored in ("hf_tokenizer_name", "hf_model_pretrained", "vocab_size", "width", "heads", "layers"):
        text.pop(ignored, None)
    if "context_length" in text:
        kw["context_length"] = text.pop("context_length")
    if text:
        raise UsageError(f"unsupported open_clip text_cfg key(s) for a student: {sorted(text)}")
    return TextTowerCfg(**kw)


def _text_from_open_clip(text: ConfigDict) -> TextTowerCfg:
    """The `TextTowerCfg` of an open_clip `text_cfg` (our MCt marker key and Hugging Face towers included)."""
    if text.get("hf_model_name"):
        return _hf_text_from_open_clip(text)
    kw: ConfigDict = {}
    mct = text.pop(MCT_OPEN_CLIP_MARKER, None)
    if mct is not None:
        kw["kind"] = "mct"
        kw.update(mct)
    if "no_causal_mask" in text:
        kw["causal"] = not text.pop("no_causal_mask")
    text_map = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "embed_cls")
    unknown = set(text) - set(text_map)
    if unknown:
        raise UsageError(f"unsupported open_clip text_cfg key(s) for a student: {sorted(unknown)}")
    kw.update({k: text[k] for k in text_map if k in text})
    return TextTowerCfg(**kw)


def _decoder_from_open_clip(multimodal_cfg: Mapping[str, object], text: TextTowerCfg) -> TextDecoderCfg:
    """The `TextDecoderCfg` of an open_clip `multimodal_cfg`, checking what students derive from the text tower."""
    m = dict(multimodal_cfg)
    # NOTE: open_clip's MultimodalCfg carries fields its decoder builder never reads; they cannot change the model.
    for unused in ("mlp_ratio", "dim_head", "n_queries", "attn_pooler_heads"):
        m.pop(unused, None)
    for key, ours in (("context_length", text.context_length), ("vocab_size", text.vocab_size)):
        # open_clip's own defaults (MultimodalCfg extends CLIPTextCfg) apply to a missing key
        theirs = m.pop(key, 77 if key == "context_length" else 49408)
        if theirs != ours:
            raise UsageError(f"multimodal_cfg {key}={theirs} differs from the text tower's {ours}: unsupported")
    decoder_map = ("width", "heads", "layers")
    unknown = set(m) - set(decoder_map)
    if unknown:
        raise UsageError(f"unsupported open_clip multimodal_cfg key(s) for a student: {sorted(unknown)}")
    return TextDecoderCfg(**{k: m[k] for k in decoder_map if k in m})
