"""`distill zoo`: every registered student, teacher and captioner with parameter counts, input sizes and the weight
formats each accepts, and the packaged training recipes (`distill train --config NAME`, `distill.recipes`).

Every count is taken without weights or downloads: students are built on PyTorch's `meta` device (no memory), open_clip
teachers and captioners from their architecture config on the meta device too, and Hugging Face ones from a
`config.json` already in the local cache (offline and uncached they show "-"). Weight formats are the layouts a
model's loader converts (`students.published`): `open_clip` (open_clip / our own keys), `apple` (Apple's
ml-mobileclip v1 `mobileclip_*.pt`), `tinyclip` (TinyCLIP's fork) and `hf` (transformers `CLIPModel` directories).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from distill.recipes import recipe_rows
from mcd_common import UsageError

_logger = logging.getLogger(__name__)

__all__ = ["captioner_rows", "student_rows", "teacher_rows", "zoo"]


def _count(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # NOTE: open_clip logs "No pretrained weights loaded ..." on the root logger for every architecture counted
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def student_rows(pattern: str = "*") -> list[dict]:
    """One dict per student: name, image/text params (M), image size, context length, embed dim, towers, formats."""
    from students import create_student, get_student_cfg, list_students
    from students.published import accepted_formats

    rows = []
    for name in list_students(pattern):
        cfg = get_student_cfg(name)
        try:
            with torch.device("meta"):
                model = create_student(name)
            counts = round(_count(model.visual), 2), round(_count(model.text), 2)
        except UsageError:  # a Hugging Face text tower is only known once its directory is given (hf_model_dir)
            counts = None, None
        rows.append(
            {
                "name": name,
                "image_params_m": counts[0],
                "text_params_m": counts[1],
                "image_size": cfg.image.image_size,
                "context_length": cfg.text.context_length,
                "embed_dim": cfg.embed_dim,
                "image_tower": cfg.image.timm_model_name or f"vit-{cfg.image.width}x{cfg.image.layers}",
                "text_tower": cfg.text.kind,
                "weight_formats": ",".join(accepted_formats(cfg)),
            }
        )
    return rows


def _open_clip_counts(arch: str) -> tuple[float, float, int | None]:
    """(total M, image M, image size) of an open_clip architecture, built on the meta device."""
    import open_clip

    from teachers._open_clip_loader import add_tiny_model_configs

    add_tiny_model_configs()  # the test_tiny architectures live in teachers/configs
    with _quiet(), torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    size = getattr(model.visual, "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return _count(model), _count(model.visual), size


def _hf_counts(repo: str) -> tuple[float, float, int | None]:
    """(total M, image M, image size) of a Hugging Face model from a locally cached or local `config.json`."""
    # NOTE: transformers is imported lazily: heavy, and only this row kind needs it
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(repo, local_files_only=True)
    with _quiet(), torch.device("meta"):
        model = AutoModel.from_config(config)
    vision = getattr(model, "vision_model", None)
    image = _count(vision) + _count(getattr(model, "visual_projection", nn.Identity())) if vision is not None else 0.0
    vision_cfg = getattr(config, "vision_config", None)
    return _count(model), image, getattr(vision_cfg, "image_size", None)


def _counts(source: str, arch: str) -> tuple[float, float, int | None] | None:
    if source == "open_clip" and arch and ":" not in arch:
        fn = _open_clip_counts
    elif source == "hf" and arch:
        fn = _hf_counts
    else:
        return None
    try:
        return fn(arch)
    except Exception as err:  # noqa: BLE001 - listing must not fail on one entry (e.g. an uncached HF config)
        _logger.debug("cannot count %s %s: %s", source, arch, err)
        return None


def teacher_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered teacher: name, source, params (M; ensembles sum their members), image size, formats."""
    from teachers import get_teacher_cfg, list_teachers

    rows: list[dict] = []
    counted: dict[str, tuple[float, float, int | None] | None] = {}
    formats: dict[str, set[str]] = {}

    def _single(name: str) -> tuple[float, float, int | None] | None:
        if name not in counted:
            cfg = get_teacher_cfg(name)
            counted[name] = _counts(cfg.source, cfg.arch)
            formats[name] = {"hf"} if cfg.source == "hf" else {"open_clip"}
        return counted[name]

    for name in list_teachers(pattern):
        cfg = get_teacher_cfg(name)
        members = list(cfg.members)
        if cfg.source == "ensemble":
            parts = [p for p in (_single(m) for m in members) if p is not None]
            known = len(parts) == len(members)
            total = sum(p[0] for p in parts) if known else None
            image_m = sum(p[1] for p in parts) if known else None
            sizes = {p[2] for p in parts}
            size = cfg.image_size or (sizes.pop() if len(sizes) == 1 else None)
            fmts = sorted(set().union(*(formats[m] for m in members)))
        else:
            got = _single(name)
            total, image_m = (None, None) if got is None else got[:2]
            size = cfg.image_size or (got[2] if got else None)
            fmts = sorted(formats[name])
        rows.append(
            {
                "name": name,
                "source": cfg.source,
                "arch": cfg.arch,
                "params_m": None if total is None else round(total, 2),
                "image_params_m": None if image_m is None else round(image_m, 2),
                "image_size": size,
                "members": members,
                "logit_scale": cfg.logit_scale,
                "weight_formats": ",".join(fmts),
            }
        )
    return rows


