"""Leaf helpers shared by every package of mobileclip-distill (errors, atomic files, checksums, weights, git).

This package imports none of `distill`, `students`, `teachers`, `reinforced_data` or `export`, so each of them
may import it without breaking the one-way import rule (docs/DESIGN.md, tests/test_layering.py). It holds only
small, dependency-light helpers that would otherwise be written once per package; nothing model- or
data-specific lives here. Import from the submodules (`mcd_common.files`, `mcd_common.weights`, ...).
"""

from mcd_common.errors import UnknownNameError, UsageError

__all__ = ["UnknownNameError", "UsageError"]
