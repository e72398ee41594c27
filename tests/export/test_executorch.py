"""export.executorch: .pte programs run through executorch.runtime and match the student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from export.api import load_calibration_images
from export.executorch import available_executorch_backends, export_executorch, load_pte
from export.prepare import example_inputs, prepare_towers


@pytest.mark.parametrize(
    ("name", "tower", "one_delegate"),
    [
        ("test_tiny", "image", False),  # open_clip ViT: class-token expand/select stay outside (not rewritten)
        ("test_tiny", "text", True),  # causal open_clip text transformer
        ("test_tiny_mci", "image", True),  # FastViT (MobileOne/RepMixer folded)
    ],
)
def test_pte_parity(make_student, student_embedding, tmp_path: Path, name: str, tower: str, one_delegate: bool) -> None:
    student = make_student(name)
    image_enc, text_enc = prepare_towers(student, backend="xnnpack")
    image, tokens = example_inputs(student.image_size, student.context_length)
    enc, x = (image_enc, image) if tower == "image" else (text_enc, tokens)
    report = export_executorch(enc, (x,), tmp_path / f"{tower}.pte", tower=tower)
    assert report.path.is_file() and report.file_size == report.path.stat().st_size
    assert report.checked_with == "executorch.runtime" and report.passed
    # independent check: run the program ourselves on a second input, compare with the student's own forward
    x2 = torch.rand_like(image) if tower == "image" else student.tokenize(["a cat on a mat"]).to(torch.int32)
    got = load_pte(report.path).execute([x2])[0]
    want = student_embedding(student, tower, x2)
    assert F.cosine_similarity(got, want).min() >= 0.999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(1), atol=1e-5, rtol=0)
    if one_delegate:
        assert report.delegation["delegated_subgraphs"] == 1
        # whatever stays outside XNNPACK is input plumbing (token lookup, EOT index), never per-layer work
        outside = set(report.delegation["non_delegated_ops"])
        assert outside <= {
            "aten_embedding_default",
            "aten_argmax_default",
            "aten_eq_tensor",
            "aten_arange_start_step",
            "aten_view_copy_default",
            "aten_unsqueeze_copy_default",
            "dim_order_ops__to_dim_order_copy_default",
        }, outside


@pytest.mark.parametrize(
    "name",
    ["test_tiny", pytest.param("test_tiny_mci", marks=pytest.mark.slow)],  # FastViT int8: ~1 min to lower
)
def test_int8_static_with_calibration_folder(make_student, tmp_path: Path, image_folder: Path, name: str) -> None:
    student = make_student(name)
    image_enc, _ = prepare_towers(student, backend="xnnpack")
    calib = load_calibration_images(image_folder, student.image_size, count=8)
    assert len(calib) == 8 and calib[0].shape == (1, 3, 32, 32)  # 6 PNGs + 2 JPEGs from the tar shard
    assert all(0 <= c.min() and c.max() <= 1 for c in calib)
    image, _ = example_inputs(student.image_size, student.context_length)
    int8 = export_executorch(
        image_enc, (image,), tmp_path / "int8.pte", tower="image", quantize="int8", calibration=[(c,) for c in calib]
    )
    assert int8.precision == "int8" and int8.passed is None  # reported, not judged
    fp32_bytes = 4 * sum(p.numel() for p in image_enc.parameters())
    assert int8.file_size < 0.75 * fp32_bytes  # int8 weights, even with the program overhead of a tiny model
    assert int8.cosine is not None and int8.cosine > 0.95
    # int8 ops live inside the delegate too; only the ViT class-token plumbing stays outside
    assert set(int8.delegation["non_delegated_ops"]) <= {"aten_expand_copy_default", "aten_select_copy_int"}


def test_int8_static_needs_calibration(make_student, tmp_path: Path) -> None:
    student = make_student("test_tiny_mct")
    _, text_enc = prepare_towers(student, backend="xnnpack")
    _, tokens = example_inputs(student.image_size, student.context_length)
    with pytest.raises(ValueError, match="calibration"):
        export_executorch(text_enc, (tokens,), tmp_path / "q.pte", tower="text", quantize="int8", calibration=[])


def test_backend_availability_is_explicit() -> None:
    info = available_executorch_backends()
    assert info["xnnpack"]["lower"] and info["xnnpack"]["run"]
    for name, entry in info.items():
        if not (entry["lower"] and entry["run"]):
            assert entry["reason"], name  # never skipped silently
