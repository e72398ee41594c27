"""Teacher ensembles: several frozen teachers addressed by name, each preprocessing for itself.

MobileCLIP distils from two ViT-L/14 teachers (v1: OpenAI + DataComp-XL at logit scale 100; v2: two DFN2B models at
70 and 60) and RayGen stores their embeddings side by side (apple/ml-mobileclip ``training/open_clip_v2.patch``,
apple/ml-mobileclip-dr). Here members stay separate modules and outputs are dicts, so losses average over teachers
explicitly instead of slicing concatenated features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import nn

from mcd_common import UsageError

from .registry import TeacherCfg, get_teacher_cfg
from .teacher import Teacher

_logger = logging.getLogger(__name__)

__all__ = ["TeacherEnsemble", "as_ensemble", "member_cfgs"]


def _key(name: str) -> str:
    # nn.Module child names cannot contain "." (state-dict separator); registry names do ("vit_l14.openai").
    return name.replace(".", "-")


class TeacherEnsemble(nn.ModuleDict):
    """Ordered ``member name -> Teacher`` mapping with dict-valued ``encode_*``.

    Indexing, iteration, ``keys()`` and ``items()`` use the members' real names (``vit_l14.openai``); only the
    underlying ``nn.Module`` child names have ``.`` replaced by ``-``. Order is the embedding slice order of stored
    shards.

    Args:
        teachers: Members in slice order; their ``name`` attributes must be distinct.
        name: Ensemble name (the registry name or the comma-separated spec).

    Attributes:
        name: The ensemble's name.
        cfg: An ensemble ``TeacherCfg`` listing the members and their effective logit scales.
    """

    def __init__(self, teachers: list[Teacher] | tuple[Teacher, ...], name: str | None = None) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher")
        for teacher in teachers:
            key = _key(teacher.name)
            if key in self._modules:
                raise ValueError(f"duplicate ensemble member {teacher.name!r}")
            self.add_module(key, teacher)
        self.name = name or ",".join(t.name for t in teachers)
        # The ensemble as a config with every member's effective KD scale, for shard / checkpoint metadata.
        self.cfg = TeacherCfg(
            name=self.name,
            source="ensemble",
            members=tuple(t.name for t in teachers),
            member_logit_scales=tuple(float(t.logit_scale) for t in teachers),
        )

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """No-op: members always stay in eval mode."""
        return super().train(False)

    # -- mapping interface keyed by the real member names --------------------------------------------------------
    def __getitem__(self, name: str) -> Teacher:
        return self._modules[_key(name)]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def keys(self) -> list[str]:  # type: ignore[override]
        """Member names in slice order."""
        return self.names

    def items(self) -> list[tuple[str, Teacher]]:  # type: ignore[override]
        """``(name, teacher)`` pairs in slice order."""
        return [(t.name, t) for t in self.values()]

    def values(self) -> list[Teacher]:  # type: ignore[override]
        """Members in slice order."""
        return list(self._modules.values())  # type: ignore[arg-type]

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Member names in slice order."""
        return [t.name for t in self.values()]

    @property
    def embed_dims(self) -> dict[str, int]:
        """Embedding width per member."""
        return {t.name: t.embed_dim for t in self.values()}

    @property
    def logit_scales(self) -> dict[str, float]:
        """KD logit scale per member."""
        return {t.name: t.logit_scale for t in self.values()}

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` uint8 / ``[0, 1]`` pixels -> ``{member: [B, D_k]}`` L2-normalised features."""
        return {t.name: t.encode_image(pixels) for t in self.values()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> ``{member: [N, L_k]}`` tokens (every member has its own tokenizer)."""
        return {t.name: t.tokenize(texts) for t in self.values()}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{member: [N, L_k]}`` tokens from :meth:`tokenize` -> ``{member: [N, D_k]}`` features."""
        return {t.name: t.encode_text(tokens[t.name]) for t in self.values()}

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> ``{member: [N, D_k]}`` L2-normalised features."""
        return {t.name: t.encode_texts(texts) for t in self.values()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def as_ensemble(teacher: Teacher | TeacherEnsemble) -> TeacherEnsemble:
    """Wrap a single teacher as a one-member ensemble (ensembles are returned unchanged)."""
    if isinstance(teacher, TeacherEnsemble):
        return teacher
    if not isinstance(teacher, Teacher):
        raise TypeError(f"expected a Teacher or TeacherEnsemble, got {type(teacher).__name__}")
    return TeacherEnsemble([teacher], name=teacher.name)


def member_cfgs(cfg: TeacherCfg) -> list[TeacherCfg]:
    """The configs of an ensemble's members, in slice order, with the ensemble's logit scales applied to them.

    Raises:
        UsageError: a member that is itself an ensemble.
    """
    members = []
    for i, member in enumerate(cfg.members):
        member_cfg = get_teacher_cfg(member)
        if member_cfg.source == "ensemble":
            raise UsageError(f"teacher {cfg.name!r}: member {member!r} is itself an ensemble")
        scale = cfg.member_logit_scales[i] if cfg.member_logit_scales else cfg.logit_scale
        if scale is not None:
            member_cfg = dataclasses.replace(member_cfg, logit_scale=float(scale))
        members.append(member_cfg)
    return members
