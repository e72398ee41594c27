"""Tower locking (`students.lock`): open_clip's layer groups, frozen parameters, frozen statistics, user errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import students
from mcd_common import UsageError
from students.lock import tower_groups


def _trainable(module: nn.Module, prefix: str = "") -> set[str]:
    return {n for n, p in module.named_parameters(prefix=prefix) if p.requires_grad}


@pytest.mark.parametrize("name", ["test_tiny", "test_tiny_mct", "test_tiny_mci", "test_tiny_coca", "test_tiny_hf"])
def test_groups_partition_every_tower_parameter(name, tiny_hf_text_dir):
    overrides = {"hf_model_dir": str(tiny_hf_text_dir)} if name == "test_tiny_hf" else {}
    student = students.create_student(name, **overrides)
    for tower, module in (("image", student.visual), ("text", student.text)):
        groups, never = tower_groups(student, tower)
        flat = [n for g in groups for n in g] + never
        assert sorted(flat) == sorted(n for n, _ in module.named_parameters()), (name, tower)
        assert len(flat) == len(set(flat)) and len(groups) >= 2


def test_vit_groups_follow_open_clip():
    student = students.create_student("test_tiny")  # ViT with 2 blocks: stem, block 0, [block 1, ln_post], proj
    students.lock_image_tower(student, unlocked_groups=0)
    assert not _trainable(student.visual)
    assert _trainable(student.text) == {n for n, _ in student.text.named_parameters()}  # the other tower untouched
    assert student.logit_scale.requires_grad
    student = students.create_student("test_tiny")
    students.lock_image_tower(student, unlocked_groups=1)
    assert _trainable(student.visual) == {"proj"}
    student = students.create_student("test_tiny")
    students.lock_image_tower(student, unlocked_groups=2)
    trainable = _trainable(student.visual)
    assert (
        "proj" in trainable
        and "ln_post.weight" in trainable
        and "transformer.resblocks.1.attn.in_proj_weight" in trainable
    )
    assert not any(n.startswith(("transformer.resblocks.0.", "conv1", "ln_pre")) for n in trainable)


def test_text_transformer_groups_follow_open_clip():
    student = students.create_student("test_tiny")
    students.lock_text_tower(student, unlocked_layers=1)
    assert _trainable(student.text) == {"text_projection"}
    student = students.create_student("test_tiny")
    students.lock_text_tower(student, unlocked_layers=2)
    assert {"text_projection", "ln_final.weight"} <= _trainable(student.text)
    assert not any(n.startswith(("token_embedding", "positional_embedding", "transformer.resblocks.0."))
                   for n in _trainable(student.text))  # fmt: skip


def test_timm_tower_keeps_open_clips_head_trainable_and_bn_statistics_frozen():
    student = students.create_student("test_tiny_mci", timm_proj="linear").train()
    report = students.lock_image_tower(student, unlocked_groups=0, freeze_bn_stats=True)
    assert _trainable(student.visual) == {"head.proj.weight"} and report.frozen_params > 0
    assert student.locked_eval_modules == ("visual.trunk",)
    student.train()  # what Lightning calls at every epoch / after validation
    assert not student.visual.trunk.training and student.visual.head.training and student.text.training
    bn = next(m for m in student.visual.trunk.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    student.encode_image(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)


def test_without_freeze_bn_stats_statistics_move_as_in_open_clip():
    student = students.create_student("test_tiny_mci").train()
    students.lock_image_tower(student, unlocked_groups=0, freeze_bn_stats=False)
    assert student.locked_eval_modules == () and student.visual.trunk.training
    bn = next(m for m in student.visual.trunk.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    student.encode_image(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)


def test_partial_timm_lock_freezes_leading_groups():
    student = students.create_student("test_tiny_mci")
    groups, _ = tower_groups(student, "image")
    students.lock_image_tower(student, unlocked_groups=2)
    expected = {n for g in groups[-2:] for n in g}
    assert _trainable(student.visual) == expected


def test_mct_text_lock_freezes_repmixer_statistics():
    student = students.create_student("test_tiny_mct").train()
    students.lock_text_tower(student)
    assert not _trainable(student.text) and student.locked_eval_modules == ("text",)
    student.train()
    bn = student.text.mixer_in.token_mixer.norm
    before = bn.running_var.clone()
    student.encode_text(student.tokenize(["a red circle", "a blue star"]))
    assert torch.equal(bn.running_var, before) and not student.text.training


def test_hf_text_lock_keeps_the_projection_and_unlocked_layers_trainable(tiny_hf_text_dir):
    student = students.create_student("test_tiny_hf", hf_model_dir=str(tiny_hf_text_dir)).train()
    students.lock_text_tower(student, unlocked_layers=1)
    trainable = _trainable(student.text)
    assert "proj.weight" in trainable
    assert all(n.startswith(("proj", "transformer.encoder.layer.1.")) for n in trainable)
    assert "transformer.encoder.layer.1.output.dense.weight" in trainable
    student.train()
    assert not student.text.transformer.embeddings.training  # locked layers: no dropout
    assert not student.text.transformer.encoder.layer[0].training
    assert student.text.transformer.encoder.layer[1].training


def test_freeze_layer_norm_false_leaves_locked_layernorms_trainable(tiny_hf_text_dir):
    student = students.create_student("test_tiny_hf", hf_model_dir=str(tiny_hf_text_dir))
    students.lock_text_tower(student, unlocked_layers=0, freeze_layer_norm=False)
    trainable = _trainable(student.text)
    assert "transformer.encoder.layer.0.output.LayerNorm.weight" in trainable
    assert not any("dense" in n or "word_embeddings" in n for n in trainable)


def test_lock_student_and_user_errors():
    student = students.create_student("test_tiny")
    with pytest.raises(UsageError, match="has 4 layer groups"):
        students.lock_image_tower(student, unlocked_groups=5)
    with pytest.raises(UsageError, match="--lock.image true"):
        students.lock_student(student, image_unlocked_groups=1)
    report = students.lock_student(student, image=True, text=True, text_unlocked_layers=1)
    assert set(report) == {"image", "text"} and report["text"]["unlocked_groups"] == 1
    assert _trainable(student) == {"logit_scale", "text.text_projection"}
