"""Shared result type and helpers of the exporters: `ExportReport`, atomic writes, parity metrics.

References: timm ``InferenceBenchmarkRunner`` result dicts; litgpt's atomic checkpoint writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ExportReport",
    "atomic_write_bytes",
    "atomic_replace_dir",
    "parity",
    "path_size",
    "sha256_path",
    "temp_dir_for",
]


@dataclass
class ExportReport:
    """What one exporter produced and how close it is to PyTorch.

    Attributes:
        path: The artifact (`.pte` file or `.mlpackage` directory).
        format: ``"executorch"`` or ``"coreml"``.
        tower: ``"image"`` or ``"text"``.
        backend: ExecuTorch delegate (``xnnpack``, ``coreml``) or ``mlprogram`` for CoreML packages.
        precision: ``fp32``, ``fp16``, ``int8`` (static PT2E), ``int8_dynamic``, ``palettize4``, ...
        max_abs_diff: Largest absolute difference of the embeddings against PyTorch on the fixed inputs.
        cosine: Smallest cosine similarity against PyTorch on the fixed inputs.
        checked_with: How the artifact was run for parity (``executorch.runtime``, ``coremltools.predict``), or
            why it was not (``not run: ...``).
        passed: Whether ``cosine`` meets the threshold; ``None`` when not run or not required (int8, palettised).
        file_size: Bytes on disk (a package directory: all its files).
        seconds: Wall time of the export, parity check included.
        delegation: Lowering summary (ExecuTorch: delegated subgraphs, ops left outside the delegate).
        notes: Anything a user should know (skips, warnings).
    """

    path: Path
    format: str
    tower: str
    backend: str
    precision: str
    max_abs_diff: float | None = None
    cosine: float | None = None
    checked_with: str = ""
    passed: bool | None = None
    file_size: int = 0
    seconds: float = 0.0
    delegation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def parity(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """``(max_abs_diff, min_cosine)`` of two embedding batches `[N, D]`."""
    reference, test = reference.detach().float().reshape(reference.shape[0], -1), test.detach().float()
    test = test.reshape(reference.shape)
    diff = (reference - test).abs().max().item()
    cos = F.cosine_similarity(reference, test, dim=-1).min().item()
    return float(diff), float(cos)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_replace_dir(tmp_dir: Path, path: Path) -> None:
    """Move a finished directory into place; an existing ``path`` is swapped out first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp_dir, path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def temp_dir_for(path: Path) -> Path:
    """A fresh temp path next to ``path`` (same file system, so the final rename is atomic).

    The suffix is kept (``x.tmp-<pid>.mlpackage``): coremltools refuses to save a package under another one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def path_size(path: Path) -> int:
    """Size in bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory (relative paths and contents of its files, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if p != path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
