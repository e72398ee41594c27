"""export.hf: a save_pretrained directory that transformers loads offline, with our towers' exact features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.hf import export_hf, hf_unsupported_reason, load_hf, require_hf_expressible
from export.prepare import student_meta
from mcd_common import UsageError


def test_clip_model_and_processor_equal_the_student(make_student, tmp_path: Path) -> None:
    from transformers import CLIPProcessor

    student = make_student("test_tiny")
    tokens = student.tokenize(["a dog", "two cats on a mat", "zebra-crossing at night"]).to(torch.int32)
    inputs = {"image": [(torch.rand(3, 3, 32, 32),)], "text": [(tokens,)]}
    reports = export_hf(student, tmp_path / "hf", meta=student_meta(student), check_inputs=inputs, source="x")
    assert [r.tower for r in reports] == ["image", "text"] and all(r.passed for r in reports)
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    model = load_hf(tmp_path / "hf")  # offline: the autouse fixture blocks sockets
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    pixels = (torch.rand(2, 3, 32, 32) * 255).round() / 255
    texts = ["a photo of a dog.", "Two RED apples, on a wooden table!"]
    # the processor reproduces our preprocessing and tokenizer ...
    pil = [Image.fromarray((p.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for p in pixels]
    got_pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got_pixels, student.normalize(pixels), atol=1e-5, rtol=0)
    ids = processor(text=texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    ours = student.tokenize(texts)
    # HF pads with EOT, open_clip with 0; the causal tower never sees what follows the first EOT
    assert torch.equal(torch.where(ours == 0, torch.full_like(ours, 49407), ours), ids)
    # ... and the model's features are the student's (unnormalised) features
    with torch.no_grad():
        image = model.get_image_features(pixel_values=got_pixels).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output
        want_image = student.encode_image(student.normalize(pixels), normalize=False)
        want_text = student.encode_text(ours, normalize=False)
    for got, want in ((image, want_image), (text, want_text)):
        assert (got - want).abs().max() <= 1e-4
        assert torch.nn.functional.cosine_similarity(got, want).min() >= 1 - 1e-6
    assert model.logit_scale.item() == pytest.approx(student.logit_scale.item())
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert np.allclose(processor.image_processor.image_mean, student.mean)


@pytest.mark.parametrize(
    ("name", "why"),
    [("test_tiny_mci", "TimmModel image tower"), ("test_tiny_mct", "MCt"), ("test_tiny_coca", "attentional-pool")],
)
def test_inexpressible_students_are_refused_with_the_way_out(make_student, name: str, why: str) -> None:
    student = make_student(name)
    assert why in hf_unsupported_reason(student)
    with pytest.raises(UsageError, match=r"open_clip.create_model\('local-dir:/runs/s/student'\)") as err:
        require_hf_expressible(student, "/runs/s/student")
    assert "--format hf" in str(err.value) and "\n" not in str(err.value)
    assert hf_unsupported_reason(make_student("test_tiny")) is None
