"""Hugging Face `CLIPModel` checkpoints (the TinyCLIP ports' format) load into students with transformers' own
embeddings (issue 10, item 2). Tiny `CLIPModel`s are built from a config and saved with `save_pretrained`."""

from __future__ import annotations

import pytest
import torch
import transformers

from mcd_common import UsageError
from students import WeightSpec, create_student, get_student_cfg, load_student, save_student
from students.convert_hf import convert_hf_clip_state_dict, hf_clip_student_cfg

VOCAB = 1000


def _clip_config(*, act: str = "gelu", vocab: int = VOCAB, **sizes: int) -> object:
    """A `CLIPConfig` with test_tiny's sizes (embed 32, ViT 32 px / patch 8 / 32 x 2, text 32 x 2, context 16)."""
    text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    text.update(vocab_size=vocab, max_position_embeddings=16, hidden_act=act, eos_token_id=vocab - 1)
    text.update(bos_token_id=vocab - 2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8, hidden_act=act)
    text.update({k[5:]: v for k, v in sizes.items() if k.startswith("text_")})
    vision.update({k[7:]: v for k, v in sizes.items() if k.startswith("vision_")})
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _hf_model(tmp_path, **kw: object) -> tuple[object, object]:
    torch.manual_seed(11)
    model = transformers.CLIPModel(_clip_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move norms/biases away from their init
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _inputs(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, vocab - 2, (2, 16), generator=gen)
    tokens[0, 6], tokens[1, 15] = vocab - 1, vocab - 1  # one EOS per caption, the largest id
    return image, tokens


def _hf_features(model: object, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (
            model.get_image_features(pixel_values=image).pooler_output,
            model.get_text_features(input_ids=tokens).pooler_output,
        )


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_hf_directory_loads_with_transformers_embeddings(tmp_path, act):
    model, directory = _hf_model(tmp_path, act=act)
    student = load_student(directory)  # architecture from config.json
    assert student.cfg.quick_gelu == (act == "quick_gelu")
    image, tokens = _inputs()
    want_image, want_text = _hf_features(model, image, tokens)
    with torch.no_grad():
        got_image, got_text = student.encode_image(image, normalize=False), student.encode_text(tokens, normalize=False)
    assert (got_image - want_image).abs().max().item() < 1e-5
    assert (got_text - want_text).abs().max().item() < 1e-5

    again = load_student(save_student(student, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(tokens, normalize=False), got_text)


def test_registered_student_takes_hf_weights_and_checks_the_activation(tmp_path):
    model, directory = _hf_model(tmp_path, act="quick_gelu", vocab=49408)
    with pytest.raises(UsageError, match="quick_gelu=True"):
        create_student("test_tiny", weights=WeightSpec(file=str(directory)))
    student = create_student("test_tiny", quick_gelu=True, weights=WeightSpec(file=str(directory))).eval()
    image, tokens = _inputs(vocab=49408)
    want_image, want_text = _hf_features(model, image, tokens)
    with torch.no_grad():
        assert (student.encode_text(tokens, normalize=False) - want_text).abs().max().item() < 1e-5
        assert (student.encode_image(image, normalize=False) - want_image).abs().max().item() < 1e-5


def test_hf_port_layout_of_tinyclip_8m_maps_onto_the_registered_student():
    # the HF port of TinyCLIP ViT-8M/16 Text-3M: ViT 256 x 10 (4 heads), patch 16, text 256 x 3 (4 heads)
    config = _clip_config(
        vocab=49408,
        text_hidden_size=256, text_intermediate_size=1024, text_num_hidden_layers=3, text_num_attention_heads=4,
        text_max_position_embeddings=77, vision_hidden_size=256, vision_intermediate_size=1024,
        vision_num_hidden_layers=10, vision_num_attention_heads=4, vision_image_size=224, vision_patch_size=16,
    )  # fmt: skip
    config.projection_dim = 512
    with torch.device("meta"):
        hf = transformers.CLIPModel(config)
        student = create_student("tinyclip_vit_8m_16_text_3m")
    converted = convert_hf_clip_state_dict(hf.state_dict())
    own = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    cfg = hf_clip_student_cfg(config.to_dict(), converted)
    assert cfg == get_student_cfg("tinyclip_vit_8m_16_text_3m")


def test_unknown_hf_keys_and_missing_config_are_reported(tmp_path):
    _, directory = _hf_model(tmp_path)
    (directory / "config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(UsageError, match="config.json"):
        load_student(directory / "model.safetensors")
    with torch.device("meta"):
        state = transformers.CLIPModel(_clip_config()).state_dict()
    with pytest.raises(UsageError, match="text_model.encoder.layers.0.gate"):
        convert_hf_clip_state_dict({**state, "text_model.encoder.layers.0.gate.weight": torch.empty(1)})
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(UsageError, match=r"layer 1 of the visual tower lacks \['k'\]_proj"):
        convert_hf_clip_state_dict(state)
