"""TinyCLIP manual weight inheritance: exact slices, layer choice, reports and errors."""

from __future__ import annotations

import pytest
import torch

import students
from students import inherit_weights, uniform_layer_indices


def test_uniform_layer_indices() -> None:
    assert uniform_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert uniform_layer_indices(12, 5) == [0, 2, 4, 6, 8]
    assert uniform_layer_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        uniform_layer_indices(2, 3)


def _expected_tiny_vit_s(src: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
    """Naive reference for tiny_vit -> tiny_vit_s (vision 6->3 layers, 6->3 heads; text 4->2 layers, 4->2 heads)."""
    parts = key.split(".")
    if "resblocks" in parts:
        i = parts.index("resblocks") + 1
        parts[i] = str(int(parts[i]) * 2)  # step = 6 // 3 = 4 // 2 = 2
    s = src[".".join(parts)]
    heads_t, heads_s, hd = (6, 3, 32) if key.startswith("visual.") else (4, 2, 32)
    if key.endswith("in_proj_weight"):
        return torch.cat([s[j * heads_t * hd : j * heads_t * hd + heads_s * hd, : shape[1]] for j in range(3)])
    if key.endswith("in_proj_bias"):
        return torch.cat([s[j * heads_t * hd : j * heads_t * hd + heads_s * hd] for j in range(3)])
    return s[tuple(slice(0, n) for n in shape)]


def test_tiny_vit_into_tiny_vit_s_is_exact(perturb, tiny_batch) -> None:  # noqa: ANN001
    source = perturb(students.create_student("tiny_vit")).eval()
    student = students.create_student("tiny_vit_s").eval()
    src = source.state_dict()
    report = inherit_weights(student, src)
    own = student.state_dict()
    assert not report.fresh
    assert report.layer_maps == {"visual.transformer.resblocks": [0, 2, 4], "text.transformer.resblocks": [0, 2]}
    assert set(report.inherited) | set(report.sliced) == set(own)
    assert "logit_scale" in report.inherited
    for key, value in own.items():
        assert torch.equal(value, _expected_tiny_vit_s(src, key, value.shape)), key
    # skipped layers show up as unused source keys
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in report.unused
    assert "visual.transformer.resblocks.2.attn.in_proj_weight" not in report.unused
    images, tokens = tiny_batch(student)
    out = student(image=images, text=tokens)
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()


def test_report_lists_unmatched_keys() -> None:
    source = students.create_student("tiny_vit").state_dict()
    del source["visual.ln_post.weight"]
    source["extra.thing"] = torch.zeros(3)
    student = students.create_student("tiny_vit_s")
    before = student.state_dict()["visual.ln_post.weight"].clone()
    report = inherit_weights(student, source)
    assert report.fresh == ["visual.ln_post.weight"]
    assert torch.equal(student.state_dict()["visual.ln_post.weight"], before)
    assert "extra.thing" in report.unused


def test_larger_student_raises_naming_the_key() -> None:
    source = students.create_student("tiny_vit").state_dict()
    wide = students.create_student("tiny_vit", image_width=256, image_layers=2)
    with pytest.raises(ValueError, match="visual.class_embedding|visual.conv1.weight"):
        inherit_weights(wide, source)
    deep = students.create_student("tiny_vit_s", image_layers=7)
    with pytest.raises(ValueError, match="visual.transformer.resblocks"):
        inherit_weights(deep, source)


def test_multi_stage_a_to_b_to_c(perturb) -> None:  # noqa: ANN001
    a = perturb(students.create_student("tiny_vit"))
    b = students.create_student("tiny_vit", image_width=128, image_layers=3, text_width=96, text_heads=3, text_layers=2)
    c = students.create_student("tiny_vit_s")
    inherit_weights(b, a.state_dict())
    inherit_weights(c, b.state_dict())
    direct = students.create_student("tiny_vit_s")
    inherit_weights(direct, a.state_dict())
    for key, value in c.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]), key


def test_open_clip_flat_clip_source_is_converted(perturb) -> None:  # noqa: ANN001
    # open_clip's `CLIP` class (e.g. an OpenAI teacher) stores the text tower without the `text.` prefix
    source = perturb(students.create_student("tiny_vit")).state_dict()
    flat = {(k[5:] if k.startswith("text.") else k): v for k, v in source.items()}
    a, b = students.create_student("tiny_vit_s"), students.create_student("tiny_vit_s")
    inherit_weights(a, source)
    report = inherit_weights(b, {"module." + k: v for k, v in flat.items()})
    assert not report.fresh
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_source_cfg_handles_other_head_dims(perturb) -> None:  # noqa: ANN001
    source = perturb(students.create_student("tiny_vit", image_width=192, image_head_width=64))  # 3 heads of 64
    student = students.create_student("tiny_vit_s", image_width=64, image_head_width=32)  # 2 heads of 32
    inherit_weights(student, source.state_dict(), source_cfg=source.cfg)
    src = source.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"].view(3, 3, 64, 192)
    expected = src[:, :2, :32, :64].reshape(192, 64)
    assert torch.equal(student.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"], expected)
    out = source.state_dict()["visual.transformer.resblocks.0.attn.out_proj.weight"].view(192, 3, 64)
    expected = out[:64, :2, :32].reshape(64, 64)
    assert torch.equal(student.state_dict()["visual.transformer.resblocks.0.attn.out_proj.weight"], expected)


def test_fastvit_stagewise_inheritance(perturb, tiny_batch) -> None:  # noqa: ANN001
    source = perturb(students.create_student("test_tiny_mci", timm_model_name="fastvit_t12")).eval()
    student = students.create_student("test_tiny_mci").eval()  # fastvit_t8: layers (2,2,4,2) vs (2,2,6,2)
    report = inherit_weights(student, source.state_dict())
    assert report.layer_maps["visual.trunk.stages.2.blocks"] == [0, 1, 2, 3]
    assert not report.fresh
    src, own = source.state_dict(), student.state_dict()
    key = "visual.trunk.stages.2.blocks.3.mlp.fc1.weight"
    assert torch.equal(own[key], src[key][: own[key].shape[0], : own[key].shape[1]])
    branch = "visual.trunk.stages.1.blocks.1.token_mixer.mixer.conv_kxk.0.bn.running_var"
    assert torch.equal(own[branch], src[branch][: own[branch].shape[0]])
    assert "visual.trunk.stages.2.blocks.5.mlp.fc1.weight" in report.unused
    images, _ = tiny_batch(student)
    with torch.no_grad():
        assert torch.isfinite(student.encode_image(images[:1])).all()


def test_transformer_text_into_mct_keeps_shared_parts(perturb) -> None:  # noqa: ANN001
    source = perturb(students.create_student("test_tiny")).state_dict()
    student = students.create_student("test_tiny_mct")
    report = inherit_weights(student, source)
    assert torch.equal(student.state_dict()["text.token_embedding.weight"], source["text.token_embedding.weight"])
    assert torch.equal(
        student.state_dict()["text.transformer.resblocks.0.mlp.c_fc.weight"],
        source["text.transformer.resblocks.0.mlp.c_fc.weight"],
    )
    assert report.fresh and all(k.startswith(("text.mixer_in.", "text.mixer_out.")) for k in report.fresh)
