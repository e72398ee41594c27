"""export.onnx: .onnx files pass onnx.checker, run in ONNX Runtime and match the student; int8 keeps its answers."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F

from export.api import load_calibration_images
from export.onnx import OnnxRunner, export_onnx, quantize_onnx
from export.prepare import example_inputs, prepare_towers


@pytest.mark.parametrize(
    ("name", "tower", "dynamic"),
    [
        ("test_tiny_mct", "text", False),  # MCt: RepMixer + transformer, the token lookup named like the output
        ("test_tiny_mci", "image", True),  # FastViT (MobileOne/RepMixer folded), dynamic batch
        ("test_tiny_coca", "image", False),  # CoCa: (embedding, tokens) tower, attentional pooler
        ("test_tiny_coca", "text", True),  # CoCa: CLS token with a per-sample pad mask
    ],
)
def test_onnx_parity(make_student, student_embedding, tmp_path: Path, name: str, tower: str, dynamic: bool) -> None:
    student = make_student(name)
    encoders = dict(zip(("image", "text"), prepare_towers(student, backend="eager"), strict=True))
    image, tokens = example_inputs(student.image_size, student.context_length)
    x = image if tower == "image" else tokens
    report = export_onnx(encoders[tower], (x,), tmp_path / f"{tower}.onnx", tower=tower, dynamic_batch=dynamic)
    onnx.checker.check_model(str(report.path), full_check=True)
    model = onnx.load(str(report.path))
    assert [i.name for i in model.graph.input] == [tower] and [o.name for o in model.graph.output] == ["embedding"]
    assert report.delegation["inputs"][tower][0] == ("batch" if dynamic else 1)
    assert report.passed and report.checked_with.startswith("onnxruntime")
    # independent check on other inputs: ONNX Runtime against the student's own forward
    if tower == "image":
        x2 = torch.rand(3, 3, student.image_size, student.image_size)
    else:
        x2 = student.tokenize(["a cat on a mat", "two dogs", "x"]).to(torch.int32)
    runner = OnnxRunner(report.path, threads=1)
    assert runner.dynamic_batch == dynamic
    got, want = runner(x2), student_embedding(student, tower, x2)
    assert F.cosine_similarity(got, want).min() >= 0.99999
    assert (got - want).abs().max() < 1e-5


def test_onnx_int8_text_dynamic_and_image_static(make_student, tmp_path: Path, image_folder: Path) -> None:
    student = make_student("test_tiny")
    image_enc, text_enc = prepare_towers(student, backend="eager")
    image, tokens = example_inputs(student.image_size, student.context_length)
    checks = {"image": [(torch.rand(1, 3, 32, 32),) for _ in range(3)], "text": [(tokens,)]}
    fp32 = {
        "image": export_onnx(image_enc, (image,), tmp_path / "image.onnx", tower="image"),
        "text": export_onnx(text_enc, (tokens,), tmp_path / "text.onnx", tower="text"),
    }
    calib = [(c,) for c in load_calibration_images(image_folder, 32, count=8)]
    q_image = quantize_onnx(
        fp32["image"].path,
        tmp_path / "image_int8.onnx",
        tower="image",
        calibration=calib,
        reference=image_enc,
        check_inputs=checks["image"],
    )
    q_text = quantize_onnx(
        fp32["text"].path, tmp_path / "text_int8.onnx", tower="text", reference=text_enc, check_inputs=checks["text"]
    )
    assert (q_image.precision, q_text.precision) == ("int8", "int8_dynamic")
    assert q_image.passed is None and q_text.passed is None  # reported, not judged
    assert q_image.cosine > 0.95 and q_text.cosine > 0.98
    # the quantised ops are what each mode promises
    assert q_image.delegation["ops"].get("QuantizeLinear", 0) > 0 and "ConvInteger" not in q_image.delegation["ops"]
    assert q_text.delegation["ops"].get("DynamicQuantizeLinear", 0) > 0
    assert q_text.file_size < 0.5 * fp32["text"].file_size  # int8 MatMul weights and token table
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(
            fp32["image"].path, tmp_path / "x.onnx", tower="image", reference=image_enc, check_inputs=checks["image"]
        )
