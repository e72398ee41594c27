"""`distill zoo`: teacher parameter counts from the architecture configs (no weights, no network) and the weight
formats each registered model accepts (issue 10, item 5)."""

from __future__ import annotations

import pytest
import transformers

from distill.zoo import _counts, captioner_rows, student_rows, teacher_rows
from students import get_student_cfg, list_students
from students.published import accepted_formats
from teachers import create_captioner, create_teacher


@pytest.fixture(scope="module")
def teachers_by_name() -> dict[str, dict]:
    return {r["name"]: r for r in teacher_rows()}


def test_teacher_counts_come_from_the_configs(teachers_by_name):
    rows = teachers_by_name
    # ANCHORS §1.1: ViT-L/14 image tower 303.97 M; the text tower 123.65 M (+ logit_scale)
    assert rows["vit_l14.openai"]["image_params_m"] == pytest.approx(303.97, abs=0.01)
    assert rows["vit_l14.openai"]["params_m"] == pytest.approx(303.97 + 123.65, abs=0.02)
    ensemble, members = rows["ensemble_l14x2"], [rows["vit_l14.openai"], rows["vit_l14.datacomp_xl"]]
    assert ensemble["params_m"] == pytest.approx(sum(m["params_m"] for m in members), abs=0.02)
    assert ensemble["image_size"] == 224
    # the tiny teacher, built for real, has the parameters the meta-device count reports
    teacher = create_teacher("test_tiny")
    built = sum(p.numel() for p in teacher.model.parameters()) / 1e6
    assert rows["test_tiny"]["params_m"] == pytest.approx(built, abs=0.005)
    assert rows["test_tiny"]["image_size"] == 32


def test_hf_counts_use_a_local_config_and_never_download(tmp_path, teachers_by_name):
    assert teachers_by_name["hf.clip_vit_b32"]["params_m"] is None  # not cached here: "-", no download
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config)
    config.save_pretrained(tmp_path)
    total, image, size = _counts("hf", str(tmp_path))
    assert total == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    vision = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
    assert image == pytest.approx(sum(p.numel() for p in vision) / 1e6)
    assert size == 224


def test_weight_formats_per_model(teachers_by_name):
    students = {name: accepted_formats(get_student_cfg(name)) for name in list_students()}
    assert student_rows("mobileclip_s0")[0]["weight_formats"] == "open_clip,apple"
    assert students["mobileclip_s0"] == ["open_clip", "apple"]
    assert students["mobileclip_b"] == ["open_clip", "apple"]
    assert students["mobileclip2_s0"] == ["open_clip"]  # 12-layer text tower: no Apple v1 file has it
    assert students["tinyclip_vit_8m_16_text_3m"] == ["open_clip", "tinyclip", "hf"]
    assert students["test_tiny_mct"] == students["test_tiny_coca"] == ["open_clip"]
    assert teachers_by_name["hf.clip_vit_b32"]["weight_formats"] == "hf"
    assert teachers_by_name["ensemble_l14x2"]["weight_formats"] == "open_clip"


def test_captioner_counts():
    rows = {r["name"]: r for r in captioner_rows()}
    captioner = create_captioner("test_tiny_coca")  # built for real: the count must match it
    built = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    assert rows["test_tiny_coca"]["params_m"] == pytest.approx(built, abs=0.005)
    assert rows["coca_vit_l14.mscoco"]["params_m"] > rows["coca_vit_l14.mscoco"]["image_size"]  # counted, not "-"
    assert rows["blip_base"]["params_m"] is None
