"""Hugging Face transformers teachers: tiny CLIPModel / SiglipModel saved to tmp_path and loaded via ``hf:DIR``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import teachers
from teachers import WeightSpec

TEXTS = ["the dog", "a cat on the mat", ""]


def _direct(model, tokenizer, x: torch.Tensor, mean, std, texts: list[str], length: int):
    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    pixel_values = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = F.normalize(feats(model.get_image_features(pixel_values=pixel_values)), dim=-1)
        txt = F.normalize(feats(model.get_text_features(input_ids=ids)), dim=-1)
    return img, txt, ids


def test_hf_clip_round_trip(hf_clip_dir: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(hf_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_clip_dir)
    teacher = teachers.create_teacher(f"hf:{hf_clip_dir}")
    assert isinstance(teacher, teachers.HFTeacher) and teacher.name == f"hf:{hf_clip_dir}"
    assert (teacher.embed_dim, teacher.image_size, teacher.context_length) == (24, 32, 16)
    assert teacher.cfg.std == (0.5, 0.5, 0.5) and teacher.cfg.interpolation == "bilinear"
    assert teacher.learned_logit_scale == pytest.approx(math.exp(model.logit_scale.item()))
    assert teacher.logit_scale == teachers.DEFAULT_KD_LOGIT_SCALE
    x = torch.rand(2, 3, 32, 32)
    img, txt, ids = _direct(model, tokenizer, x, teacher.cfg.mean, teacher.cfg.std, TEXTS, 16)
    torch.testing.assert_close(teacher.encode_image(x), img, rtol=0, atol=1e-6)
    assert torch.equal(teacher.tokenize(TEXTS), ids)
    torch.testing.assert_close(teacher.encode_texts(TEXTS), txt, rtol=0, atol=1e-6)
    # other sizes go through the processor's bilinear filter
    x48 = torch.rand(2, 3, 48, 48)
    small = F.interpolate(x48, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    img48, _, _ = _direct(model, tokenizer, small, teacher.cfg.mean, teacher.cfg.std, TEXTS, 16)
    torch.testing.assert_close(teacher.encode_image(x48), img48, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hf_weights_dir_overrides_registered_hub_id(hf_clip_dir: Path) -> None:
    teacher = teachers.create_teacher("hf.clip_vit_b32", weights=WeightSpec(file=str(hf_clip_dir)))
    assert teacher.name == "hf.clip_vit_b32" and teacher.embed_dim == 24
    ens = teachers.create_teacher(f"test_tiny,hf:{hf_clip_dir}")
    assert ens.embed_dims == {"test_tiny": 32, f"hf:{hf_clip_dir}": 24}


def test_hf_offline_error() -> None:
    with pytest.raises(RuntimeError, match="hf:/path/to/dir") as info:
        teachers.create_teacher("hf.clip_vit_b32")
    assert "openai/clip-vit-base-patch32" in str(info.value)


def test_hf_siglip(tmp_path: Path, hf_clip_dir: Path) -> None:
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    # SigLIP's sentencepiece tokenizer cannot be built tiny offline; any saved tokenizer exercises the same path.
    tokenizer = AutoTokenizer.from_pretrained(hf_clip_dir)
    text = dict(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vision["patch_size"] = 8
    torch.manual_seed(3)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    out = tmp_path / "siglip"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    teacher = teachers.create_teacher(f"hf:{out}")
    assert (teacher.embed_dim, teacher.context_length, teacher.cfg.mean) == (32, 12, (0.5, 0.5, 0.5))
    x = torch.rand(2, 3, 32, 32)
    img, txt, _ = _direct(model, tokenizer, x, (0.5,) * 3, (0.5,) * 3, TEXTS, 12)
    torch.testing.assert_close(teacher.encode_image(x), img, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.encode_texts(TEXTS), txt, rtol=0, atol=1e-6)
