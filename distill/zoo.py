"""`distill zoo`: every registered student, teacher and captioner with parameter counts and input sizes.

Students are built on PyTorch's `meta` device (no memory, no weights), so counting even MobileCLIP2-S4 is instant;
open_clip teachers are counted the same way from their architecture config.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

_logger = logging.getLogger(__name__)

__all__ = ["student_rows", "teacher_rows", "zoo"]


def _count(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def student_rows(pattern: str = "*") -> list[dict]:
    """One dict per student: name, image/text params (M), image size, context length, embed dim, text kind."""
    import torch

    from students import create_student, get_student_cfg, list_students

    rows = []
    for name in list_students(pattern):
        cfg = get_student_cfg(name)
        with torch.device("meta"):
            model = create_student(name)
        rows.append(
            {
                "name": name,
                "image_params_m": round(_count(model.visual), 2),
                "text_params_m": round(_count(model.text), 2),
                "image_size": cfg.image.image_size,
                "context_length": cfg.text.context_length,
                "embed_dim": cfg.embed_dim,
                "image_tower": cfg.image.timm_model_name or f"vit-{cfg.image.width}x{cfg.image.layers}",
                "text_tower": cfg.text.kind,
            }
        )
    return rows


def teacher_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered teacher: name, source, params (M, open_clip archs only), image size, members."""
    import torch

    from teachers import get_teacher_cfg, list_teachers

    rows = []
    for name in list_teachers(pattern):
        cfg = get_teacher_cfg(name)
        params = None
        if cfg.source == "open_clip" and cfg.arch and ":" not in cfg.arch:
            try:
                import open_clip

                with torch.device("meta"):
                    params = round(_count(open_clip.create_model(cfg.arch, pretrained=None)), 2)
            except Exception as err:  # noqa: BLE001 - listing must not fail on one odd entry
                _logger.debug("cannot count %s: %s", name, err)
        rows.append(
            {
                "name": name,
                "source": cfg.source,
                "arch": cfg.arch,
                "params_m": params,
                "image_size": cfg.image_size,
                "members": list(cfg.members),
                "logit_scale": cfg.logit_scale,
            }
        )
    return rows


def captioner_rows(pattern: str = "*") -> list[dict]:
    """One dict per registered captioner."""
    from teachers import get_captioner_cfg, list_captioners

    rows = []
    for name in list_captioners(pattern):
        cfg = get_captioner_cfg(name)
        rows.append({"name": name, "source": cfg.source, "arch": cfg.arch, "image_size": cfg.image_size})
    return rows


def _format(rows: list[dict], cols: list[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) for row in cells]
    return "\n".join(out)


def zoo(kind: Literal["all", "students", "teachers", "captioners"] = "all", pattern: str = "*") -> dict:
    """List registered students, teachers and captioners.

    Args:
        kind: Which registry to list.
        pattern: fnmatch filter on names (e.g. "mobileclip*").

    Returns:
        `{"students": [...], "teachers": [...], "captioners": [...]}` (the CLI also prints tables).
    """
    out: dict[str, Any] = {}
    tables = []
    if kind in ("all", "students"):
        out["students"] = student_rows(pattern)
        tables.append(
            "STUDENTS (params in M, measured on the meta device)\n"
            + _format(
                out["students"],
                [
                    "name",
                    "image_params_m",
                    "text_params_m",
                    "image_size",
                    "context_length",
                    "embed_dim",
                    "image_tower",
                    "text_tower",
                ],
            )
        )
    if kind in ("all", "teachers"):
        out["teachers"] = teacher_rows(pattern)
        tables.append(
            "TEACHERS\n"
            + _format(out["teachers"], ["name", "source", "arch", "params_m", "image_size", "logit_scale", "members"])
        )
    if kind in ("all", "captioners"):
        out["captioners"] = captioner_rows(pattern)
        tables.append("CAPTIONERS\n" + _format(out["captioners"], ["name", "source", "arch", "image_size"]))
    out["_table"] = "\n\n".join(tables)
    return out
