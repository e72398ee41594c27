"""Configs, CLIPStudent interface, open_clip key compatibility and re-parameterisation."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

import students
from students import CLIPStudent, ImageTowerCfg, StudentCfg, TextTowerCfg


def test_cfg_json_round_trip() -> None:
    for name in ("mobileclip_s0", "mobileclip2_s3", "test_tiny_mci", "tiny_vit"):
        cfg = students.get_student_cfg(name)
        again = StudentCfg.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
        assert isinstance(again.image.mean, tuple)


def test_cfg_from_dict_rejects_unknown_keys() -> None:
    data = students.get_student_cfg("test_tiny").to_dict()
    data["image"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        StudentCfg.from_dict(data)


def test_overrides_resolve_towers_and_prefixes() -> None:
    cfg = students.get_student_cfg("test_tiny")
    new = cfg.with_overrides(image_size=64, context_length=8, embed_dim=16, text_layers=1, image_width=48, heads=None)
    assert (new.image.image_size, new.text.context_length, new.embed_dim) == (64, 8, 16)
    assert (new.text.layers, new.image.width, new.text.heads) == (1, 48, cfg.text.heads)
    with pytest.raises(ValueError, match="ambiguous"):
        cfg.with_overrides(width=8)
    with pytest.raises(ValueError, match="unknown student override"):
        cfg.with_overrides(nonsense=1)


@pytest.mark.parametrize("name", ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP-B", "MobileCLIP2-S0", "MobileCLIP2-S2",
                                  "MobileCLIP2-B", "MobileCLIP2-S3", "MobileCLIP2-S4"])  # fmt: skip
def test_mobileclip_configs_match_open_clip(name: str) -> None:
    ours = students.get_student_cfg(name.lower().replace("-", "_")).open_clip_model_cfg()
    theirs = open_clip.get_model_config(name)
    assert ours["embed_dim"] == theirs["embed_dim"]
    assert ours["custom_text"] == theirs["custom_text"]
    assert CLIPVisionCfg(**ours["vision_cfg"]) == CLIPVisionCfg(**theirs["vision_cfg"])
    assert CLIPTextCfg(**ours["text_cfg"]) == CLIPTextCfg(**theirs["text_cfg"])


def test_from_open_clip_inverts_open_clip_model_cfg() -> None:
    for name in ("mobileclip2_s2", "tinyclip_vit_8m_16_text_3m", "mobileclip_s0"):
        cfg = students.get_student_cfg(name)
        back = StudentCfg.from_open_clip(cfg.open_clip_model_cfg(), cfg.open_clip_preprocess_cfg(), name=cfg.name)
        assert back == cfg
    # a Hugging Face text tower is read with open_clip's defaults (mean pooler, mlp projection); a hub id as its
    # directory is refused when the tower is built (everything loads offline, students.hf_text)
    hf = StudentCfg.from_open_clip({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "bert"}})
    assert (hf.text.kind, hf.text.hf_model_dir, hf.text.hf_pooling, hf.text.hf_proj) == ("hf", "bert", "mean", "mlp")
    with pytest.raises(ValueError, match="never a hub id"):
        students.build_student(hf)


def test_state_dict_keys_match_open_clip_custom_text_clip() -> None:
    for name in ("test_tiny", "test_tiny_mci"):
        student = students.create_student(name)
        cfg = student.cfg.open_clip_model_cfg()
        cfg.pop("custom_text")
        reference = CustomTextCLIP(**cfg)
        ours = {k: tuple(v.shape) for k, v in student.state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_normalize_accepts_uint8_and_float(tiny_student: CLIPStudent) -> None:
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    a = tiny_student.normalize(pixels)
    b = tiny_student.normalize(pixels.float() / 255)
    mean = torch.tensor(students.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(students.OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (pixels.float() / 255 - mean) / std)
    with pytest.raises(TypeError):
        tiny_student.normalize(pixels.long())


def test_forward_outputs(tiny_student: CLIPStudent, tiny_batch) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(tiny_student)
    out = tiny_student(image=images, text=tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == (3, 32) and out["text_features"].shape == (3, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    raw = tiny_student.visual(images)
    torch.testing.assert_close(out["image_features"], raw / raw.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out["logit_scale"], tiny_student.logit_scale.exp())
    assert torch.isclose(tiny_student.logit_scale.detach(), torch.tensor(2.6592600), atol=0.2)
    with pytest.raises(TypeError, match="normalize"):
        tiny_student(image=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_tokenize_is_clip_bpe() -> None:
    student = students.create_student("test_tiny")
    tokens = student.tokenize(["a photo of a dog"])
    assert tokens.shape == (1, 16) and tokens.dtype == torch.long
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert (tokens[0, 7:] == 0).all()


def test_properties() -> None:
    with torch.device("meta"):
        student = students.create_student("mobileclip_s0", image_size=64, context_length=16, embed_dim=64)
    assert (student.image_size, student.context_length, student.embed_dim) == (64, 16, 64)
    assert student.mean == (0.0, 0.0, 0.0) and student.std == (1.0, 1.0, 1.0)
    assert student.interpolation == "bilinear"


@pytest.mark.parametrize("name", ["test_tiny_mci", "test_tiny_mct"])
def test_reparameterize_preserves_outputs(name: str, perturb, tiny_batch) -> None:  # noqa: ANN001
    student = perturb(students.create_student(name)).eval()
    images, tokens = tiny_batch(student, 2)
    with torch.no_grad():
        before = student(image=images, text=tokens)
        n_before = sum(p.numel() for p in student.parameters())
        assert not student.is_reparameterized
        assert student.reparameterize() is student
        after = student(image=images, text=tokens)
    assert student.is_reparameterized
    assert sum(p.numel() for p in student.parameters()) < n_before
    for key in ("image_features", "text_features"):
        assert (before[key] - after[key]).abs().max() < 1e-5


def test_reparameterize_model_counts_what_it_folds(perturb) -> None:  # noqa: ANN001
    student = perturb(students.create_student("test_tiny_mci")).eval()
    foldable = [m for m in student.visual.modules() if hasattr(m, "reparameterize")]
    assert students.reparameterize_model(student.visual) == len(foldable) > 0
    # every MobileOne/RepMixer block now runs its single folded convolution
    blocks = [m for m in student.visual.modules() if hasattr(m, "reparam_conv")]
    assert blocks and all(m.reparam_conv is not None for m in blocks)


def test_custom_cfg_builds_native_vit() -> None:
    cfg = StudentCfg(
        embed_dim=16,
        image=ImageTowerCfg(image_size=16, patch_size=8, width=16, layers=1, head_width=8),
        text=TextTowerCfg(context_length=8, width=16, heads=2, layers=1),
    )
    student = CLIPStudent(cfg)
    assert student.visual.transformer.resblocks[0].attn.num_heads == 2
    assert dataclasses.replace(cfg, name="x").name == "x"


def _captions(student: CLIPStudent) -> torch.Tensor:
    return student.tokenize(["a dog", "two cats sitting on a red sofa!", "x"])  # "!" is token 0, the pad id


@pytest.mark.parametrize("name", ["test_tiny", "test_tiny_mci"])
def test_trimmed_padding_gives_the_same_features_and_gradients_on_shorter_inputs(name: str) -> None:
    torch.manual_seed(0)
    student = students.create_student(name).train()
    tokens = _captions(student)
    longest = int((tokens != 0).sum(1).max())
    assert longest < tokens.shape[1]
    params = [p for p in student.text.parameters() if p.requires_grad]
    seen = []
    hook = student.text.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    full = student.encode_text(tokens)
    weights = torch.randn_like(full)  # not |f|^2: normalised features make that constant, its gradient ~0
    full_grads = torch.autograd.grad((full * weights).sum(), params)
    trimmed = student.encode_text(tokens, trim_padding=True)
    trimmed_grads = torch.autograd.grad((trimmed * weights).sum(), params)
    hook.remove()
    assert seen == [tokens.shape[1], longest]
    assert student.text.attn_mask.shape == (tokens.shape[1], tokens.shape[1])  # the full mask is back
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(trimmed_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_large_batch_runs_in_length_buckets_with_the_same_features_and_gradients() -> None:
    # A batch of >= 128 captions of mixed lengths: rows grouped by length, each group cut at its own longest caption.
    from mcd_common import _open_clip

    torch.manual_seed(0)
    student = students.create_student("test_tiny").train().double()  # float64: only the summation order differs
    words = "a dog runs on the green grass near two children playing with".split()
    captions = [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(160)]
    tokens = student.tokenize(captions)
    lengths = (tokens != 0).sum(1)
    params = [p for p in student.text.parameters() if p.requires_grad]
    seen = []
    hook = student.text.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    torch.manual_seed(1)
    full = student.encode_text(tokens)
    weights = torch.randn_like(full)  # not |f|^2: normalised features make that constant, its gradient ~0
    full_grads = torch.autograd.grad((full * weights).sum(), params)
    torch.manual_seed(1)
    bucketed = student.encode_text(tokens, trim_padding=True)
    bucketed_grads = torch.autograd.grad((bucketed * weights).sum(), params)
    hook.remove()
    assert seen[0] == (160, tokens.shape[1]) and len(seen) > 2  # the full pass, then at least two buckets
    assert sum(rows for rows, _ in seen[1:]) == 160 and max(n for _, n in seen[1:]) == int(lengths.max())
    assert sum(rows * n for rows, n in seen[1:]) < 0.9 * 160 * int(lengths.max())
    torch.testing.assert_close(bucketed, full, rtol=1e-9, atol=1e-12)  # rows back in their order
    for a, b in zip(bucketed_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # equal lengths, or a small batch: one pass
    assert _open_clip._bucket_plan([9] * 256) == [(256, 9)]
    seen.clear()
    hook = student.text.transformer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    student.encode_text(tokens[:100], trim_padding=True)
    hook.remove()
    assert len(seen) == 1


@pytest.mark.parametrize("name", ["test_tiny_mct", "test_tiny_coca"])
def test_towers_that_read_every_position_are_never_trimmed(name: str) -> None:
    # MCt mixes tokens with convolutions (both ways), CoCa pools an appended CLS token: padding changes their output.
    student = students.create_student(name).eval()
    tokens = _captions(student)
    with torch.no_grad():
        assert torch.equal(student.encode_text(tokens, trim_padding=True), student.encode_text(tokens))


def test_a_masked_or_compiled_text_tower_is_not_trimmed() -> None:
    from mcd_common._open_clip import padding_trimmable

    student = students.create_student("test_tiny")
    assert padding_trimmable(student.text)
    student.text.forward = student.text.forward  # what the L0 pruner's masked forward looks like
    assert not padding_trimmable(student.text)
    del student.text.forward
    student.text.compile()  # compiles lazily; a second entry point would bypass it
    assert not padding_trimmable(student.text)
