"""ONNX export: ``torch.onnx.export(dynamo=True)`` -> ``onnx.checker`` -> ONNX Runtime parity, optional int8.

The towers are the `export.prepare` wrappers (``backend="eager"``: the attention/pooling rewrites, fused
``LayerNormalization``), so an ``.onnx`` file computes what the ``.pte`` and ``.mlpackage`` compute: image
``float32[B, 3, H, W]`` RGB in [0, 1] -> ``embedding`` ``float32[B, D]`` (L2-normalised), text ``int32[B, L]``
token ids -> ``embedding``. The batch axis is 1 (static) unless ``dynamic_batch`` names it ``batch``.

int8 uses ONNX Runtime's quantisation tooling (``onnxruntime.quantization``): the text tower is quantised
dynamically (int8 weights, activations quantised at run time per MatMul, and the token table as int8 ``Gather``),
the image tower statically (QDQ, per-channel int8 weights, uint8 activations calibrated on real images), limited
to Conv/MatMul/Gemm as the ExecuTorch int8 programs are: quantising residual adds and norms costs far more
accuracy than it saves time.

References:
    PyTorch ``torch.onnx`` (TorchDynamo exporter) docs; ONNX Runtime "Quantize ONNX models" docs
    (``quantize_dynamic``, ``quantize_static``, ``quant_pre_process``); onnx ``checker.check_model``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn

from export._quiet import captured_stderr, quiet_loggers
from export._report import ExportReport, parity, path_size
from mcd_common.files import atomic_path

if TYPE_CHECKING:  # onnx / onnxruntime are imported lazily (heavy; `distill --help` stays light)
    import onnxruntime as ort
    from torch.onnx import ONNXProgram

_logger = logging.getLogger(__name__)

__all__ = ["OnnxRunner", "export_onnx", "onnx_summary", "quantize_onnx"]

OUTPUT_NAME = "embedding"
# loggers of the exporter's graph passes (initializer de-duplication, unused-node removal, ...) at INFO
_CONVERTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


def _input_name(tower: str) -> str:
    return "image" if tower == "image" else "text"


def _rename_shadowed_values(program: ONNXProgram) -> int:
    """Rename intermediate values that carry a graph output's name; returns how many were renamed.

    The exporter names values after the FX nodes, so the token lookup of a text tower (an ``aten.embedding``
    node) is called ``embedding`` too: two values of one name break ``onnx.checker``'s single-assignment rule.
    """
    outputs = {id(v) for v in program.model.graph.outputs}
    names = {v.name for v in program.model.graph.outputs}
    renamed = 0
    for node in program.model.graph:
        for value in node.outputs:
            if value.name in names and id(value) not in outputs:
                value.name = f"{value.name}_{renamed}_inner"
                renamed += 1
    return renamed


class OnnxRunner:
    """An ONNX Runtime CPU session for one exported tower: ``runner(x)`` returns embeddings `[N, D]`.

    A static batch-1 model is run one row at a time, a dynamic-batch model on the whole batch.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (None: ONNX Runtime's default, one per physical core).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # lazy: heavy optional runtime

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer at level 2
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session: ort.InferenceSession = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.dynamic_batch = not isinstance(inp.shape[0], int)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = [x] if self.dynamic_batch else list(x.split(1))
        outs = [self.session.run(None, {self.input_name: r.numpy()})[0] for r in rows]
        return torch.from_numpy(np.concatenate(outs))


def onnx_summary(path: Path) -> dict[str, object]:
    """Opsets, input shapes (``batch`` when dynamic) and op-type counts of an ``.onnx`` file."""
    import onnx  # lazy: heavy optional dependency

    model = onnx.load(str(path), load_external_data=False)

    def shape(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": {i.name: shape(i) for i in model.graph.input},
        "outputs": {o.name: shape(o) for o in model.graph.output},
        "ops": dict(sorted(ops.items())),
    }


def _check_parity(
    report: ExportReport,
    reference: nn.Module,
    check_inputs: Sequence[tuple[torch.Tensor, ...]],
    min_cosine: float | None,
) -> None:
    """Run the file with ONNX Runtime on the fixed inputs (and on all of them as one batch when dynamic)."""
    runner = OnnxRunner(report.path)
    batch = torch.cat([x[0] for x in check_inputs])
    with torch.no_grad():
        ref = reference(batch) if runner.dynamic_batch else torch.cat([reference(*x) for x in check_inputs])
    report.max_abs_diff, report.cosine = parity(ref, runner(batch))
    report.checked_with = "onnxruntime" + (f" (batch {batch.shape[0]}, dynamic)" if runner.dynamic_batch else "")
    if min_cosine is not None:
        report.passed = report.cosine >= min_cosine


def export_onnx(
    encoder: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    tower: Literal["image", "text"],
    dynamic_batch: bool = False,
    reference: nn.Module | None = None,
    check_inputs: Sequence[tuple[torch.Tensor, ...]] | None = None,
    min_cosine: float = 0.999,
) -> ExportReport:
    """Export one prepared tower to a single-file ``.onnx`` (written atomically), check it, compare it.

    Args:
        encoder: A wrapper from `export.prepare.prepare_towers` (``backend="eager"``).
        example: Example inputs (batch 1) fixing the signature.
        path: Output ``.onnx`` file (weights inside the file: every student is far below the 2 GB protobuf limit).
        tower: ``"image"`` (input ``image``) or ``"text"`` (input ``text``); the output is ``embedding``.
        dynamic_batch: Give the input a symbolic batch axis ``batch`` (else batch 1).
        reference: PyTorch module to compare with (default: ``encoder``).
        check_inputs: Fixed inputs for the parity check (default: ``[example]``).
        min_cosine: Threshold for ``passed``.

    Returns:
        The `ExportReport` (``delegation`` holds `onnx_summary`).
    """
    import onnx  # lazy: heavy optional dependency

    t0 = time.perf_counter()
    path = Path(path)
    report = ExportReport(path=path, format="onnx", tower=tower, backend="onnxruntime", precision="fp32")
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with quiet_loggers(*_CONVERTER_LOGGERS), captured_stderr("torch.onnx"):
        program = torch.onnx.export(
            encoder,
            example,
            None,
            dynamo=True,
            input_names=[_input_name(tower)],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    _rename_shadowed_values(program)
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
        # NOTE: check the file by path: the in-memory form skips the checks that need the file layout
        onnx.checker.check_model(str(tmp), full_check=True)
    report.file_size = path_size(path)
    report.delegation = onnx_summary(path)
    _check_parity(report, encoder if reference is None else reference, list(check_inputs or [example]), min_cosine)
    report.seconds = time.perf_counter() - t0
    _logger.info(
        "onnx %s fp32 -> %s (%.1f MB, cosine %.6f, %.1f s)",
        tower,
        path.name,
        report.file_size / 1e6,
        report.cosine,
        report.seconds,
    )
    return report


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of input tuples."""

    def __init__(self, name: str, inputs: Iterable[tuple[torch.Tensor, ...]], dynamic_batch: bool) -> None:
        self.name = name
        self.rows = [x[0] for x in inputs]
        if dynamic_batch and self.rows:
            self.rows = [torch.cat(self.rows)]  # one calibration pass over the whole set
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return {self.name: self.rows[self.i - 1].numpy()}

    def rewind(self) -> None:
        self.i = 0


def quantize_onnx(
    fp32_path: Path,
    path: Path,
    *,
    tower: Literal["image", "text"],
    calibration: Iterable[tuple[torch.Tensor, ...]] | None = None,
    reference: nn.Module,
    check_inputs: Sequence[tuple[torch.Tensor, ...]],
) -> ExportReport:
    """int8 copy of an exported tower with ONNX Runtime's quantiser, with its parity (reported, not judged).

    Args:
        fp32_path: The FP32 ``.onnx`` written by `export_onnx`.
        path: Output ``.onnx``.
        tower: ``"text"``: dynamic quantisation (MatMul + token table). ``"image"``: static QDQ calibrated on
            ``calibration`` (needed).
        calibration: Image input tuples `([1, 3, H, W],)` in [0, 1] (static mode).
        reference: PyTorch module to compare with.
        check_inputs: Fixed inputs for the parity check.
    """
    from onnxruntime.quantization import (  # lazy: heavy optional dependency
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    path = Path(path)
    mode = "int8_dynamic" if tower == "text" else "int8"
    report = ExportReport(path=path, format="onnx", tower=tower, backend="onnxruntime", precision=mode)
    with tempfile.TemporaryDirectory() as work, quiet_loggers("root", *_CONVERTER_LOGGERS):
        # shape inference + graph optimisation first, as ONNX Runtime's quantisation guide recommends; ONNX's
        # own shape inference suffices (the symbolic one of onnxruntime 1.31 fails on the exporter's Expand nodes)
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        with atomic_path(path) as tmp:
            if tower == "text":
                quantize_dynamic(
                    pre, tmp, op_types_to_quantize=["MatMul", "Gather"], per_channel=True, weight_type=QuantType.QInt8
                )
            else:
                rows = list(calibration or [])
                if not rows:
                    raise ValueError("static int8 ONNX quantisation of the image tower needs calibration images")
                reader = _Calibration("image", rows, OnnxRunner(fp32_path).dynamic_batch)
                quantize_static(
                    pre,
                    tmp,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
                report.notes.append(f"static QDQ int8 calibrated on {len(rows)} images")
    report.file_size = path_size(path)
    report.delegation = onnx_summary(path)
    _check_parity(report, reference, check_inputs, None)
    report.seconds = time.perf_counter() - t0
    _logger.info(
        "onnx %s %s -> %s (%.1f MB, cosine %.6f, %.1f s)",
        tower,
        mode,
        path.name,
        report.file_size / 1e6,
        report.cosine,
        report.seconds,
    )
    return report
