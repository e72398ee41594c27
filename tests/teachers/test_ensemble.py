"""Teacher ensembles: member order, dict outputs equal to the members', names with dots, logit scales."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import teachers
from teachers import registry
from teachers.registry import TeacherCfg


def test_tiny_ensemble_order_and_outputs() -> None:
    ens = teachers.create_teacher("test_tiny_ensemble")
    assert isinstance(ens, teachers.TeacherEnsemble)
    assert ens.names == ["test_tiny", "test_tiny_b"] == list(ens) == ens.keys()
    assert ens.embed_dims == {"test_tiny": 32, "test_tiny_b": 48}
    assert ens.logit_scales == {"test_tiny": 50.0, "test_tiny_b": 50.0}  # the default KD scale, not the learned 1/0.07
    assert "test_tiny" in ens and "nope" not in ens and len(ens) == 2
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    texts = ["a dog", "two red squares"]
    img, txt = ens.encode_image(x), ens.encode_texts(texts)
    assert list(img) == list(txt) == ens.names
    for name in ens.names:
        single = teachers.create_teacher(name)
        torch.testing.assert_close(img[name], single.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(txt[name], single.encode_texts(texts), rtol=0, atol=0)
        assert img[name].shape == (3, ens.embed_dims[name])
    tokens = ens.tokenize(texts)
    assert tokens["test_tiny"].shape == (2, 16) and tokens["test_tiny_b"].shape == (2, 20)
    torch.testing.assert_close(ens.encode_text(tokens)["test_tiny_b"], txt["test_tiny_b"], rtol=0, atol=0)
    ens.train()
    assert not any(m.training for m in ens.modules())


def test_adhoc_comma_list_keeps_order_and_dotted_names(scratch_teachers: None) -> None:
    teachers.register_teacher(dataclasses.replace(teachers.get_teacher_cfg("test_tiny"), name="tiny.dotted"))
    ens = teachers.create_teacher("test_tiny_b, tiny.dotted")
    assert ens.names == ["test_tiny_b", "tiny.dotted"]
    assert ens["tiny.dotted"].name == "tiny.dotted"
    # nn.Module child names cannot hold ".", state-dict keys stay valid
    assert all("." not in key for key in ens._modules)
    assert [name for name, _ in ens.items()] == ens.names
    with pytest.raises(ValueError, match="duplicate"):
        teachers.create_teacher("test_tiny,test_tiny")


def test_member_logit_scales(scratch_teachers: None) -> None:
    teachers.register_teacher(
        TeacherCfg(
            name="tiny_v2", source="ensemble", members=("test_tiny", "test_tiny_b"), member_logit_scales=(70, 60)
        )
    )
    ens = teachers.create_teacher("tiny_v2")
    assert ens.logit_scales == {"test_tiny": 70.0, "test_tiny_b": 60.0}
    # the ensemble's own cfg rebuilds the same ensemble
    assert ens.cfg.member_logit_scales == (70.0, 60.0)
    assert teachers.create_teacher(ens.cfg).logit_scales == ens.logit_scales
    # one ensemble-wide scale applies to every member, as MobileCLIP v1's 100
    assert teachers.create_teacher("test_tiny_ensemble", logit_scale=100.0).logit_scales == {
        "test_tiny": 100.0,
        "test_tiny_b": 100.0,
    }


def test_as_ensemble() -> None:
    single = teachers.create_teacher("test_tiny")
    ens = teachers.as_ensemble(single)
    assert ens.names == ["test_tiny"] and ens["test_tiny"] is single
    assert teachers.as_ensemble(ens) is ens
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ens.encode_image(x)["test_tiny"], single.encode_image(x), rtol=0, atol=0)
    with pytest.raises(TypeError):
        teachers.as_ensemble(torch.nn.Linear(2, 2))


@pytest.fixture
def scratch_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_TEACHERS", dict(registry._TEACHERS))
