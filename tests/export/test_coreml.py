"""export.coreml: ML program packages with the app-facing spec (checked on Linux; prediction needs macOS)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from export.coreml import export_coreml, image_preprocessing
from export.prepare import ImageEncoder, example_inputs, prepare_towers


def test_image_preprocessing_folds_uniform_std_only() -> None:
    scale, bias, folded = image_preprocessing((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert folded and math.isclose(scale, 1 / 255) and bias == [0.0, 0.0, 0.0]
    scale, bias, folded = image_preprocessing((0.5, 0.25, 0.0), (0.5, 0.5, 0.5))
    assert folded and math.isclose(scale, 1 / 127.5) and bias == [-1.0, -0.5, 0.0]
    # OpenAI std differs per channel: ImageType has one scale, so the model normalises inside
    scale, bias, folded = image_preprocessing((0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    assert not folded and math.isclose(scale, 1 / 255) and bias == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_text_package_spec(make_student, tmp_path: Path, precision: str) -> None:
    student = make_student("test_tiny_mct")
    _, text_enc = prepare_towers(student, backend="coreml")
    _, tokens = example_inputs(student.image_size, student.context_length)
    report = export_coreml(text_enc, (tokens,), tmp_path / "text.mlpackage", tower="text", precision=precision)
    assert (tmp_path / "text.mlpackage").is_dir() and not list(tmp_path.glob("*.tmp-*"))
    spec = report.delegation
    assert spec["inputs"] == [{"name": "text", "type": "multiArrayType", "shape": [1, 16], "dtype": "INT32"}]
    assert spec["outputs"] == [{"name": "embedding", "type": "multiArrayType", "shape": [1, 32], "dtype": "FLOAT32"}]
    assert spec["opset"] == "CoreML7"  # iOS 17
    dtypes = spec["op_output_dtypes"]
    if precision == "fp16":
        assert dtypes["FLOAT16"] > 10 and dtypes.get("FLOAT32", 0) <= 2  # only the input/output casts stay FP32
    else:
        assert "FLOAT16" not in dtypes and dtypes["FLOAT32"] > 10
    assert spec["ops"]["layer_norm"] >= 3  # fused CoreML layer_norm kept (not decomposed) for the coreml backend
    if sys.platform != "darwin":
        assert report.checked_with.startswith("spec only") and report.passed is None
    else:
        assert report.passed


def test_image_package_folds_normalisation_into_imagetype(make_student, tmp_path: Path) -> None:
    student = make_student("test_tiny")
    image_enc, _ = prepare_towers(student, backend="coreml")
    # a uniform-std normalisation can live in the ImageType: rebuild the wrapper with one
    enc = ImageEncoder(image_enc.visual, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), 32, backend="coreml")
    image, _ = example_inputs(32, 16)
    report = export_coreml(enc, (image,), tmp_path / "image.mlpackage", tower="image", compression="palettize4")
    spec = report.delegation
    assert spec["inputs"][0] | {"color_space": "RGB"} == {
        "name": "image",
        "type": "imageType",
        "width": 32,
        "height": 32,
        "color_space": "RGB",
    }
    assert spec["image_scale"] == pytest.approx([1 / (255 * 0.25)])
    assert spec["image_bias"] == pytest.approx([-2.0, -1.6, -1.2])
    assert spec["ops"].get("constexpr_lut_to_dense", 0) > 0  # palettised weights
    assert report.precision == "fp16+palettize4"
    assert enc.normalize_input  # the caller's wrapper is not modified (the export used a shallow copy)
    with torch.no_grad():
        assert torch.isfinite(enc(image)).all()
