"""ExecuTorch export: ``torch.export`` -> (PT2E int8) -> ``to_edge_transform_and_lower`` -> ``.pte``, with parity.

XNNPACK (CPU; runs here through the ``executorch.runtime`` Python bindings) is the default delegate. The CoreML
delegate lowers on Linux but its programs only run on Apple platforms; the MPS delegate is not part of the
PyPI wheel. Unavailable delegates are skipped with a message, never silently.

int8 is post-training quantisation with PT2E (``torchao.quantization.pt2e``) and ExecuTorch's
``XNNPACKQuantizer``: per-channel symmetric int8 weights and, for ``"int8"``, static per-tensor activations
calibrated on real inputs; ``"int8_dynamic"`` quantises linear/conv inputs at run time instead (no calibration).

References:
    ExecuTorch XNNPACK tutorial and ``executorch.devtools.backend_debug.get_delegation_info``:
    https://github.com/pytorch/executorch ; PT2E quantisation: https://github.com/pytorch/ao
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

from export._quiet import captured_fd2
from export._report import ExportReport, parity, path_size
from export.prepare import ExportLayerNorm, L2Norm, RowReduce, untile_grouped_convs
from mcd_common.files import atomic_write_bytes

# NOTE: executorch, coremltools and torchao are imported inside the functions that use them: heavy optional
# dependencies (seconds to import), kept out of `distill export --help` and of exports that do not lower to them.
if TYPE_CHECKING:
    from executorch.exir import EdgeProgramManager
    from executorch.runtime import Method

_logger = logging.getLogger(__name__)

__all__ = [
    "ExecuTorchBackend",
    "HalfEmbedding",
    "PteRunner",
    "half_embeddings",
    "Quantize",
    "available_executorch_backends",
    "delegation_summary",
    "export_executorch",
    "load_pte",
    "quantize_pt2e",
    "set_executorch_threads",
]

ExecuTorchBackend = Literal["xnnpack", "coreml", "mps"]
Quantize = Literal["none", "int8", "int8_dynamic"]


def available_executorch_backends() -> dict[str, dict[str, object]]:
    """Which delegates can lower (``lower``) and run here (``run``), with the reason when not.

    Returns:
        ``{"xnnpack": {"lower": bool, "run": bool, "reason": str}, "coreml": {...}, "mps": {...}}``
    """
    out: dict[str, dict[str, object]] = {}
    try:
        from executorch.runtime import Runtime

        registered = set(Runtime.get().backend_registry.registered_backend_names)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
        registered, why = set(), f"executorch.runtime unavailable: {e}"
    else:
        why = ""
    for name, module, runtime_name in (
        ("xnnpack", "executorch.backends.xnnpack.partition.xnnpack_partitioner", "XnnpackBackend"),
        ("coreml", "executorch.backends.apple.coreml.partition", "CoreMLBackend"),
        ("mps", "executorch.backends.apple.mps.partition", "MPSBackend"),
    ):
        entry: dict[str, object] = {"lower": True, "run": runtime_name in registered, "reason": ""}
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - ImportError or a broken optional extension
            entry["lower"] = False
            entry["reason"] = f"the installed executorch cannot lower {name} on this platform ({type(e).__name__}: {e})"
        if entry["lower"] and not entry["run"]:
            entry["reason"] = why or (
                f"{runtime_name} is not registered in this executorch runtime: the .pte runs only on a device "
                f"whose runtime links it (CoreML/MPS: macOS/iOS)"
            )
        out[name] = entry
    return out


# The threadpool's first use probes ARM-only sysfs files (midr) and compares core counts; on x86 every probe
# "fails" and the pool is sized from the core count anyway (and `set_executorch_threads` sets it explicitly).
_THREADPOOL_NOISE = r"^\[(cpuinfo_utils|threadpool)\.cpp:\d+\]"


def _init_threadpool() -> int:
    """Create the ExecuTorch threadpool once, with its native start-up chatter captured; returns its size."""
    from executorch.extension.pybindings import portable_lib

    with captured_fd2("executorch", _THREADPOOL_NOISE):
        return int(portable_lib._threadpool_get_thread_count())


def set_executorch_threads(num_threads: int) -> None:
    """Size the ExecuTorch runtime threadpool (XNNPACK uses it) for this process."""
    from executorch.extension.pybindings import portable_lib

    _init_threadpool()
    with captured_fd2("executorch", _THREADPOOL_NOISE):
        portable_lib._unsafe_reset_threadpool(int(num_threads))


def load_pte(path: Path) -> Method:
    """Load the ``forward`` method of a ``.pte`` with ``executorch.runtime``; call ``.execute([inputs])``."""
    from executorch.runtime import Runtime

    _init_threadpool()
    program = Runtime.get().load_program(Path(path))
    return program.load_method("forward")


class PteRunner:
    """A loaded ``.pte``: ``runner(x)`` embeds `[B, ...]` one row at a time (the programs have batch 1)."""

    def __init__(self, path: Path) -> None:
        self.method = load_pte(path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.method.execute([row])[0] for row in x.split(1)])


def _partitioners(backend: ExecuTorchBackend, precision: str) -> list:
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if backend == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        )
        return [CoreMLPartitioner(compile_specs=specs)]
    if backend == "mps":
        from executorch.backends.apple.mps import MPSBackend  # noqa: F401
        from executorch.backends.apple.mps.partition import MPSPartitioner

        return [MPSPartitioner(compile_specs=[])]
    raise ValueError(f"unknown executorch backend {backend!r}")


class HalfEmbedding(nn.Module):
    """Token lookup from an FP16 table, returning FP32 rows (halves the 49408 x width table of a text tower).

    The portable ``embedding`` kernel reads FP16 tables; XNNPACK never sees this op. The quantised kernels
    (``embedding_byte``) would shrink it further but are not in the ``executorch.runtime`` Python bindings, so
    programs using them could not be checked here.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.register_buffer("weight", embedding.weight.detach().to(torch.float16).clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight).float()


