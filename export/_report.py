"""Shared result type and helpers of the exporters: `ExportReport`, parity metrics, artifact sizes.

Atomic writes and checksums are `mcd_common.files` (one home for every package).

References: timm ``InferenceBenchmarkRunner`` result dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ExportReport", "parity", "path_size"]


@dataclass
class ExportReport:
    """What one exporter produced and how close it is to PyTorch.

    Attributes:
        path: The artifact (`.pte` / `.onnx` file, `.mlpackage` or Hugging Face directory).
        format: ``"executorch"``, ``"coreml"``, ``"onnx"`` or ``"hf"``.
        tower: ``"image"`` or ``"text"``.
        backend: ExecuTorch delegate (``xnnpack``, ``coreml``), ``mlprogram`` (CoreML), ``onnxruntime`` (ONNX) or
            ``transformers`` (Hugging Face).
        precision: ``fp32``, ``fp16``, ``int8`` (static), ``int8_dynamic``, ``palettize4``, ...
        max_abs_diff: Largest absolute difference of the embeddings against PyTorch on the fixed inputs.
        cosine: Smallest cosine similarity against PyTorch on the fixed inputs.
        checked_with: How the artifact was run for parity (``executorch.runtime``, ``coremltools.predict``,
            ``onnxruntime``, ``transformers``), or why it was not (``not run: ...``).
        passed: Whether ``cosine`` meets the threshold; ``None`` when not run or not required (int8, palettised).
        file_size: Bytes on disk (a package directory: all its files).
        seconds: Wall time of the export, parity check included.
        delegation: Lowering summary (ExecuTorch: delegated subgraphs, ops left outside the delegate; ONNX: opset,
            op counts, input shapes).
        quality: int8 only: how far quantisation moves zero-shot results (`export.quality.quantization_delta`).
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
    delegation: dict[str, object] = field(default_factory=dict)
    quality: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
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


def path_size(path: Path) -> int:
    """Size in bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
