"""Pretrained Hugging Face text towers: a local `save_pretrained` encoder, pooled and projected to the joint space.

A student whose `TextTowerCfg.kind` is `hf` embeds text with a Hugging Face encoder (BERT, RoBERTa, MPNet, ... e.g.
a sentence-transformers model such as all-MiniLM-L6-v2) read from a local directory, never from the hub. The
tokenizer is the directory's own (`transformers.AutoTokenizer`), padded to the config's context length.

What this follows from open_clip's `hf_model.py` (open_clip_torch 3.3.0, read in the pinned wheel): `HFTextEncoder`
keeps the encoder as `transformer` (built without the BERT pooler layer unless its `cls_pooler` needs it) and the
projection as `proj` (`linear`: one bias-free Linear; `mlp`: bias-free Linear to `(width + embed_dim) // 2`, GELU,
bias-free Linear; identity when the widths are equal and no type is given); the attention mask is
`tokens != pad_token_id`; `MeanPooler` is the masked mean of `last_hidden_state` and `ClsLastHiddenStatePooler` its
first position. The module names are the same here, so the state-dict keys (`text.transformer.*`, `text.proj.*`)
are open_clip's `CustomTextCLIP` keys. Our own parts: a `none` projection that refuses unequal widths (open_clip
then has no `proj` at all), layer groups for `students.lock`, and saving the config + tokenizer into the student
directory (`save_hf_files`) so a saved student rebuilds without the original directory.

transformers is imported inside the functions that need it: it takes seconds to import and only students with a
Hugging Face tower use it.

References:
    open_clip `hf_model.py`: https://github.com/mlfoundations/open_clip (src/open_clip/hf_model.py)
    sentence-transformers mean pooling: https://github.com/UKPLab/sentence-transformers (models/Pooling.py)
    LiT (locked-image tuning): https://arxiv.org/abs/2111.07991
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from mcd_common import UsageError
from mcd_common.files import temp_path

if TYPE_CHECKING:  # annotations only: transformers is imported when a Hugging Face tower is built
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

_logger = logging.getLogger(__name__)

__all__ = ["HF_CONFIG_NAME", "HFTextTower", "HFTokenizer", "check_hf_dir", "load_pretrained_encoder", "save_hf_files"]

HF_CONFIG_NAME = "config.json"
"""The Hugging Face model config file (`save_pretrained`); its presence marks a Hugging Face directory."""
_FLAG_HINT = "create_student(..., hf_model_dir=PATH); CLI: --hf_text_dir PATH"


def check_hf_dir(path: str | os.PathLike | None, *, student: str = "student") -> Path:
    """The local Hugging Face directory `path`, checked to hold a `config.json`.

    Raises:
        UsageError: no path, or not a local directory with a config (a hub id is refused: everything is offline).
    """
    if path is None:
        raise UsageError(
            f"{student}: its text tower is a Hugging Face encoder and no directory was given: pass the directory "
            f"save_pretrained wrote ({_FLAG_HINT})"
        )
    directory = Path(path).expanduser()
    if not (directory / HF_CONFIG_NAME).is_file():
        raise UsageError(
            f"{student}: hf_model_dir {str(path)!r} is not a local Hugging Face model directory (no {HF_CONFIG_NAME}); "
            f"pass the directory save_pretrained wrote, never a hub id ({_FLAG_HINT})"
        )
    return directory


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # NOTE: transformers 5 draws a tqdm bar for every weight load, and logs a "LOAD REPORT" warning listing the BERT
    # pooler weights a mean-pooled tower does not build (expected; any other mismatch raises in the caller).
    from transformers.utils import logging as hf_logging

    shown, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if shown:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=8)
def _config(directory: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"hf_model_dir {directory}: not a readable Hugging Face config ({err})") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(directory: str) -> PreTrainedTokenizerBase:
    # NOTE: cached per directory (a fast tokenizer loads in ~0.1 s); kept off the module so deepcopy stays cheap.
    from transformers import AutoTokenizer

    # Data-loader workers fork after the main process tokenised (validation): the Rust thread pool would then
    # warn and turn itself off in every worker, so run it single-threaded from the start.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"hf_model_dir {directory}: no readable tokenizer files ({err})") from None


def _encoder_kwargs(config: PretrainedConfig) -> dict[str, bool]:
    """`add_pooling_layer=False` for encoders that have the option (BERT, RoBERTa, MPNet): no pooler is used."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        raise UsageError(f"hf_model_dir: model type {config.model_type!r} has no transformers AutoModel") from None
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_cls).parameters else {}


def _width(config: PretrainedConfig) -> int:
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not width:
        raise UsageError(f"hf_model_dir: cannot read the width of a {config.model_type!r} encoder (hidden_size)")
    return int(width)


class HFTokenizer:
    """A Hugging Face tokenizer as a student tokenizer: strings -> `[N, context_length]` ids, padded and truncated.

    Picklable (data-loader workers reload the tokenizer from the directory by name).

    Args:
        model_dir: The Hugging Face directory holding the tokenizer files.
        context_length: Token sequence length.
    """

    def __init__(self, model_dir: str | os.PathLike, context_length: int) -> None:
        self.model_dir = str(model_dir)
        self.context_length = int(context_length)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The underlying transformers tokenizer."""
        return _tokenizer(self.model_dir)

    @property
    def pad_token_id(self) -> int:
        """The padding id (masked out by the tower)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            raise UsageError(f"hf_model_dir {self.model_dir}: its tokenizer has no padding token")
        return int(pad)

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"].long()


