"""Teacher and captioner registries: frozen configs and name resolution (``teachers.factory`` builds from them).

Teachers are configurations of existing checkpoints, so they are registered as data (open_clip's
``pretrained.py`` style) rather than as builder functions (timm's style, used for students). The registry core
mirrors ``timm/models/_registry.py``: module-level dicts, ``fnmatch`` listing, ``difflib`` suggestions for unknown
names. Unlike timm, registering a duplicate raises.

Besides registered names, ``get_teacher_cfg`` (and so ``create_teacher``) accepts source prefixes
(``timm.create_model``'s ``hf-hub:`` idea):

- ``local-dir:PATH``: an open_clip directory (``open_clip_config.json`` + weights), e.g. a student trained here;
- ``open_clip:ARCH`` or ``open_clip:ARCH@TAG_OR_FILE``: any open_clip architecture and pretrained tag or file;
- ``hf:ID_OR_DIR``: a Hugging Face transformers ``CLIPModel`` / ``SiglipModel`` repo id or saved directory;
- ``a,b,c``: a comma-separated list of any of the above, built as an ad-hoc ``TeacherEnsemble``.

This module imports neither torch nor open_clip, so listing names stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from mcd_common import UnknownNameError, UsageError
from mcd_common.weight_spec import WeightSpec

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KD_LOGIT_SCALE",
    "WeightSpec",
    "TeacherCfg",
    "CaptionerCfg",
    "apply_overrides",
    "register_teacher",
    "list_teachers",
    "get_teacher_cfg",
    "register_captioner",
    "list_captioners",
    "get_captioner_cfg",
    "LOCAL_DIR_PREFIX",
    "OPEN_CLIP_PREFIX",
    "HF_PREFIX",
]

LOCAL_DIR_PREFIX = "local-dir:"
OPEN_CLIP_PREFIX = "open_clip:"
HF_PREFIX = "hf:"

Interpolation = Literal["bicubic", "bilinear", "nearest"]


def _coerce_loaded_fields(cfg: TeacherCfg | CaptionerCfg, tuple_fields: tuple[str, ...]) -> None:
    """A config read back from JSON/YAML: lists become tuples (the frozen config stays hashable and comparable) and
    a ``weights`` dict becomes a `WeightSpec`."""
    for name in tuple_fields:
        value = getattr(cfg, name)
        if isinstance(value, list):
            object.__setattr__(cfg, name, tuple(value))
    if isinstance(cfg.weights, dict):
        object.__setattr__(cfg, "weights", WeightSpec(**cfg.weights))


DEFAULT_KD_LOGIT_SCALE = 50.0
"""KD temperature of a teacher whose config names none (local, Hugging Face and most registered teachers): TinyCLIP's
50, which also won on the Flickr8k dev split against the teachers' own learned scales and 100 (docs/RESULTS.md).
Published recipes keep theirs: MobileCLIP v1's L/14 teachers 100, MobileCLIP2's DFN2B pair 70 and 60."""


@dataclass(frozen=True)
class TeacherCfg:
    """A teacher: which checkpoint, how to feed it, and at which KD temperature to use it.

    Preprocessing fields left ``None`` are filled from the checkpoint when it is loaded; the loaded teacher's
    ``cfg`` holds the resolved values so an artefact's metadata can rebuild it without the registry.
    """

    name: str
    """Registry name (``vit_l14.openai``) or source spec (``local-dir:PATH``, ``open_clip:ARCH@TAG``, ``hf:ID``)."""
    source: Literal["open_clip", "hf", "ensemble"] = "open_clip"
    """Backend that loads it."""
    arch: str = ""
    """open_clip architecture name or ``local-dir:PATH``; Hugging Face repo id or directory for ``hf``."""
    pretrained: str | None = None
    """open_clip pretrained tag (or checkpoint file) for ``arch``; unused by ``hf`` and ``ensemble``."""
    weights: WeightSpec = field(default_factory=WeightSpec)
    """Explicit weights, overriding ``pretrained`` (``--teacher_weights PATH`` on the command line)."""
    image_size: int | None = None
    """Square input resolution; pixels of another size are resized to it."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean for ``[0, 1]`` pixels."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std for ``[0, 1]`` pixels."""
    interpolation: Interpolation | None = None
    """Resize filter used when pixels are not ``image_size``."""
    logit_scale: float | None = None
    """Fixed KD logit scale (MobileCLIP v1: 100); ``None`` uses ``DEFAULT_KD_LOGIT_SCALE`` (50, above), never the
    checkpoint's learned ``exp(logit_scale)`` (kept as ``Teacher.learned_logit_scale``)."""
    members: tuple[str, ...] = ()
    """Ensemble member names, in embedding slice order (``source="ensemble"`` only)."""
    member_logit_scales: tuple[float, ...] = ()
    """Per-member KD logit scales for ensembles (MobileCLIP2 uses 70 and 60); empty means ``logit_scale`` for all
    members, or each member's own."""
    allow_random: bool = False
    """Allow random weights when no weights are found. Only for the tiny test models."""
    context_length: int | None = None
    """Text context length; ``None`` uses the checkpoint's."""

    def __post_init__(self) -> None:
        _coerce_loaded_fields(self, ("mean", "std", "members", "member_logit_scales"))
        object.__setattr__(self, "member_logit_scales", tuple(float(v) for v in self.member_logit_scales))
        if self.source == "ensemble":
            if not self.members:
                raise UsageError(f"teacher {self.name!r}: an ensemble needs at least one member")
            if self.member_logit_scales and len(self.member_logit_scales) != len(self.members):
                raise UsageError(
                    f"teacher {self.name!r}: member_logit_scales has {len(self.member_logit_scales)} values for "
                    f"{len(self.members)} members"
                )
        elif not self.arch:
            raise UsageError(f"teacher {self.name!r}: source {self.source!r} needs an arch")

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TeacherCfg:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**data)


