"""`WeightSpec`: where a model's weights come from (a local file, a Hugging Face Hub location or a URL).

Kept apart from the readers in `mcd_common.weights` (which import torch) so that registries holding only
configs (`teachers.list_teachers()`, `distill zoo`) stay importable without torch. `mcd_common.weights` re-exports
it; students and teachers both use this one definition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mcd_common.errors import UsageError

__all__ = ["WeightSpec"]


@dataclass(frozen=True)
class WeightSpec:
    """Where a model's weights come from, resolved in the order `file > hf_hub > url` (timm's order).

    An empty spec means "the model's own source" (a registered pretrained tag, a `local-dir:` directory, ...).
    """

    file: str | None = None
    """Local path: a safetensors or torch state dict, a Lightning `.ckpt`, or a saved model directory."""
    hf_hub: str | None = None
    """Hugging Face Hub location, `org/repo/` (the repo's default file) or `org/repo/path/in/repo`."""
    url: str | None = None
    """HTTP(S) URL of a state-dict file."""

    def __post_init__(self) -> None:
        # Accept Path objects from callers but persist plain strings (configs are written to JSON).
        if self.file is not None and not isinstance(self.file, str):
            object.__setattr__(self, "file", os.fspath(self.file))
        if self.hf_hub is not None:
            parts = self.hf_hub.strip().split("/")
            if len(parts) < 2 or not parts[0] or not parts[1]:
                raise UsageError(f"hf_hub must look like 'org/repo/' or 'org/repo/filename', got {self.hf_hub!r}")

    @property
    def is_empty(self) -> bool:
        """True when no source is set."""
        return not (self.file or self.hf_hub or self.url)
