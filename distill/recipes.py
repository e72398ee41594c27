"""Training recipes by name: `distill train --config mobileclip_s0_reinforced` from any directory.

The recipes are the YAML files in `distill/configs/` (`--print_config` dumps of `distill train`'s arguments, shipped
as package data by setup.cfg). A `--config` value that is a bare name (no directory, optionally ending in `.yaml`)
and not an existing file is resolved to the packaged recipe of that name; an unknown name is a usage error listing
the close matches. Paths keep working as before.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from mcd_common import UnknownNameError

__all__ = ["list_recipes", "recipe_path", "recipe_rows", "resolve_config_args"]

_SUFFIXES = (".yaml", ".yml")
# What a recipe name looks like; anything else (a path, `~/x.yaml`, inline YAML `{...}`) goes to jsonargparse as is.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _configs_dir() -> Path:
    # NOTE: setup.cfg installs distill/configs/*.yaml as package data next to the code (no zip install), so the
    # resource is a real directory whether the package runs from a checkout or from site-packages.
    return Path(str(importlib.resources.files("distill") / "configs"))


def list_recipes() -> list[str]:
    """Names of the packaged recipes (file names without `.yaml`), sorted."""
    return sorted(p.stem for p in _configs_dir().iterdir() if p.suffix in _SUFFIXES)


def recipe_path(name: str) -> Path:
    """The packaged YAML of recipe `name` (`mobileclip_s0_reinforced` or `mobileclip_s0_reinforced.yaml`).

    Raises:
        UnknownNameError: No recipe of that name; the message lists close matches and `distill zoo`.
    """
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in _SUFFIXES else name
    for suffix in _SUFFIXES:
        path = _configs_dir() / f"{stem}{suffix}"
        if path.is_file():
            return path
    names = list_recipes()
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownNameError(
        f"--config {name}: no such file and no recipe of that name; {hint}recipes: {', '.join(names)} "
        "(listed by `distill zoo`)"
    )


def _is_recipe_name(value: str) -> bool:
    """A bare name (no directory part, no inline YAML) that is not an existing file: a packaged recipe."""
    if not _NAME.fullmatch(value) or Path(value).exists():
        return False
    return Path(value).suffix in ("", *_SUFFIXES)


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace recipe names given to `--config` (`--config NAME` or `--config=NAME`) by the packaged file's path.

    Args:
        argv: A `distill` command line (without the program name).

    Returns:
        The same arguments, with every `--config` recipe name turned into an absolute path.

    Raises:
        UnknownNameError: A bare `--config` name that is neither a file nor a recipe.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            value = args[i + 1]
            out += [arg, str(recipe_path(value)) if _is_recipe_name(value) else value]
            i += 2
            continue
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            arg = f"--config={recipe_path(value)}" if _is_recipe_name(value) else arg
        out.append(arg)
        i += 1
    return out


def recipe_rows() -> list[dict]:
    """One dict per recipe for `distill zoo`: name, student, teacher, mode, loss preset, steps, batch size."""
    rows = []
    for name in list_recipes():
        cfg = yaml.safe_load(recipe_path(name).read_text()) or {}
        rows.append(
            {
                "name": name,
                "student": cfg.get("student"),
                "teacher": cfg.get("teacher"),
                "mode": cfg.get("mode"),
                "loss_preset": (cfg.get("loss") or {}).get("preset"),
                "max_steps": (cfg.get("trainer") or {}).get("max_steps"),
                "batch_size": (cfg.get("data") or {}).get("batch_size"),
            }
        )
    return rows