class HFTextTower(nn.Module):
    """A Hugging Face encoder, pooled (mean / CLS) and projected to `embed_dim`; open_clip `HFTextEncoder` keys.

    Built from the directory's config with random weights; `load_pretrained_encoder` loads the directory's weights
    (new students), a saved student's own file overwrites them (saved ones).

    Args:
        embed_dim: Joint embedding width.
        model_dir: Local Hugging Face directory (config and tokenizer; see `check_hf_dir`).
        pooling: `mean` (masked mean, sentence-transformers) or `cls` (first token).
        proj: `linear`, `mlp` or `none` (see `students.config.TextTowerCfg.hf_proj`).
        context_length: Token sequence length (at most the encoder's `max_position_embeddings`).
    """

    def __init__(
        self,
        embed_dim: int,
        model_dir: str | os.PathLike,
        *,
        pooling: Literal["mean", "cls"] = "mean",
        proj: Literal["linear", "mlp", "none"] = "linear",
        context_length: int = 77,
    ) -> None:
        from transformers import AutoModel

        super().__init__()
        directory = check_hf_dir(model_dir)
        config = copy.deepcopy(_config(str(directory)))  # from_config sets fields of the config it is given
        width = _width(config)
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions and context_length > max_positions:
            raise UsageError(
                f"text context_length {context_length} exceeds the encoder's max_position_embeddings {max_positions}"
            )
        self.model_dir = str(directory)
        self.pooling = pooling
        self.output_dim = embed_dim
        self.context_length = context_length
        self.tokenizer = HFTokenizer(directory, context_length)
        self.pad_token_id = self.tokenizer.pad_token_id
        # NOTE: dtype pinned: from_config would otherwise follow the checkpoint's dtype (fp16 for some models)
        self.transformer = AutoModel.from_config(config, dtype=torch.float32, **_encoder_kwargs(config))
        self.config = self.transformer.config
        self.proj = self._projection(proj, width, embed_dim)

    @staticmethod
    def _projection(kind: str, width: int, embed_dim: int) -> nn.Module:
        if kind == "linear":
            return nn.Linear(width, embed_dim, bias=False)
        if kind == "mlp":
            hidden = (width + embed_dim) // 2
            return nn.Sequential(
                nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
            )
        if width != embed_dim:
            raise UsageError(f"text hf_proj 'none' needs the encoder width ({width}) to equal embed_dim ({embed_dim})")
        return nn.Identity()

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the encoder."""
        return int(self.config.vocab_size)

    def encoder_layers(self) -> tuple[str, nn.ModuleList]:
        """`(name, layers)` of the encoder's layer stack (`encoder.layer` for BERT), for tower locking.

        Raises:
            UsageError: no module list with `num_hidden_layers` entries.
        """
        depth = getattr(self.config, "num_hidden_layers", None)
        for name, module in self.transformer.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return name, module
        raise UsageError(f"cannot find the layer stack of the {self.config.model_type!r} encoder in {self.model_dir}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L]` (padding = the tokenizer's pad id) -> projected features `[B, embed_dim]`."""
        keep = tokens != self.pad_token_id  # [B, L]; open_clip's rule: padding is the only masked token
        # NOTE: an additive [B, 1, 1, L] mask is used by transformers as given; a [B, L] one goes through its mask
        # builders (vmap'd mask functions with `new_ones`), which CoreML cannot convert. Same attention either way.
        bias = torch.zeros(keep.shape, device=tokens.device).masked_fill(~keep, torch.finfo(torch.float32).min)
        hidden = self.transformer(input_ids=tokens, attention_mask=bias[:, None, None, :]).last_hidden_state
        if self.pooling == "cls":  # hidden: [B, L, W]
            pooled = hidden[:, 0]
        else:
            weights = keep.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return self.proj(pooled)

    def extra_repr(self) -> str:
        return f"model_dir={self.model_dir!r}, pooling={self.pooling!r}, context_length={self.context_length}"


def load_pretrained_encoder(tower: HFTextTower) -> None:
    """Load the pretrained encoder weights of `tower.model_dir` into `tower.transformer` (strict); `proj` is kept.

    transformers reads safetensors, or `torch.load(weights_only=True)` for `pytorch_model.bin`, so nothing is
    unpickled. Weights the tower does not use (a BERT pooler) are ignored, as `from_pretrained` ignores them.

    Raises:
        UsageError: the directory has no readable weights, or they do not fit its config.
    """
    from transformers import AutoModel

    if any(p.is_meta for p in tower.transformer.parameters()):
        return  # NOTE: a model built on the meta device (parameter counting) has nowhere to put weights
    try:
        with _quiet_transformers():
            pretrained = AutoModel.from_pretrained(
                tower.model_dir, local_files_only=True, dtype=torch.float32, **_encoder_kwargs(tower.config)
            )
    except OSError as err:
        raise UsageError(
            f"hf_model_dir {tower.model_dir}: no readable pretrained weights ({err}); a new student needs the "
            "encoder's model.safetensors (save_pretrained)"
        ) from None
    missing, unexpected = tower.transformer.load_state_dict(pretrained.state_dict(), strict=False)
    if missing or unexpected:
        raise UsageError(
            f"hf_model_dir {tower.model_dir}: weights do not fit its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    _logger.info("text tower: pretrained %s encoder from %s", tower.config.model_type, tower.model_dir)


def save_hf_files(tower: HFTextTower, out_dir: str | os.PathLike) -> list[str]:
    """Write the tower's Hugging Face config and tokenizer files into `out_dir` (no encoder weights: the student's
    own weight file holds them); returns the file names. Each file is moved into place atomically.
    """
    out = Path(out_dir)
    if out.resolve() == Path(tower.model_dir).resolve():
        return []  # re-saved in place: the files are already there
    tmp = temp_path(out / "hf_text")
    tmp.mkdir(parents=True)
    try:
        tower.config.save_pretrained(tmp)
        tower.tokenizer.tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
