"""The `distill` command line: one console script, one subcommand per job (litgpt `__main__.py` style).

Subcommand functions live in their owning package and are imported lazily, so `distill --help` and every
`distill <cmd> --help` work without importing torch-heavy extras (coremltools, executorch, webdataset writers).
jsonargparse turns each typed signature into flags (`--optim.lr`), `--config x.yaml` and `--print_config`.

Exit codes: 0 success; 1 a job reported problems (`"ok": false`) or an internal error (its traceback is kept);
2 a usage error (`mcd_common.UsageError`, printed as one line, or a jsonargparse argument error); 128 + N when
training was stopped by signal N (143 SIGTERM, 130 SIGINT) after saving a resumable checkpoint.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from jsonargparse import CLI, set_parsing_settings

from distill.compare import compare_positionals
from distill.logs import configure_logging, split_verbosity
from distill.recipes import resolve_config_args
from mcd_common import UsageError

__all__ = ["main"]

_logger = logging.getLogger(__name__)

# Subcommand -> (module, function). The key "eval" maps to `evaluate`: a function named `eval` would shadow the builtin.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-data": ("reinforced_data.build", "build_data"),
    "train": ("distill.train", "train"),
    "eval": ("distill.evaluate", "evaluate"),
    "export": ("export.api", "export"),
    "bench": ("export.bench", "bench"),
    "demo": ("distill.demo", "demo"),
    "zoo": ("distill.zoo", "zoo"),
    "compare": ("distill.compare", "compare"),
}


def _load(name: str) -> Callable[..., object]:
    # NOTE: imported by name, and only the subcommand that runs: the modules pull in torch, Lightning, open_clip.
    module, func = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)


def _rename_deprecated_flags(command: str, args: list[str]) -> list[str]:
    """Old flag spellings -> new ones, with a deprecation warning logged (accepted for one release).

    A subcommand module lists its renames in `DEPRECATED_FLAGS` (`{"--args.format": "--format", "--input":
    "--data.path", ...}`); both `--old value` and `--old=value` are rewritten, and so are the same keys in a
    `--config` file (`--print_config` dumps hold every key, so each user config would otherwise stop parsing).
    """
    if command not in SUBCOMMANDS:
        return args
    renames: dict[str, str] = getattr(importlib.import_module(SUBCOMMANDS[command][0]), "DEPRECATED_FLAGS", {})
    if not renames:
        return args
    out: list[str] = []
    config_next = False
    for arg in args:
        if config_next:
            out.append(_rename_config_keys(command, arg, renames))
            config_next = False
            continue
        flag, eq, value = arg.partition("=")
        if flag == "--config":
            config_next = not eq
            arg = f"--config={_rename_config_keys(command, value, renames)}" if eq else arg
        elif flag in renames:
            _logger.warning(
                "distill %s: %s is deprecated and will be removed in the next release; use %s",
                command,
                flag,
                renames[flag],
            )
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


def _rename_config_keys(command: str, value: str, renames: dict[str, str]) -> str:
    """A `--config` value (a file or inline YAML) with deprecated keys moved to their new place, as inline YAML.

    A key is the flag without `--`, dotted into groups (`--input` -> `input`, `--data.path` -> `data: {path}`).
    Returns `value` itself when it holds no deprecated key (or is not a YAML mapping).
    """
    path = Path(value).expanduser()
    try:
        config = yaml.safe_load(path.read_text() if path.is_file() else value)
    except (OSError, yaml.YAMLError):
        return value  # jsonargparse reports what is wrong with it
    if not isinstance(config, dict):
        return value
    moved = []
    for old, new in renames.items():
        *old_groups, old_key = old.removeprefix("--").split(".")
        parent = config
        for group in old_groups:
            parent = parent.get(group) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_key not in parent:
            continue
        item = parent.pop(old_key)
        *new_groups, new_key = new.removeprefix("--").split(".")
        target = config
        for group in new_groups:
            if not isinstance(target.get(group), dict):
                target[group] = {}  # absent, or null (the group's defaults)
            target = target[group]
        target.setdefault(new_key, item)  # NOTE: a config holding both spellings keeps the new one
        moved.append(f"{old.removeprefix('--')} -> {new.removeprefix('--')}")
    if not moved:
        return value
    for group in {old.removeprefix("--").split(".")[0] for old in renames}:
        if config.get(group) == {}:
            del config[group]  # a group whose every key moved (eval's old `data`)
    where = value if path.is_file() else "the inline --config"
    _logger.warning(
        "distill %s: %s uses deprecated keys (%s), accepted until the next release; rewrite it with `distill %s "
        "--config %s --print_config`",
        command,
        where,
        ", ".join(moved),
        command,
        value if path.is_file() else "...",
    )
    return yaml.safe_dump(config, sort_keys=False)


def _print_result(command: str, result: object) -> None:
    if result is None:
        return
    if isinstance(result, str):
        print(result)
        return
    table = result.pop("_table", None) if isinstance(result, dict) else None
    if command == "eval" and isinstance(result, dict):
        # NOTE: lazy: distill.evaluate imports torch (already loaded here, since `eval` just ran); at the top it
        # would make `distill --help` load torch.
        from distill.evaluate import format_results

        print(format_results(result))
    if table:
        print(table)
    else:
        print(json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script.

    Args:
        argv: Arguments without the program name (None reads `sys.argv`).

    Returns:
        Process exit code: 0 on success, 2 on a usage error, 1 when a job reports problems. Internal errors
        propagate with their traceback (exit 1); jsonargparse's argument errors exit 2 through `SystemExit`.
    """
    verbosity, args = split_verbosity(sys.argv[1:] if argv is None else argv)  # -v/-q (distill.logs)
    configure_logging(verbosity)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # Only import the subcommand that runs (plus every one for top-level --help).
    chosen = next((a for a in args if not a.startswith("-")), None)
    args = compare_positionals(args) if chosen == "compare" else args  # `compare A B` -> --runs (distill.compare)
    names = [chosen] if chosen in SUBCOMMANDS else list(SUBCOMMANDS)
    components = {name: _load(name) for name in names}
    try:
        # `--config NAME` -> the packaged recipe (distill.recipes); an unknown name is an UnknownNameError
        args = _rename_deprecated_flags(chosen or "", resolve_config_args(args))
        result = CLI(components, args=args, as_positional=False, prog="distill")
    except UsageError as err:
        # The user can fix it and the message names the flag or path: one line, no traceback.
        print(f"distill {chosen or ''}: error: {err}", file=sys.stderr)
        return 2
    _print_result(chosen or "", result)
    if isinstance(result, dict) and result.get("ok") is False:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