def half_embeddings(encoder: nn.Module, min_rows: int = 4096) -> nn.Module:
    """A copy of ``encoder`` whose large ``nn.Embedding`` tables are stored in FP16 (`HalfEmbedding`)."""
    encoder = copy.deepcopy(encoder)
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding) and child.num_embeddings >= min_rows:
                setattr(parent, name, HalfEmbedding(child))
    return encoder


def quantize_pt2e(
    encoder: nn.Module,
    example: tuple[torch.Tensor, ...],
    mode: Quantize,
    calibration: Iterable[tuple[torch.Tensor, ...]] | None = None,
    scope: Literal["gemm", "all"] = "gemm",
) -> torch.export.ExportedProgram:
    """Post-training int8 quantisation with PT2E and the XNNPACK quantiser; returns the re-exported program.

    Args:
        encoder: A prepared wrapper (`export.prepare`, backend ``"xnnpack"``).
        example: Example inputs (batch 1).
        mode: ``"int8"`` (static activations; needs ``calibration``) or ``"int8_dynamic"`` (activations quantised
            at run time, per linear/conv call).
        calibration: Input tuples run through the observed model (static mode).
        scope: Static mode only: ``"gemm"`` quantises convolutions and linears; ``"all"`` also adds, muls,
            pooling and concatenations (XNNPACK's full pattern set), which keeps conv nets in int8 between layers.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if mode not in ("int8", "int8_dynamic"):
        raise ValueError(f"quantize must be int8 or int8_dynamic, got {mode!r}")
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "int8_dynamic")
    quantizer = XNNPACKQuantizer()
    if mode == "int8_dynamic" or scope == "all":
        quantizer.set_global(config)
    else:
        # NOTE: only convolutions and linears; residual adds, LayerScale muls and norms stay FP32. Quantising the
        # residual stream of a transformer to one per-tensor scale loses far more than it saves.
        for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default):
            quantizer.set_operator_type(op, config)
    # decomposed norms are linears with constant rows: an int8 mean or sum of squares would wreck them
    for norm_type in (RowReduce, ExportLayerNorm, L2Norm):
        quantizer.set_module_type(norm_type, None)
    graph = torch.export.export(encoder, example).module()
    prepared = prepare_pt2e(graph, quantizer)
    n = 0
    with torch.no_grad():
        for inputs in calibration or ():
            prepared(*inputs)
            n += 1
        if n == 0:
            if mode == "int8":
                raise ValueError("static int8 quantisation needs calibration inputs (--calibration_data)")
            prepared(*example)  # dynamic mode still needs one pass: the weight observers run in forward()
    converted = convert_pt2e(prepared)
    _logger.info("PT2E %s: calibrated on %d inputs", mode, n)
    return torch.export.export(converted, example)


def delegation_summary(edge_program: EdgeProgramManager) -> dict[str, object]:
    """Delegated subgraphs and the ops left outside the delegate, from ``get_delegation_info``."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge_program.exported_program().graph_module)
    outside: dict[str, int] = {}
    for op, stats in info.delegation_by_operator.items():
        if stats.non_delegated and op != "getitem":
            outside[op] = stats.non_delegated
    return {
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "non_delegated_ops": dict(sorted(outside.items())),
    }


