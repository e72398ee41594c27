"""The `CLIPStudent` model (open_clip `CustomTextCLIP` state-dict keys) and the one re-parameterisation walk.

A student is an image tower plus a text tower that embed into one space. Both towers are built with open_clip's own
tower builders (through the adapter `mcd_common._open_clip`), so `CLIPStudent.state_dict()` has exactly the keys of
`open_clip.CustomTextCLIP` (`visual.*`, `text.*`, `logit_scale`) and a saved student loads with
`open_clip.create_model("local-dir:...")`. The one exception is the MobileCLIP-S0 "MCt" text tower
(`students/mct.py`), which open_clip does not implement (mlfoundations/open_clip#958). Hugging Face text towers
(`students/hf_text.py`) have open_clip `HFTextEncoder` keys. CoCa students are the
subclass `students.coca.CoCaStudent`; `students.factory.build_student` picks the class from the config.

References:
    open_clip: https://github.com/mlfoundations/open_clip (src/open_clip/model.py)
    MobileCLIP (CVPR'24) / MobileCLIP2 (TMLR'25): https://github.com/apple/ml-mobileclip
    timm re-parameterisation: https://github.com/huggingface/pytorch-image-models (timm/models/_manipulate.py)
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from timm.models import reparameterize_model as timm_reparameterize_model
from torch import nn

from mcd_common._open_clip import build_text_tower as open_clip_text_tower
from mcd_common._open_clip import build_vision_tower, padding_trimmable, text_forward_without_padding
from students.config import StudentCfg
from students.hf_text import HFTextTower, HFTokenizer, check_hf_dir
from students.mct import MCtTextTower

_logger = logging.getLogger(__name__)

__all__ = ["CLIPStudent", "build_text_tower", "make_apple_vit", "reparameterize_model"]

_FOLD_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterize_model(model: nn.Module) -> int:
    """Fold every re-parameterisable block of `model` in place; returns how many blocks were folded.

    This is timm's `reparameterize_model` walk (children only, the root is not folded): a child with `fuse()` is
    replaced by its result, one with `reparameterize()` or `switch_to_deploy()` is folded in place (MobileOne,
    RepMixer, RepCPE, our MCt RepMixer). Call it on an `eval()` model: folding bakes in the BatchNorm running
    statistics. `CLIPStudent.reparameterize` and `export.prepare` both use it.
    """
    # NOTE: counted before the walk, over the same modules timm visits (it recurses into each child it folded).
    folded = sum(1 for m in model.modules() if m is not model and any(hasattr(m, a) for a in _FOLD_METHODS))
    timm_reparameterize_model(model, inplace=True)
    return folded


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    # NOTE: cached per context length: loading the BPE merges takes a noticeable fraction of a second, and the
    # tokenizer is stateless. Kept off the module so deepcopy/pickling a student stays cheap.
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
    """Build the text tower of `cfg` (open_clip TextTransformer, MCt, or a Hugging Face encoder with random weights:
    `students.factory.create_student` loads a new student's pretrained encoder)."""
    if cfg.text.kind == "hf":
        t = cfg.text
        check_hf_dir(t.hf_model_dir, student=f"student {cfg.name!r}")
        return HFTextTower(
            cfg.embed_dim, t.hf_model_dir, pooling=t.hf_pooling, proj=t.hf_proj, context_length=t.context_length
        )
    if cfg.text.kind == "mct":
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
    return open_clip_text_tower(cfg.embed_dim, cfg.open_clip_model_cfg()["text_cfg"], quick_gelu=cfg.quick_gelu)


class CLIPStudent(nn.Module):
    """A two-tower CLIP student whose state dict matches open_clip's `CustomTextCLIP`.

    Build students through `students.create_student` / `students.build_student(cfg)`, which choose the class
    (`CoCaStudent` for configs with a `multimodal` section) as open_clip's `create_model` does.

    Args:
        cfg: the architecture (without a `multimodal` section: CoCa students are `students.coca.CoCaStudent`).

    Attributes:
        visual: image tower (open_clip `TimmModel` or `VisionTransformer`).
        text: text tower (open_clip `TextTransformer` or `students.mct.MCtTextTower`).
        logit_scale: learnable log of the contrastive temperature, as in open_clip.
        caption_loss_enabled: whether the student has a captioning loss (`forward_train`; CoCa students only).
        locked_eval_modules: submodules a tower lock froze (`students.lock`); `train()` keeps them in eval mode.
    """

    caption_loss_enabled: bool = False

    def __init__(self, cfg: StudentCfg) -> None:
        if cfg.multimodal is not None and type(self) is CLIPStudent:
            # NOTE: a plain CLIPStudent of a CoCa config would silently lack the decoder and its weights.
            raise ValueError(f"student {cfg.name!r} has a text decoder: build it with students.build_student(cfg)")
        super().__init__()
        self.cfg = cfg
        vision_cfg = cfg.open_clip_model_cfg()["vision_cfg"]
        self.visual = build_vision_tower(cfg.embed_dim, vision_cfg, quick_gelu=cfg.quick_gelu)
        if cfg.image.apple_vit:
            make_apple_vit(self.visual)
        self.text = build_text_tower(cfg)
        self.logit_scale = nn.Parameter(torch.ones([]) * cfg.init_logit_scale)
        self.locked_eval_modules: tuple[str, ...] = ()
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

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True, trim_padding: bool = False) -> torch.Tensor:
        """Embed tokens `[B, L]` -> `[B, D]`.

        With `trim_padding`, a causal open_clip text tower runs only up to the batch's longest caption (the same
        features, to float rounding, at a fraction of the cost; `mcd_common._open_clip.text_forward_without_padding`);
        other towers (MCt, Hugging Face, CoCa, masked or compiled ones) run as usual. Training uses it; exported and
        traced paths do not (its length depends on the data).
        """
        if trim_padding and padding_trimmable(self.text):
            features = text_forward_without_padding(self.text, tokens)
        else:
            features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """Tokens `[N, context_length]` of this student's tokenizer (see `text_tokenizer`), offline."""
        if isinstance(texts, str):
            texts = [texts]
        return self.text_tokenizer()(list(texts))

    def text_tokenizer(self) -> SimpleTokenizer | HFTokenizer:
        """The student's tokenizer as a standalone, picklable callable (what data-loader workers receive).

        CLIP BPE (open_clip `SimpleTokenizer`) for transformer and MCt towers; the Hugging Face directory's own
        tokenizer for `hf` towers.
        """
        if isinstance(self.text, HFTextTower):
            return self.text.tokenizer
        return _tokenizer(self.context_length)

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
    def train(self, mode: bool = True) -> CLIPStudent:
        """Set training mode; the submodules of a locked tower part (`locked_eval_modules`) stay in eval mode.

        NOTE: so a locked tower's BatchNorm statistics do not drift and its dropout is off, without swapping modules
        (open_clip's `freeze_batch_norm_2d` replaces them, which changes the state-dict keys).
        """
        super().train(mode)
        if mode and self.locked_eval_modules:
            modules = dict(self.named_modules())
            for name in self.locked_eval_modules:
                if name in modules:  # a folded (re-parameterised) block may have replaced it
                    modules[name].eval()
        return self

    @torch.no_grad()
    def reparameterize(self) -> CLIPStudent:
        """Fold every MobileOne/RepMixer/RepCPE (and MCt RepMixer) block in place; returns self.

        See `reparameterize_model`. Use it on an `eval()` model: folding bakes in the BatchNorm running statistics.
        """
        reparameterize_model(self)
        return self

    def param_counts(self) -> dict[str, int]:
        """Parameter counts `{"image", "text", "total"}` (total includes `logit_scale`)."""
        image = sum(p.numel() for p in self.visual.parameters())
        text = sum(p.numel() for p in self.text.parameters())
        return {"image": image, "text": text, "total": sum(p.numel() for p in self.parameters())}

    def extra_repr(self) -> str:
        return f"name={self.cfg.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"
