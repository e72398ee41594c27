"""open_clip teachers against direct open_clip calls on tiny checkpoints saved in the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import teachers
from mcd_common import UnknownNameError, UsageError
from teachers import TeacherCfg, WeightSpec

OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
TEXTS = ["a photo of a dog", "a red circle", ""]


def _direct_image(model, x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image((x - mean) / std, normalize=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_file_matches_direct_open_clip(fmt: str, saved_teacher_ckpt, open_clip_tiny) -> None:
    import open_clip

    path = saved_teacher_ckpt[fmt]
    x = torch.rand(3, 3, 32, 32)
    direct_img = _direct_image(open_clip_tiny, x)
    tokens = open_clip.get_tokenizer("test-tiny-clip")(TEXTS)
    with torch.no_grad():
        direct_txt = open_clip_tiny.encode_text(tokens, normalize=True)
    for teacher in (
        teachers.create_teacher("test_tiny", weights=WeightSpec(file=str(path))),
        teachers.create_teacher(f"open_clip:test-tiny-clip@{path}"),
    ):
        torch.testing.assert_close(teacher.encode_image(x), direct_img, rtol=0, atol=1e-6)
        assert torch.equal(teacher.tokenize(TEXTS), tokens)
        torch.testing.assert_close(teacher.encode_texts(TEXTS), direct_txt, rtol=0, atol=1e-6)
        assert teacher.learned_logit_scale == pytest.approx(math.exp(3.0))
        assert teacher.logit_scale == teachers.DEFAULT_KD_LOGIT_SCALE == 50.0
        assert (teacher.embed_dim, teacher.image_size, teacher.context_length) == (32, 32, 16)
        assert teacher.cfg.mean == pytest.approx(tuple(OPENAI_MEAN.flatten().tolist()))
    # and they really differ from the registry's own (seeded random) test_tiny
    assert not torch.allclose(teachers.create_teacher("test_tiny").encode_image(x), direct_img)


def test_local_dir_uses_directory_preprocessing(tmp_path: Path, open_clip_tiny, local_dir_writer) -> None:
    import open_clip

    model_cfg = open_clip.get_model_config("test-tiny-clip")
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    path = local_dir_writer(tmp_path / "student", model_cfg, open_clip_tiny.state_dict(), pp)
    teacher = teachers.create_teacher(f"local-dir:{path}")
    assert teacher.name == f"local-dir:{path}"
    assert (teacher.cfg.mean, teacher.cfg.std, teacher.cfg.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher.encode_image(x), _direct_image(open_clip_tiny, x, 0.5, 0.25), rtol=0, atol=1e-6)
    assert teacher.learned_logit_scale == pytest.approx(math.exp(3.0))
    # a weights file overrides the directory's own checkpoint
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in open_clip_tiny.state_dict().items()}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    swapped = teachers.create_teacher(f"local-dir:{path}", weights=WeightSpec(file=str(tmp_path / "other.safetensors")))
    assert not torch.allclose(swapped.encode_image(x), teacher.encode_image(x))


def test_local_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="open_clip_config.json"):
        teachers.create_teacher(f"local-dir:{tmp_path}")
    with pytest.raises(UsageError, match="no such directory"):
        teachers.create_teacher(f"local-dir:{tmp_path / 'missing'}")
    # a directory with a config but no weights must not silently become a random teacher
    import json

    import open_clip

    from teachers._open_clip_loader import add_tiny_model_configs

    add_tiny_model_configs()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    with pytest.raises(UsageError, match="random"):
        teachers.create_teacher(f"local-dir:{tmp_path}")


def test_resize_and_normalise_match_manual_pipeline() -> None:
    teacher = teachers.create_teacher("test_tiny")
    x = torch.rand(2, 3, 57, 57)
    resized = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(teacher.encode_image(x), _direct_image(teacher.model, resized), rtol=0, atol=1e-6)
    # the bilinear / mean 0.5 member normalises with its own constants at its own size
    tb = teachers.create_teacher("test_tiny_b")
    assert (tb.image_size, tb.interpolation) == (48, "bilinear")
    resized = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(tb.encode_image(x), _direct_image(tb.model, resized, 0.5, 0.5), rtol=0, atol=1e-6)
    # L2-normalised output
    torch.testing.assert_close(tb.encode_image(x).norm(dim=-1), torch.ones(2))
    # normalisation constants are buffers that never enter a state dict
    assert "mean" not in teacher.state_dict() and "std" not in teacher.state_dict()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        teacher.encode_image(torch.rand(3, 32, 32))


def test_uint8_equals_float_input() -> None:
    teacher = teachers.create_teacher("test_tiny")
    x8 = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    torch.testing.assert_close(teacher.encode_image(x8), teacher.encode_image(x8.float() / 255), rtol=0, atol=0)


def test_forward_dict() -> None:
    teacher = teachers.create_teacher("test_tiny")
    x, tokens = torch.rand(2, 3, 32, 32), teacher.tokenize(TEXTS[:2])
    out = teacher(image=x, text=tokens)
    assert out["logit_scale"] == teacher.logit_scale
    torch.testing.assert_close(out["image_features"], teacher.encode_image(x), rtol=0, atol=0)
    torch.testing.assert_close(out["text_features"], teacher.encode_text(tokens), rtol=0, atol=0)


def test_frozen_and_always_eval() -> None:
    teacher = teachers.create_teacher("test_tiny")
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert teacher.train() is teacher and not teacher.training


def test_tiny_random_weights_are_deterministic_and_keep_global_rng() -> None:
    x = torch.rand(1, 3, 32, 32)
    state = torch.random.get_rng_state()
    a = teachers.create_teacher("test_tiny").encode_image(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)
    b = teachers.create_teacher("test_tiny").encode_image(x)
    assert torch.equal(a, b)


def test_logit_scale_override() -> None:
    assert teachers.create_teacher("test_tiny", logit_scale=100.0).logit_scale == 100.0
    default = teachers.create_teacher("test_tiny")
    assert default.learned_logit_scale == pytest.approx(1 / 0.07)
    assert default.logit_scale == teachers.DEFAULT_KD_LOGIT_SCALE


def test_kd_scale_is_never_the_learned_one_unless_a_recipe_names_it(tmp_path: Path, open_clip_tiny) -> None:
    """A briefly trained teacher's learned scale (~13 on Flickr8k) made KD worse on dev than 50 (docs/RESULTS.md):
    without a configured scale the KD temperature is the default, whatever the checkpoint learned."""
    path = tmp_path / "t.safetensors"
    with torch.no_grad():
        open_clip_tiny.logit_scale.fill_(math.log(13.0))
    from safetensors.torch import save_file

    save_file(open_clip_tiny.state_dict(), str(path))
    teacher = teachers.create_teacher(f"open_clip:test-tiny-clip@{path}")
    assert teacher.learned_logit_scale == pytest.approx(13.0)
    assert teacher.logit_scale == 50.0 and teacher()["logit_scale"] == 50.0
    # published recipes keep their fixed scales (apple/ml-mobileclip: v1 100, v2 70 / 60)
    names = ("vit_l14.openai", "vit_l14.datacomp_xl", "vit_l14.dfn2b", "vit_l14.dfn2b_39b", "vit_b32.laion2b")
    got = [teachers.get_teacher_cfg(n).logit_scale for n in names]
    assert got == [100.0, 100.0, 70.0, 60.0, None]


def test_offline_hub_error_names_local_options() -> None:
    for name in ("vit_b32.laion2b", "vit_l14.dfn2b"):
        with pytest.raises(RuntimeError, match=r"--teacher_weights PATH") as info:
            teachers.create_teacher(name)
        assert "local-dir:PATH" in str(info.value)


def test_never_random_without_allow_random(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="refusing to use random"):
        teachers.create_teacher(TeacherCfg(name="not_a_test_model", arch="test-tiny-clip"))
    with pytest.raises(UsageError, match="refusing to use random"):
        teachers.create_teacher("open_clip:test-tiny-clip")
    with pytest.raises(UsageError, match="neither a pretrained tag"):
        teachers.create_teacher("open_clip:test-tiny-clip@no_such_tag")
    with pytest.raises(UsageError, match="no such file"):
        teachers.create_teacher("test_tiny", weights=WeightSpec(file=str(tmp_path / "missing.pt")))
    with pytest.raises(UnknownNameError, match="ViT-B-32"):
        teachers.create_teacher("open_clip:ViT-B-23")


def test_autocast_bf16_cpu() -> None:
    teacher = teachers.create_teacher("test_tiny")
    x = torch.rand(2, 3, 32, 32)
    ref = teacher.encode_image(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher.encode_image(x)
        txt = teacher.encode_texts(TEXTS)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=5e-2)
    torch.testing.assert_close(txt.float().norm(dim=-1), torch.ones(3), rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_cuda_channels_last_autocast() -> None:
    teacher = teachers.create_teacher("test_tiny_ensemble").cuda()
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    ref = {k: v.cpu() for k, v in teachers.create_teacher("test_tiny_ensemble").encode_image(x).items()}
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = teacher.encode_image(xc)
    for name, feats in out.items():
        assert feats.is_cuda and feats.dtype == torch.bfloat16
        torch.testing.assert_close(feats.float().cpu(), ref[name], rtol=0, atol=5e-2)
    fp32 = teacher.encode_image(x.cuda())
    for name, feats in fp32.items():
        torch.testing.assert_close(feats.cpu(), ref[name], rtol=0, atol=1e-4)