@dataclass(frozen=True)
class CaptionerCfg:
    """A captioning model used to write synthetic captions (``syn.json``)."""

    name: str
    """Registry name (``coca_vit_l14.mscoco``) or source spec (``local-dir:PATH``, ``open_clip:ARCH@TAG``,
    ``hf:ID``)."""
    source: Literal["open_clip", "hf"] = "open_clip"
    """Backend: an open_clip CoCa model, or a Hugging Face image-to-text model (BLIP, GIT)."""
    arch: str = ""
    """open_clip CoCa architecture or ``local-dir:PATH``; Hugging Face repo id or directory for ``hf``."""
    pretrained: str | None = None
    """open_clip pretrained tag or checkpoint file."""
    weights: WeightSpec = field(default_factory=WeightSpec)
    """Explicit weights, overriding ``pretrained``."""
    image_size: int | None = None
    """Square input resolution; ``None`` uses the checkpoint's."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; ``None`` uses the checkpoint's."""
    std: tuple[float, float, float] | None = None
    """Normalisation std; ``None`` uses the checkpoint's."""
    interpolation: Interpolation | None = None
    """Resize filter; ``None`` uses the checkpoint's."""
    tag: str = ""
    """Suffix of the ``syn.json`` key: ``""`` writes ``syn_text``, ``"blip"`` writes ``syn_text_blip``."""
    allow_random: bool = False
    """Allow random weights when no weights are found. Only for the tiny test models."""

    def __post_init__(self) -> None:
        _coerce_loaded_fields(self, ("mean", "std"))
        if not self.arch:
            raise UsageError(f"captioner {self.name!r}: needs an arch")

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CaptionerCfg:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


_TEACHERS: dict[str, TeacherCfg] = {}
_CAPTIONERS: dict[str, CaptionerCfg] = {}


def _unknown(kind: str, name: str, known: Mapping[str, object]) -> UnknownNameError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownNameError(
        f"unknown {kind} {name!r}.{hint} Registered: list_{kind}s(); or use local-dir:PATH, "
        f"open_clip:ARCH[@TAG_OR_FILE] or hf:ID_OR_DIR."
    )


def _is_spec(name: str) -> bool:
    return name.startswith((LOCAL_DIR_PREFIX, OPEN_CLIP_PREFIX, HF_PREFIX))


def _check_name(kind: str, name: str) -> None:
    if not name or name != name.strip() or "," in name or _is_spec(name):
        raise ValueError(f"invalid {kind} name {name!r}: use lowercase snake case with an optional .tag")


