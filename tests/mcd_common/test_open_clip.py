"""The open_clip adapter: the private functions it wraps still have the signatures and results it relies on."""

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip import coca_model
from open_clip.coca_model import CoCa
from open_clip.transformer import MultimodalTransformer, TextTransformer, VisionTransformer
from safetensors.torch import save_file

from mcd_common import _open_clip as adapter

VISION = {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


def test_installed_open_clip_matches_the_adapter():
    adapter.check_open_clip()  # raises OpenClipAPIError, naming the function, if open_clip changed


def test_a_changed_signature_fails_loudly_naming_the_function(monkeypatch):
    def _build_text_decoder_tower(embed_dim, multimodal_cfg, *, quick_gelu=False, cast_dtype=None, new_arg=None):
        raise AssertionError("never called")

    monkeypatch.setattr(coca_model, "_build_text_decoder_tower", _build_text_decoder_tower)
    with pytest.raises(adapter.OpenClipAPIError, match=r"_build_text_decoder_tower.*new_arg.*open_clip_torch==3.3.0"):
        adapter.check_open_clip()
    monkeypatch.delattr(coca_model, "_build_text_decoder_tower")
    with pytest.raises(adapter.OpenClipAPIError, match="no longer has"):
        adapter.check_open_clip()


def test_tower_builders_return_open_clip_towers():
    vision = adapter.build_vision_tower(12, VISION, quick_gelu=False)
    assert isinstance(vision, VisionTransformer) and vision(torch.rand(2, 3, 16, 16)).shape == (2, 12)
    text = adapter.build_text_tower(12, TEXT, quick_gelu=True)
    assert isinstance(text, TextTransformer) and text(torch.randint(0, 64, (2, 8))).shape == (2, 12)
    decoder = adapter.build_text_decoder_tower(64, {**TEXT, "width": 16}, quick_gelu=False)
    assert isinstance(decoder, MultimodalTransformer) and decoder.text_projection.shape == (16, 64)
    pooled, tokens = adapter.vision_global_pool(vision, torch.rand(2, 5, 16))
    assert pooled.shape == (2, 16) and tokens.shape == (2, 4, 16)


def test_coca_encode_image_returns_latent_and_tokens():
    cfg = {**VISION, "attentional_pool": True, "attn_pooler_queries": 5, "attn_pooler_heads": 2, "output_tokens": True}
    model = CoCa(
        16, multimodal_cfg=dict(TEXT), text_cfg={**TEXT, "embed_cls": True, "output_tokens": True}, vision_cfg=cfg
    ).eval()
    latent, tokens = adapter.coca_encode_image(model, torch.rand(2, 3, 16, 16), normalize=True)
    assert latent.shape == (2, 16) and tokens.shape == (2, 4, 16)
    torch.testing.assert_close(latent.norm(dim=-1), torch.ones(2))


def test_find_checkpoint_in_dir_prefers_open_clip_names(tmp_path: Path):
    assert adapter.find_checkpoint_in_dir(tmp_path) is None
    for name in ("a.bin", "model.safetensors", "open_clip_model.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    assert adapter.find_checkpoint_in_dir(tmp_path) == tmp_path / "open_clip_model.safetensors"
    assert open_clip.__version__ == adapter.TESTED_VERSION
