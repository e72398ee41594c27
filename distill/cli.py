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
import sys
import warnings
from collections.abc import Callable

from jsonargparse import CLI, set_parsing_settings

from distill.compare import compare_positionals
from distill.logs import configure_logging, split_verbosity
from distill.recipes import resolve_config_args
from mcd_common import UsageError

__all__ = ["main"]

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
    """Old flag spellings -> new ones, with a deprecation warning (accepted for one release).

    A subcommand module lists its renames in `DEPRECATED_FLAGS` (`{"--args.format": "--format", ...}`); both
    `--old value` and `--old=value` are rewritten.
    """
    if command not in SUBCOMMANDS:
        return args
    renames: dict[str, str] = getattr(importlib.import_module(SUBCOMMANDS[command][0]), "DEPRECATED_FLAGS", {})
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in renames:
            warnings.warn(
                f"distill {command}: {flag} is deprecated and will be removed in the next release; use {renames[flag]}",
                FutureWarning,
                stacklevel=3,
            )
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


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
    args = _rename_deprecated_flags(chosen or "", args)
    try:
        # `--config NAME` -> the packaged recipe (distill.recipes); an unknown name is an UnknownNameError
        result = CLI(components, args=resolve_config_args(args), as_positional=False, prog="distill")
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
