"""Synthetic-caption generators for reinforced datasets (``syn.json``).

DataCompDR stores 5 CoCa captions per image (``coca_ViT-L-14`` / ``mscoco_finetuned_laion2B-s13B-b90k``, top-p 0.9,
cut at the end-of-text token and then at the first ".") and MobileCLIP2 adds captioners under ``syn_text_<tag>``
keys (apple/ml-mobileclip-dr ``scripts/gen.py`` caption mode; apple/ml-mobileclip README). Sources here:

- open_clip CoCa models, including ``local-dir:`` CoCa checkpoints trained with this toolkit. open_clip 3.3.0 disables
  ``CoCa.generate`` when transformers >= 5 is installed (it imports the removed ``BeamSearchScorer``), so the
  top-p loop of ``CoCa.generate(generation_type="top_p")`` is re-implemented over ``CoCa.forward`` below, with the
  same minimum length (5) and forced end-of-text at ``max_len``;
- Hugging Face image-to-text models: BLIP (``BlipForConditionalGeneration``) and GIT (``AutoModelForCausalLM``),
  sampled with ``generate(do_sample=True, top_p=...)``.

Empty captions (e.g. a sample whose first sentence is empty) are regenerated with a derived seed up to ``retries``
times; if still missing after that, they are dropped, so an image may come back with fewer than ``num_captions``
captions (never with empty strings).
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING

import torch
from open_clip.coca_model import CoCa
from torch import nn

from mcd_common import UsageError
from mcd_common._open_clip import coca_encode_image

from ._hf import hf_load_error, hf_location
from ._open_clip_loader import load_open_clip
from .preprocess import (
    checkpoint_preprocess,
    interpolation_from_resample,
    prepare_pixels,
    resolve_preprocess,
)
from .registry import CaptionerCfg
from .teacher import TextTokenizer

if TYPE_CHECKING:  # annotations only: transformers is imported when a Hugging Face captioner is built
    from transformers import PreTrainedTokenizerBase

_logger = logging.getLogger(__name__)

__all__ = [
    "Captioner",
    "HFCaptioner",
    "OpenClipCaptioner",
    "build_hf_captioner",
    "build_open_clip_captioner",
    "clean_caption",
]

# A fixed odd stride between retry seeds so retries never reuse a stream of a nearby user seed.
_RETRY_SEED_STRIDE = 1_000_003


def clean_caption(text: str) -> str:
    """MobileCLIP's post-processing: keep the first sentence (cut at the first "."), collapse whitespace."""
    return " ".join(text.split(".", 1)[0].split())