def export_executorch(
    encoder: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    tower: str,
    backend: ExecuTorchBackend = "xnnpack",
    quantize: Quantize = "none",
    calibration: Iterable[tuple[torch.Tensor, ...]] | None = None,
    reference: nn.Module | None = None,
    check_inputs: Sequence[tuple[torch.Tensor, ...]] | None = None,
    min_cosine: float = 0.999,
) -> ExportReport:
    """Lower one prepared tower to a ``.pte`` and check it against PyTorch.

    Args:
        encoder: A wrapper from `export.prepare.prepare_towers` (``backend="xnnpack"``).
        example: Example inputs (batch 1) fixing the exported signature.
        path: Output ``.pte`` (written atomically).
        tower: ``"image"`` or ``"text"`` (labels the report).
        backend: Delegate. ``coreml``/``mps`` are lowered where the installed executorch supports it; they cannot
            run here, so their parity is reported as not run.
        quantize: ``"none"`` (FP32), ``"int8"`` (static, calibrated) or ``"int8_dynamic"``.
        calibration: Calibration input tuples for static int8.
        reference: PyTorch module to compare with (default: ``encoder`` itself).
        check_inputs: Fixed inputs for the parity check (default: ``[example]``).
        min_cosine: Threshold for ``passed`` (FP32 only; int8 is reported, not judged).

    Returns:
        The `ExportReport`; ``passed`` is False when an FP32 program misses ``min_cosine``.
    """
    from executorch.exir import to_edge_transform_and_lower

    t0 = time.perf_counter()
    path = Path(path)
    precision = "fp32" if quantize == "none" else quantize
    if backend == "coreml" and quantize == "none":
        precision = "fp16"  # the CoreML delegate computes in FP16 by default
    report = ExportReport(path=path, format="executorch", tower=tower, backend=backend, precision=precision)
    if quantize != "none":
        if backend != "xnnpack":
            raise ValueError("int8 PT2E quantisation is implemented for the xnnpack backend only")
        # int8 programs also keep the token table in FP16: it is most of a text tower's file (101 MB of 170 MB
        # for MobileCLIP-S0 in FP32) and its rounding is far below the int8 error
        encoder = half_embeddings(encoder)  # a copy
        if quantize == "int8" and untile_grouped_convs(encoder):
            # static int8 quantizes the tiles' zero padding into a constant pad XNNPACK cannot compile
            _logger.debug("%s: static int8 uses the untiled grouped convolutions", tower)
        program = quantize_pt2e(encoder, example, quantize, calibration)
    else:
        program = torch.export.export(encoder, example)
    edge = to_edge_transform_and_lower(program, partitioner=_partitioners(backend, precision))
    report.delegation = delegation_summary(edge)
    if report.delegation["non_delegated_ops"]:
        _logger.debug("%s %s: ops outside the delegate: %s", tower, backend, report.delegation["non_delegated_ops"])
    atomic_write_bytes(path, edge.to_executorch().buffer)
    report.file_size = path_size(path)

    ref_module = reference if reference is not None else encoder
    _check_parity(report, ref_module, list(check_inputs) if check_inputs else [example], min_cosine)
    report.seconds = time.perf_counter() - t0
    _logger.info(
        "executorch %s %s %s -> %s (%.1f MB, cosine %s, %.1f s)",
        tower,
        backend,
        precision,
        path.name,
        report.file_size / 1e6,
        "n/a" if report.cosine is None else f"{report.cosine:.6f}",
        report.seconds,
    )
    return report


def _check_parity(
    report: ExportReport, reference: nn.Module, inputs: list[tuple[torch.Tensor, ...]], min_cosine: float
) -> None:
    """Run the written ``.pte`` on ``inputs`` and fill the report's parity (not run where the delegate cannot)."""
    runnable = available_executorch_backends().get(report.backend, {})
    if not runnable.get("run"):
        report.checked_with = f"not run: {runnable.get('reason', 'backend unavailable')}"
        report.notes.append(report.checked_with)
        return
    method = load_pte(report.path)
    with torch.no_grad():
        ref = torch.cat([reference(*x) for x in inputs])
    got = torch.cat([method.execute(list(x))[0] for x in inputs])
    report.max_abs_diff, report.cosine = parity(ref, got)
    report.checked_with = "executorch.runtime"
    if report.precision in ("fp32", "fp16"):  # int8 is reported, not judged
        report.passed = report.cosine >= min_cosine
