"""Registry behaviour: names, specs, close-match errors, duplicates, overrides, configs round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

import teachers
from mcd_common import UnknownNameError
from teachers import registry
from teachers.registry import CaptionerCfg, TeacherCfg, WeightSpec


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of the registries so tests can register names without leaking them."""
    monkeypatch.setattr(registry, "_TEACHERS", dict(registry._TEACHERS))
    monkeypatch.setattr(registry, "_CAPTIONERS", dict(registry._CAPTIONERS))


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, teachers; teachers.list_teachers(); print('open_clip' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_registered_names() -> None:
    expected = {
        "vit_l14.openai",
        "vit_l14.datacomp_xl",
        "vit_l14.dfn2b",
        "vit_l14.dfn2b_39b",
        "vit_b16.openai",
        "vit_b32.laion2b",
        "siglip_b16.webli",
        "hf.clip_vit_b32",
        "ensemble_l14x2",
        "ensemble_dfn2b_l14x2",
        "test_tiny",
        "test_tiny_b",
        "test_tiny_ensemble",
    }
    assert expected <= set(teachers.list_teachers())
    assert teachers.list_teachers("vit_l14.*") == [
        "vit_l14.datacomp_xl",
        "vit_l14.dfn2b",
        "vit_l14.dfn2b_39b",
        "vit_l14.openai",
    ]
    assert {"coca_vit_l14.mscoco", "blip_base", "git_base_coco", "test_tiny_coca"} <= set(teachers.list_captioners())
    v1 = teachers.get_teacher_cfg("ensemble_l14x2")
    assert v1.members == ("vit_l14.openai", "vit_l14.datacomp_xl") and v1.member_logit_scales == (100.0, 100.0)
    v2 = teachers.get_teacher_cfg("ensemble_dfn2b_l14x2")
    assert v2.members == ("vit_l14.dfn2b", "vit_l14.dfn2b_39b") and v2.member_logit_scales == (70.0, 60.0)
    # Every real teacher is a real checkpoint: none may fall back to random weights.
    for name in teachers.list_teachers():
        cfg = teachers.get_teacher_cfg(name)
        if cfg.source != "ensemble":
            assert cfg.allow_random == name.startswith("test_tiny"), name


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="vit_l14.openai"):
        teachers.get_teacher_cfg("vit_l14.opnai")
    with pytest.raises(UnknownNameError, match="test_tiny_coca"):
        teachers.create_captioner("test_tiny_coco")
    # A misspelt member of a comma-separated ensemble fails before anything is loaded.
    with pytest.raises(UnknownNameError, match="test_tiny_b"):
        teachers.create_teacher("test_tiny,test_tiny_c")


def test_duplicate_registration_raises(scratch_registry: None) -> None:
    cfg = TeacherCfg(name="dup_teacher", arch="test-tiny-clip", allow_random=True)
    teachers.register_teacher(cfg)
    with pytest.raises(ValueError, match="already registered"):
        teachers.register_teacher(dataclasses.replace(cfg, image_size=64))
    cap = CaptionerCfg(name="dup_captioner", arch="test-tiny-coca")
    teachers.register_captioner(cap)
    with pytest.raises(ValueError, match="already registered"):
        teachers.register_captioner(cap)
    with pytest.raises(ValueError, match="invalid"):
        teachers.register_teacher(TeacherCfg(name="local-dir:/x", arch="x"))


def test_source_specs() -> None:
    cfg = teachers.get_teacher_cfg("open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert (cfg.source, cfg.arch, cfg.pretrained) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert teachers.get_teacher_cfg("open_clip:ViT-B-32").pretrained is None
    cfg = teachers.get_teacher_cfg("local-dir:/some/dir")
    assert (cfg.source, cfg.arch) == ("open_clip", "local-dir:/some/dir")
    cfg = teachers.get_teacher_cfg("hf:openai/clip-vit-base-patch32")
    assert (cfg.source, cfg.arch) == ("hf", "openai/clip-vit-base-patch32")
    cfg = teachers.get_teacher_cfg(" test_tiny , open_clip:test-tiny-clip-b ")
    assert cfg.source == "ensemble" and cfg.members == ("test_tiny", "open_clip:test-tiny-clip-b")
    cap = teachers.get_captioner_cfg("open_clip:coca_ViT-B-32@mscoco_finetuned_laion2b_s13b_b90k")
    assert (cap.arch, cap.pretrained) == ("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k")


def test_overrides_drop_none_and_weights_replace() -> None:
    cfg = teachers.get_teacher_cfg("vit_l14.dfn2b")
    same = registry.apply_overrides(cfg, None, {"logit_scale": None, "image_size": None})
    assert same == cfg
    spec = WeightSpec(file="/ckpt.safetensors")
    new = registry.apply_overrides(cfg, spec, {"logit_scale": 50.0})
    assert new.weights == spec and new.logit_scale == 50.0 and new.arch == cfg.arch
    with pytest.raises(TypeError):
        registry.apply_overrides(cfg, None, {"not_a_field": 1})
    # An empty WeightSpec does not clobber the registered source.
    assert registry.apply_overrides(cfg, WeightSpec(), {}).weights == cfg.weights


def test_ensemble_rejects_single_weights_file() -> None:
    with pytest.raises(ValueError, match="comma-separated"):
        teachers.create_teacher("test_tiny_ensemble", weights=WeightSpec(file="x.pt"))


def test_cfg_validation_and_json_round_trip() -> None:
    with pytest.raises(ValueError, match="member"):
        TeacherCfg(name="e", source="ensemble")
    with pytest.raises(ValueError, match="member_logit_scales"):
        TeacherCfg(name="e", source="ensemble", members=("a", "b"), member_logit_scales=(1.0,))
    with pytest.raises(ValueError, match="arch"):
        TeacherCfg(name="t", source="open_clip")
    for cfg in (teachers.get_teacher_cfg("vit_l14.dfn2b"), teachers.get_teacher_cfg("ensemble_dfn2b_l14x2")):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert TeacherCfg.from_dict(data) == cfg
    cap = teachers.get_captioner_cfg("blip_base")
    assert CaptionerCfg.from_dict(json.loads(json.dumps(cap.to_dict()))) == cap
    assert WeightSpec(file=__import__("pathlib").Path("/a/b.pt")).file == "/a/b.pt"
