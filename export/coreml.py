"""CoreML export: ``torch.export`` -> coremltools ML program ``.mlpackage`` (iOS 17+), with parity where possible.

The image tower takes an ``ImageType`` (apps pass a ``CVPixelBuffer``; the 0-255 -> [0, 1] scale and, when the
std is the same for all channels, the mean/std normalisation become the ImageType's ``scale``/``bias``), the
text tower an ``int32[1, L]`` array. Both return ``embedding``, a float32 ``[1, D]`` L2-normalised vector.
Compute precision is FP16 by default (FP32 on request); weights can be palettised (k-means LUT, 2-8 bits) or
linearly quantised to int8 with ``coremltools.optimize.coreml``.

CoreML prediction needs macOS: there the package is run against PyTorch; elsewhere the spec is checked (inputs,
outputs, image preprocessing, op types) and the report says so.

References:
    coremltools: https://github.com/apple/coremltools (``ct.convert`` of an ``ExportedProgram``, ``ImageType``);
    apple/ml-mobileclip ios_app (inputs ``image``/``text``, CLIP BPE tokenizer in Swift).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn
from google.protobuf.json_format import MessageToDict
from PIL import Image

from export._quiet import captured_stderr, quiet_loggers
from export._report import ExportReport, parity, path_size
from mcd_common.files import atomic_path

# NOTE: coremltools is imported inside the functions that use it: a heavy optional dependency (seconds to import,
# and its import-time warnings), kept out of `distill export --help` and of exports to other formats.
if TYPE_CHECKING:
    import coremltools as ct
    from coremltools.proto.Model_pb2 import Model as ModelSpec

_logger = logging.getLogger(__name__)

__all__ = ["Compression", "coreml_spec_summary", "export_coreml", "image_preprocessing"]

Compression = Literal["none", "palettize2", "palettize4", "palettize6", "palettize8", "int8"]


def image_preprocessing(mean: Sequence[float], std: Sequence[float]) -> tuple[float, list[float], bool]:
    """``ImageType`` scale/bias for 0-255 pixels, and whether they carry the whole mean/std normalisation.

    ``ImageType`` computes ``scale * pixel + bias[c]`` with ONE scale for all channels, so a per-channel std
    (OpenAI's) cannot be folded in: then the scale only maps to [0, 1] and the model normalises inside.

    Returns:
        ``(scale, bias, folded)``.
    """
    if len(set(std)) == 1:
        s = float(std[0])
        return 1.0 / (255.0 * s), [-float(m) / s for m in mean], True
    return 1.0 / 255.0, [0.0, 0.0, 0.0], False


def _compress(model: ct.models.MLModel, compression: Compression) -> ct.models.MLModel:
    if compression == "none":
        return model
    import coremltools.optimize.coreml as cto

    if compression.startswith("palettize"):
        op_cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=int(compression[len("palettize") :]))
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=op_cfg))
    if compression == "int8":
        op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_cfg))
    raise ValueError(f"unknown CoreML compression {compression!r}")


def coreml_spec_summary(spec: ModelSpec) -> dict[str, object]:
    """Inputs, outputs, ImageType preprocessing and op-type counts of an ML program spec."""

    def _feature(f) -> dict[str, object]:  # noqa: ANN001 - a FeatureDescription protobuf
        kind = f.type.WhichOneof("Type")
        out: dict[str, object] = {"name": f.name, "type": kind}
        if kind == "imageType":
            out.update(width=f.type.imageType.width, height=f.type.imageType.height)
            out["color_space"] = MessageToDict(f.type.imageType).get("colorSpace", "")
        elif kind == "multiArrayType":
            out["shape"] = [int(d) for d in f.type.multiArrayType.shape]
            out["dtype"] = MessageToDict(f.type.multiArrayType).get("dataType", "")
        return out

    from coremltools.proto import MIL_pb2

    ops: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    consts: dict[str, list[float]] = {}
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    for op in block.operations:
        ops[op.type] += 1
        if op.type != "const" and op.outputs and op.outputs[0].type.WhichOneof("type") == "tensorType":
            dtypes[MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)] += 1
        if op.type == "const" and op.outputs and op.outputs[0].name.startswith(("image__scaled__", "image__biased__")):
            value = op.attributes["val"].immediateValue.tensor
            floats = list(value.floats.values)
            consts[op.outputs[0].name] = floats
    return {
        "spec_version": int(spec.specificationVersion),
        "opset": fn.opset,
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "image_scale": consts.get("image__scaled___y_0"),
        "image_bias": consts.get("image__biased___y_0"),
        "ops": dict(sorted(ops.items())),
        "op_output_dtypes": dict(sorted(dtypes.items())),
    }


def export_coreml(
    encoder: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    tower: Literal["image", "text"],
    precision: Literal["fp16", "fp32"] = "fp16",
    compression: Compression = "none",
    reference: nn.Module | None = None,
    check_inputs: Sequence[tuple[torch.Tensor, ...]] | None = None,
    min_cosine: float = 0.999,
) -> ExportReport:
    """Convert one prepared tower to an ML program ``.mlpackage`` (written atomically) and check it.

    Args:
        encoder: A wrapper from `export.prepare.prepare_towers` (``backend="coreml"``).
        example: Example inputs (batch 1): an image `[1, 3, H, W]` in [0, 1] or tokens `[1, L]` int32.
        path: Output ``.mlpackage`` directory.
        tower: ``"image"`` (``ImageType`` input named ``image``) or ``"text"`` (int32 input named ``text``).
        precision: Compute precision.
        compression: Weight compression after conversion.
        reference: PyTorch module to compare with on macOS (default: ``encoder``).
        check_inputs: Fixed inputs for the macOS parity check (default: ``[example]``).
        min_cosine: Threshold for ``passed`` (uncompressed models only).
    """
    import coremltools as ct

    t0 = time.perf_counter()
    path = Path(path)
    label = precision if compression == "none" else f"{precision}+{compression}"
    report = ExportReport(path=path, format="coreml", tower=tower, backend="mlprogram", precision=label)
    module = encoder
    if tower == "image":
        scale, bias, folded = image_preprocessing(encoder.mean, encoder.std)
        if folded and encoder.normalize_input:
            module = _without_input_normalization(encoder)
        ct_input = ct.ImageType(
            name="image", shape=tuple(example[0].shape), scale=scale, bias=bias, color_layout=ct.colorlayout.RGB
        )
        report.notes.append(f"ImageType RGB 0-255, scale={scale:.8g}, bias={bias} (normalisation folded: {folded})")
    else:
        ct_input = ct.TensorType(name="text", shape=tuple(example[0].shape), dtype=np.int32)
    program = torch.export.export(module, example).run_decompositions({})
    # coremltools logs every graph pass at INFO and draws tqdm bars on stderr; keep a user's INFO log readable
    with quiet_loggers("coremltools"), captured_stderr("coremltools"):
        model = ct.convert(
            program,
            inputs=[ct_input],
            outputs=[ct.TensorType(name="embedding", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        )
        model = _compress(model, compression)
    model.short_description = f"MobileCLIP-style {tower} encoder: L2-normalised embedding"
    model.user_defined_metadata["tower"] = tower
    model.user_defined_metadata["precision"] = label
    # NOTE: the temp name keeps the suffix: coremltools refuses to save a package under another name
    with atomic_path(path, keep_suffix=True) as tmp:
        model.save(str(tmp))
    report.file_size = path_size(path)
    report.delegation = coreml_spec_summary(model.get_spec())

    if sys.platform == "darwin":
        _predict_parity(report, model, encoder if reference is None else reference, list(check_inputs or [example]))
        if compression == "none" and report.cosine is not None:
            report.passed = report.cosine >= min_cosine
    else:
        report.checked_with = "spec only: CoreML prediction needs macOS"
    report.seconds = time.perf_counter() - t0
    _logger.info(
        "coreml %s %s -> %s (%.1f MB, %s, %.1f s)",
        tower,
        label,
        path.name,
        report.file_size / 1e6,
        report.checked_with if report.cosine is None else f"cosine {report.cosine:.6f}",
        report.seconds,
    )
    return report


def _without_input_normalization(encoder: nn.Module) -> nn.Module:
    out = copy.copy(encoder)  # shallow: shares the tower; only the flag differs
    out.normalize_input = False
    return out


def _predict_parity(
    report: ExportReport, model: ct.models.MLModel, reference: nn.Module, inputs: list[tuple[torch.Tensor, ...]]
) -> None:
    """Run the package with CoreML (macOS only) and compare with PyTorch."""
    refs, outs = [], []
    for (x,) in inputs:
        if report.tower == "image":
            # what an app passes: 8-bit pixels; compare against PyTorch on the same quantised pixels
            pixels = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            feed = {"image": Image.fromarray(pixels, mode="RGB")}
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
        else:
            feed = {"text": x.to(torch.int32).numpy()}
        with torch.no_grad():
            refs.append(reference(x))
        outs.append(torch.from_numpy(np.asarray(model.predict(feed)["embedding"], dtype=np.float32)))
    report.max_abs_diff, report.cosine = parity(torch.cat(refs), torch.cat(outs))
    report.checked_with = "coremltools.predict"