def captioner_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered captioner: name, source, arch, params (M), image size."""
    from teachers import get_captioner_cfg, list_captioners

    rows = []
    for name in list_captioners(pattern):
        cfg = get_captioner_cfg(name)
        # NOTE: only open_clip CoCa configs are counted; BLIP/GIT configs are not CLIP-shaped
        got = _counts(cfg.source, cfg.arch) if cfg.source == "open_clip" else None
        rows.append(
            {
                "name": name,
                "source": cfg.source,
                "arch": cfg.arch,
                "params_m": None if got is None else round(got[0], 2),
                "image_size": cfg.image_size or (got[2] if got else None),
            }
        )
    return rows


def _format(rows: list[dict], cols: list[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) for row in cells]
    return "\n".join(out)


_STUDENT_COLS = [
    "name",
    "image_params_m",
    "text_params_m",
    "image_size",
    "context_length",
    "embed_dim",
    "image_tower",
    "text_tower",
    "weight_formats",
]
_TEACHER_COLS = ["name", "source", "arch", "params_m", "image_params_m", "image_size", "logit_scale", "weight_formats"]


_RECIPE_COLS = ["name", "student", "teacher", "mode", "loss_preset", "max_steps", "batch_size"]


def zoo(kind: Literal["all", "students", "teachers", "captioners", "recipes"] = "all", pattern: str = "*") -> dict:
    """List registered students, teachers and captioners, and the packaged training recipes.

    Args:
        kind: Which registry to list (`recipes`: the configs `distill train --config NAME` accepts).
        pattern: fnmatch filter on names (e.g. "mobileclip*").

    Returns:
        `{"students": [...], "teachers": [...], "captioners": [...], "recipes": [...]}` (the CLI also prints
        tables).
    """
    out: dict[str, list[dict] | str] = {}
    tables = []
    if kind in ("all", "students"):
        out["students"] = rows = student_rows(pattern)
        tables.append("STUDENTS (params in M, measured on the meta device)\n" + _format(rows, _STUDENT_COLS))
    if kind in ("all", "teachers"):
        out["teachers"] = rows = teacher_rows(pattern)
        table = _format(rows, _TEACHER_COLS)
        members = [f"  {r['name']}: {', '.join(r['members'])}" for r in rows if r["members"]]
        tables.append(
            "TEACHERS (params in M from the architecture configs; '-': Hugging Face config not in the local cache)\n"
            + table
            + ("\nensemble members:\n" + "\n".join(members) if members else "")
        )
    if kind in ("all", "captioners"):
        out["captioners"] = rows = captioner_rows(pattern)
        tables.append("CAPTIONERS\n" + _format(rows, ["name", "source", "arch", "params_m", "image_size"]))
    if kind in ("all", "recipes"):
        out["recipes"] = rows = [r for r in recipe_rows() if fnmatch.fnmatch(r["name"], pattern)]
        tables.append(
            "RECIPES (distill train --config NAME, from any directory; teacher '-': none or the reinforced shards')\n"
            + _format(rows, _RECIPE_COLS)
        )
    out["_table"] = "\n\n".join(tables)
    return out
