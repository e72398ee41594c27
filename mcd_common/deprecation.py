"""Old keyword spellings of a subcommand function, accepted for one release with a `FutureWarning`.

The command line side of a rename is `DEPRECATED_FLAGS` in the subcommand's module (rewritten by `distill.cli`);
this is the Python side, for code that calls the function itself (`build_data(input=...)`, `evaluate(data=...)`).
The wrapper keeps the new signature visible (`functools.wraps` sets `__wrapped__`, which `inspect.signature` and
jsonargparse follow), so `--help` shows only the new names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["renamed_kwargs"]

_F = TypeVar("_F", bound=Callable[..., object])


def renamed_kwargs(renames: Mapping[str, str]) -> Callable[[_F], _F]:
    """Accept old keyword names of the decorated function, warning that they go away in the next release.

    Args:
        renames: Old keyword -> new keyword (`{"data": "val"}`), or -> `group.field` to move the value into one
            field of a dataclass-group parameter (`{"input": "data.path"}`): the group passed (or the parameter's
            default) is copied with that field replaced; the default instance is never mutated.

    Returns:
        The decorator.

    Raises:
        TypeError: At decoration, a target that is not a parameter (or not a field of its dataclass default); at a
            call, an old keyword given together with the new one it would overwrite.
    """

    def decorate(fn: _F) -> _F:
        params = inspect.signature(fn).parameters
        for old, new in renames.items():
            group, _, field = new.partition(".")
            default = params[group].default if group in params else None
            if group not in params or (field and field not in {f.name for f in dataclasses.fields(default)}):
                raise TypeError(f"{fn.__qualname__}: renamed keyword {old!r} -> {new!r} names no parameter")

        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> object:
            for old in [k for k in kwargs if k in renames]:
                value, new = kwargs.pop(old), renames[old]
                group, _, field = new.partition(".")
                use = f"{group}=...(... {field}=...)" if field else f"{group}=..."
                warnings.warn(
                    f"{fn.__qualname__}({old}=...) is deprecated and will be removed in the next release; use {use}",
                    FutureWarning,
                    stacklevel=2,
                )
                if not field:
                    if group in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= (deprecated) and {group}=")
                    kwargs[group] = value
                    continue
                default = params[group].default
                given = kwargs.get(group, default)
                if getattr(given, field) != getattr(default, field):
                    raise TypeError(f"{fn.__qualname__}() got both {old}= (deprecated) and {group}={field}")
                kwargs[group] = dataclasses.replace(given, **{field: value})
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
