"""Export trained CLIP students for apps: CoreML packages, ExecuTorch programs, an app bundle, and latency benchmarks.

``distill export`` (`export.api.export`) folds and wraps the student's towers (`export.prepare`), converts them
(`export.coreml`, `export.executorch`), checks each artifact against PyTorch, and writes the app bundle
(`export.bundle`); ``distill bench`` (`export.bench.bench`) times the artifacts. Heavy dependencies (coremltools,
executorch) are imported inside functions, so importing this package stays light.

References: apple/ml-mobileclip (CoreML packages, iOS app), pytorch/executorch (XNNPACK), timm (benchmark protocol).
"""

from export._report import ExportReport
from export.api import ExportArgs, export
from export.bench import BenchArgs, bench
from export.prepare import ImageEncoder, TextEncoder, TransformerTextEncoder, prepare_towers

__all__ = [
    "BenchArgs",
    "ExportArgs",
    "ExportReport",
    "ImageEncoder",
    "TextEncoder",
    "TransformerTextEncoder",
    "bench",
    "export",
    "prepare_towers",
]
