"""The one exception type for mistakes a user can fix (bad flag values, missing paths, mismatched data).

The `distill` CLI prints a `UsageError` as one line and exits 2; every other exception keeps its traceback and
exits 1 (STYLE.md B11). It subclasses `ValueError` so library callers that already catch `ValueError` keep working.
"""

from __future__ import annotations

__all__ = ["UnknownNameError", "UsageError"]


class UsageError(ValueError):
    """An error the user can act on: the message names the flag or path and the fix, in one line."""


class UnknownNameError(UsageError, KeyError):
    """An unknown registry name (student, teacher, captioner, recipe); the message lists close matches.

    Also a `KeyError`, the exception registries raise for unknown names (timm, open_clip).
    """

    def __str__(self) -> str:
        # KeyError's own __str__ quotes the message (repr); a usage error prints as written.
        return str(self.args[0]) if self.args else ""