class Captioner(nn.Module):
    """A frozen image captioner: ``[B, 3, H, W]`` pixels in, ``num_captions`` strings per image out.

    Subclasses implement ``_sample(x, seed, top_p, max_len) -> list[str]`` on normalised pixels (one caption per
    row).

    Attributes:
        cfg: Resolved config.
        name: ``cfg.name``.
        tag: ``syn.json`` key suffix (``""`` for ``syn_text``).
        image_size: Square input resolution.
    """

    def __init__(self, cfg: CaptionerCfg) -> None:
        super().__init__()
        if cfg.image_size is None or cfg.mean is None or cfg.std is None or cfg.interpolation is None:
            raise ValueError(f"captioner {cfg.name!r}: preprocessing must be resolved before building: {cfg}")
        self.cfg = cfg
        self.name = cfg.name
        self.tag = cfg.tag
        self.image_size = int(cfg.image_size)
        self.interpolation = cfg.interpolation
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32), persistent=False)

    @property
    def syn_key(self) -> str:
        """The ``syn.json`` key this captioner writes: ``syn_text`` or ``syn_text_<tag>``."""
        return f"syn_text_{self.tag}" if self.tag else "syn_text"

    def train(self, mode: bool = True) -> Captioner:
        """No-op: a captioner always stays in eval mode."""
        return super().train(False)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 / ``[0, 1]`` pixels -> normalised float at ``image_size``."""
        return prepare_pixels(pixels, self.image_size, self.interpolation, self.mean, self.std)

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        num_captions: int,
        *,
        seed: int = 0,
        top_p: float = 0.9,
        max_len: int = 30,
        retries: int = 3,
    ) -> list[list[str]]:
        """Sample captions for a batch of images.

        Deterministic for a given ``seed``, batch and device. All ``B * num_captions`` samples of a round are drawn
        in one batched call.

        Args:
            pixels: ``[B, 3, H, W]`` uint8 or float in ``[0, 1]``.
            num_captions: Captions per image.
            seed: Sampling seed.
            top_p: Nucleus sampling mass.
            max_len: Maximum generated length in tokens (including start/end tokens for CoCa).
            retries: Extra sampling rounds for images whose captions came out empty.

        Returns:
            ``B`` lists of up to ``num_captions`` non-empty, stripped first sentences.
        """
        if num_captions < 0:
            raise UsageError(f"num_captions must be >= 0, got {num_captions}")
        x = self.prepare(pixels)
        batch = x.shape[0]
        captions: list[list[str]] = [[] for _ in range(batch)]
        for attempt in range(retries + 1):
            missing = [num_captions - len(c) for c in captions]
            rows = [i for i in range(batch) if missing[i] > 0]
            if not rows:
                break
            counts = torch.tensor([missing[i] for i in rows], device=x.device)
            # [sum(missing), 3, S, S]: every image repeated once per caption it still needs
            x_rep = x[torch.tensor(rows, device=x.device)].repeat_interleave(counts, dim=0)
            texts = self._sample(x_rep, seed + attempt * _RETRY_SEED_STRIDE, top_p, max_len)
            owners = [i for i, n in zip(rows, counts.tolist(), strict=True) for _ in range(n)]
            for owner, text in zip(owners, texts, strict=True):
                text = clean_caption(text)
                if text:
                    captions[owner].append(text)
        dropped = sum(num_captions - len(c) for c in captions)
        if dropped:
            _logger.warning("captioner %s: dropped %d empty captions after %d retries", self.name, dropped, retries)
        return captions

    def _sample(self, x: torch.Tensor, seed: int, top_p: float, max_len: int) -> list[str]:
        raise NotImplementedError


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens with mass >= ``top_p``.

    Same rule as ``transformers.TopPLogitsWarper`` (the warper open_clip's CoCa uses): a token is kept when the
    probability mass of strictly more likely tokens is below ``top_p``, so the argmax always survives.

    Args:
        logits: ``[N, V]``.
        top_p: In ``(0, 1]``.

    Returns:
        ``[N, V]`` logits with removed tokens set to ``-inf``.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    remove_sorted = probs.cumsum(dim=-1) - probs >= top_p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


class OpenClipCaptioner(Captioner):
    """An open_clip CoCa captioner with top-p sampling (see the module docstring for why the loop lives here)."""

    def __init__(self, cfg: CaptionerCfg, model: nn.Module, tokenizer: TextTokenizer, min_len: int = 5) -> None:
        super().__init__(cfg)
        if not isinstance(model, CoCa):
            raise UsageError(f"captioner {cfg.name!r}: {cfg.arch!r} is not a CoCa model (no text decoder)")
        self.model = model
        self.tokenizer = tokenizer
        self.min_len = min_len
        self.sot_id = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot_id = int(getattr(tokenizer, "eot_token_id", 49407))
        self.pad_id = int(getattr(model, "pad_id", 0))
        # The decoder's causal mask and the text tower's positions bound the sequence length.
        self.max_context = int(model.context_length)
        self.requires_grad_(False)
        self.eval()

    def _sample(self, x: torch.Tensor, seed: int, top_p: float, max_len: int) -> list[str]:
        model = self.model
        max_len = min(max_len, self.max_context)
        if max_len <= self.min_len:
            raise UsageError(f"max_len must exceed the minimum caption length {self.min_len}, got {max_len}")
        gen = torch.Generator(device=x.device).manual_seed(seed)
        image_latent, image_embs = coca_encode_image(model, x)  # encode once, reuse at every step
        out = torch.full((x.shape[0], 1), self.sot_id, dtype=torch.long, device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for cur_len in range(1, max_len):
            # [N, L, V] -> next-token logits [N, V]
            logits = model(x, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"]
            logits = logits[:, -1].float()
            if cur_len < self.min_len:
                logits[:, self.eot_id] = float("-inf")  # open_clip's MinLengthLogitsProcessor(5)
            if cur_len == max_len - 1:
                nxt = torch.full_like(done, self.eot_id, dtype=torch.long)  # force EOT at the length limit
            else:
                probs = top_p_filter(logits, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == self.eot_id
            if bool(done.all()):
                break
        return [self._decode(row) for row in out.tolist()]

    def _decode(self, ids: list[int]) -> str:
        ids = ids[1:]  # drop SOT
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:  # open_clip's HFTokenizer wraps a transformers tokenizer
            return self.tokenizer.tokenizer.decode(ids, skip_special_tokens=True)
        return decode(ids)


class HFCaptioner(Captioner):
    """A Hugging Face image-to-text captioner (BLIP, GIT) sampled with ``generate(do_sample=True, top_p=...)``."""

    def __init__(self, cfg: CaptionerCfg, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(cfg)
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()

    def _sample(self, x: torch.Tensor, seed: int, top_p: float, max_len: int) -> list[str]:
        devices = [x.device] if x.device.type == "cuda" else []
        # HF generate draws from the global RNG; fork it so seeding here does not disturb the caller's stream.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            ids = self.model.generate(
                pixel_values=x,
                do_sample=True,
                top_p=top_p,
                top_k=0,  # pure nucleus sampling, as for CoCa (HF's default top_k=50 would also truncate)
                max_length=max_len,
                num_return_sequences=1,
            )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def build_hf_captioner(cfg: CaptionerCfg) -> HFCaptioner:
    """Load a Hugging Face BLIP / GIT captioner (``cfg.source == "hf"``) and resolve its preprocessing.

    Raises:
        UsageError: an unsupported model type, or weights holding pickled objects.
        RuntimeError: The model cannot be loaded (offline and not cached); names the local-directory option.
    """
    # NOTE: transformers is a heavy import (~2 s); only Hugging Face captioners need it.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, BlipForConditionalGeneration

    location, local_only = hf_location("captioner", cfg.name, cfg.arch, cfg.weights)
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local_only)
        if config.model_type == "blip":
            model = BlipForConditionalGeneration.from_pretrained(location, local_files_only=local_only)
        elif config.model_type == "git":
            model = AutoModelForCausalLM.from_pretrained(location, local_files_only=local_only)
        else:
            raise UsageError(f"captioner {cfg.name!r}: unsupported model type {config.model_type!r} (blip, git)")
        processor = AutoProcessor.from_pretrained(location, local_files_only=local_only)
    except (OSError, pickle.UnpicklingError) as err:
        raise hf_load_error("captioner", cfg.name, location, err) from err
    model.eval().requires_grad_(False)
    image_processor = processor.image_processor
    found = checkpoint_preprocess(
        model.config.vision_config.image_size,
        image_processor.image_mean,
        image_processor.image_std,
        interpolation_from_resample(getattr(image_processor, "resample", None)),
    )
    return HFCaptioner(resolve_preprocess(cfg, found), model, processor.tokenizer)


def build_open_clip_captioner(cfg: CaptionerCfg) -> OpenClipCaptioner:
    """Load an open_clip CoCa captioner (``cfg.source == "open_clip"``) and resolve its preprocessing."""
    loaded = load_open_clip(
        kind="captioner",
        name=cfg.name,
        arch=cfg.arch,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        allow_random=cfg.allow_random,
        image_size=cfg.image_size,
        flag="--captioner_weights",
    )
    return OpenClipCaptioner(resolve_preprocess(cfg, loaded.preprocess), loaded.model, loaded.tokenizer)