def register_teacher(cfg: TeacherCfg) -> TeacherCfg:
    """Add a teacher config to the registry.

    Args:
        cfg: The config; ``cfg.name`` becomes the registry key.

    Returns:
        The same config (so it can be used as an expression).

    Raises:
        ValueError: If the name is already registered or is not a plain registry name.
    """
    _check_name("teacher", cfg.name)
    if cfg.name in _TEACHERS:
        raise ValueError(f"teacher {cfg.name!r} is already registered")
    _TEACHERS[cfg.name] = cfg
    return cfg


def list_teachers(pattern: str = "*") -> list[str]:
    """Registered teacher names matching an ``fnmatch`` pattern, sorted."""
    return sorted(n for n in _TEACHERS if fnmatch.fnmatch(n, pattern))


def _split_members(name: str) -> list[str]:
    return [m.strip() for m in name.split(",") if m.strip()]


def get_teacher_cfg(name: str) -> TeacherCfg:
    """Resolve a teacher name or source spec to its config (no weights are loaded).

    Args:
        name: A registered name, ``local-dir:PATH``, ``open_clip:ARCH[@TAG_OR_FILE]``, ``hf:ID_OR_DIR`` or a
            comma-separated list of these.

    Raises:
        UnknownNameError: For an unknown registered name (also a ``KeyError``); the message lists close matches.
    """
    name = name.strip()
    if "," in name:
        members = _split_members(name)
        for member in members:
            get_teacher_cfg(member)  # fail early, with close matches, on a misspelt member
        return TeacherCfg(name=",".join(members), source="ensemble", members=tuple(members))
    if name.startswith(LOCAL_DIR_PREFIX):
        return TeacherCfg(name=name, source="open_clip", arch=name)
    if name.startswith(OPEN_CLIP_PREFIX):
        arch, _, tag = name[len(OPEN_CLIP_PREFIX) :].partition("@")
        return TeacherCfg(name=name, source="open_clip", arch=arch, pretrained=tag or None)
    if name.startswith(HF_PREFIX):
        return TeacherCfg(name=name, source="hf", arch=name[len(HF_PREFIX) :])
    if name not in _TEACHERS:
        raise _unknown("teacher", name, _TEACHERS)
    return _TEACHERS[name]


Cfg = TypeVar("Cfg", TeacherCfg, CaptionerCfg)


def apply_overrides(cfg: Cfg, weights: WeightSpec | None, overrides: Mapping[str, object]) -> Cfg:
    """`cfg` with explicit weights and field overrides applied (``None`` overrides and empty weights are dropped).

    Raises:
        TypeError: an override that is not a field of the config.
    """
    # NOTE: like timm, None overrides are dropped so CLI defaults never clobber registered values.
    changes = {k: v for k, v in overrides.items() if v is not None}
    if weights is not None and not weights.is_empty:
        changes["weights"] = weights
    return dataclasses.replace(cfg, **changes) if changes else cfg


def register_captioner(cfg: CaptionerCfg) -> CaptionerCfg:
    """Add a captioner config to the registry; duplicates raise ``ValueError``."""
    _check_name("captioner", cfg.name)
    if cfg.name in _CAPTIONERS:
        raise ValueError(f"captioner {cfg.name!r} is already registered")
    _CAPTIONERS[cfg.name] = cfg
    return cfg


def list_captioners(pattern: str = "*") -> list[str]:
    """Registered captioner names matching an ``fnmatch`` pattern, sorted."""
    return sorted(n for n in _CAPTIONERS if fnmatch.fnmatch(n, pattern))


def get_captioner_cfg(name: str) -> CaptionerCfg:
    """Resolve a captioner name or source spec (``local-dir:``, ``open_clip:ARCH@TAG``, ``hf:ID``) to its config.

    Raises:
        UnknownNameError: For an unknown registered name (also a ``KeyError``); the message lists close matches.
    """
    name = name.strip()
    if name.startswith(LOCAL_DIR_PREFIX):
        return CaptionerCfg(name=name, source="open_clip", arch=name)
    if name.startswith(OPEN_CLIP_PREFIX):
        arch, _, tag = name[len(OPEN_CLIP_PREFIX) :].partition("@")
        return CaptionerCfg(name=name, source="open_clip", arch=arch, pretrained=tag or None)
    if name.startswith(HF_PREFIX):
        return CaptionerCfg(name=name, source="hf", arch=name[len(HF_PREFIX) :])
    if name not in _CAPTIONERS:
        raise _unknown("captioner", name, _CAPTIONERS)
    return _CAPTIONERS[name]
