"""The `distill` command line: one console script, one subcommand per job (litgpt `__main__.py` style).

Subcommand functions live in their owning package and are imported lazily, so `distill --help` and every
`distill <cmd> --help` work without importing torch-heavy extras (coremltools, executorch, webdataset writers).
jsonargparse turns each typed signature into flags (`--optim.lr`), `--config x.yaml` and `--print_config`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from distill.compare import compare_positionals
from distill.logs import configure_logging, split_verbosity
from distill.recipes import resolve_config_args

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


def _load(name: str) -> Callable[..., Any]:
    import importlib

    module, func = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)


def _print_result(command: str, result: Any) -> None:
    if result is None:
        return
    if isinstance(result, str):
        print(result)
        return
    table = result.pop("_table", None) if isinstance(result, dict) else None
    if command == "eval" and isinstance(result, dict):
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
        Process exit code: 0 on success, 2 on a usage/validation error, 1 when a job reports problems.
    """
    from jsonargparse import CLI, set_parsing_settings

    verbosity, args = split_verbosity(sys.argv[1:] if argv is None else argv)  # -v/-q (distill.logs)
    configure_logging(verbosity)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # Only import the subcommand that runs (plus every one for top-level --help).
    chosen = next((a for a in args if not a.startswith("-")), None)
    args = compare_positionals(args) if chosen == "compare" else args  # `compare A B` -> --runs (distill.compare)
    names = [chosen] if chosen in SUBCOMMANDS else list(SUBCOMMANDS)
    components = {name: _load(name) for name in names}
    try:
        # `--config NAME` -> the packaged recipe (distill.recipes); an unknown name is a KeyError usage error
        result = CLI(components, args=resolve_config_args(args), as_positional=False, prog="distill")
    except (ValueError, KeyError, FileNotFoundError) as err:
        # Validation errors name the flag; print them without a traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"distill {chosen or ''}: error: {msg}", file=sys.stderr)
        return 2
    _print_result(chosen or "", result)
    if isinstance(result, dict) and result.get("ok") is False:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
