"""Export trained CLIP students for apps: CoreML, ExecuTorch, ONNX and Hugging Face models, an app bundle, benchmarks.

``distill export`` (`export.api.export`) folds and wraps the student's towers (`export.prepare`), converts them
(`export.coreml`, `export.executorch`, `export.onnx`, `export.hf`), checks each artifact against PyTorch, and
writes the app bundle (`export.bundle`); ``distill bench`` (`export.bench.bench`) times every artifact present.
Heavy dependencies (coremltools, executorch, onnx, onnxruntime, transformers) are imported inside functions, so
importing this package stays light.

References: apple/ml-mobileclip (CoreML packages, iOS app), pytorch/executorch (XNNPACK), ONNX Runtime,
transformers ``CLIPModel``, timm (benchmark protocol).
"""

from export._report import ExportReport
from export.api import FORMATS, ExportOptions, export
from export.bench import BenchOptions, bench
from export.prepare import ImageEncoder, TextEncoder, TransformerTextEncoder, prepare_towers

__all__ = [
    "BenchOptions",
    "ExportOptions",
    "ExportReport",
    "FORMATS",
    "ImageEncoder",
    "TextEncoder",
    "TransformerTextEncoder",
    "bench",
    "export",
    "prepare_towers",
]
