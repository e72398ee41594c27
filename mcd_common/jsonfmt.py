"""Round the floats of a JSON-able object to the digits that carry meaning, for run.json, eval and summary files.

A metric computed as `100 * 1 / 30` is stored as `3.3333334922790527`; the last eleven digits are float noise and
make the files hard to read and to diff. `round_floats` keeps `digits` *significant* digits (not decimal places:
`8.94e-08` stays `8.94e-08`, `1234567.8` becomes `1235000.0` at 4 digits), leaves ints, bools, strings and None as
they are, and lets chosen keys keep more digits (an export's parity cosine is judged near 0.999999, so 4 digits would
print every artifact as a perfect 1.0).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

__all__ = ["DEFAULT_KEY_DIGITS", "round_floats", "round_sig"]

DEFAULT_KEY_DIGITS: dict[str, int] = {
    # NOTE: parity is checked against thresholds like 0.999 and differences like 1 - 1.2e-7: keep 8 digits.
    "cosine": 8,
    "min_cosine": 8,
    "*cosine*": 8,
}
"""Keys (fnmatch patterns, matched against the innermost dict key) that keep more digits than the default."""


def round_sig(x: float, digits: int) -> float:
    """`x` rounded to `digits` significant digits; 0, NaN and infinities are returned unchanged.

    Args:
        x: The value.
        digits: Significant digits to keep (>= 1).
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if x == 0 or not math.isfinite(x):
        return x
    # The `g` format rounds half-to-even on the decimal representation, as `round` does.
    return float(f"{x:.{digits}g}")


def _digits_for(key: str | None, digits: int, key_digits: Mapping[str, int]) -> int:
    if key is None:
        return digits
    if key in key_digits:
        return key_digits[key]
    for pattern, n in key_digits.items():
        if fnmatch.fnmatchcase(key, pattern):
            return n
    return digits


def round_floats(obj: object, digits: int = 4, key_digits: Mapping[str, int] | None = None) -> object:
    """A copy of `obj` with every float rounded to `digits` significant digits.

    Args:
        obj: A JSON-able value (nested dicts, lists, tuples, scalars); tuples come back as lists, as JSON writes
            them; values of other types (numpy arrays, paths) pass through unchanged.
        digits: Significant digits for floats (4 suits metrics in percent, losses, seconds and learning rates).
        key_digits: Digits for floats under matching dict keys (exact name or fnmatch pattern); a list inherits its
            key. None uses `DEFAULT_KEY_DIGITS`; pass `{}` for none.

    Returns:
        The rounded copy; ints (and bools) are never turned into floats, strings and None are kept.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    table = DEFAULT_KEY_DIGITS if key_digits is None else key_digits

    def walk(value: object, key: str | None) -> object:
        # NOTE: bool is an int subclass and must stay a bool; other non-float scalars pass through untouched.
        if isinstance(value, float):
            return round_sig(value, _digits_for(key, digits, table))
        if isinstance(value, Mapping):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, key) for v in value]
        return value

    return walk(obj, None)
