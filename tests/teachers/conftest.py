"""Fixtures for the teachers tests: tiny checkpoints built in the test and saved to ``tmp_path``.

Nothing here touches the network: open_clip models come from the tiny configs shipped in ``teachers/configs/``, and
Hugging Face models are built from small configs with a tiny tokenizer saved next to them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run faster on one thread; on a loaded machine 2 OpenMP threads made them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def open_clip_tiny():
    """A randomly initialised ``test-tiny-clip`` open_clip model with weights different from the registry's."""
    import open_clip

    from teachers._open_clip_loader import add_tiny_model_configs

    add_tiny_model_configs()
    torch.manual_seed(1234)
    model = open_clip.create_model("test-tiny-clip")
    # Perturb the temperature so a wrongly loaded logit_scale is caught.
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model.eval()


@pytest.fixture
def saved_teacher_ckpt(tmp_path: Path, open_clip_tiny) -> dict[str, Path]:
    """The ``open_clip_tiny`` state dict saved as safetensors and with ``torch.save``."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in open_clip_tiny.state_dict().items()}
    paths = {"safetensors": tmp_path / "tiny.safetensors", "pt": tmp_path / "tiny.pt"}
    save_file(state, str(paths["safetensors"]))
    torch.save(state, paths["pt"])
    return paths


def write_local_dir(path: Path, model_cfg: dict, state: dict, preprocess: dict | None = None) -> Path:
    """An open_clip directory: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "open_clip_model.safetensors"))
    return path


@pytest.fixture
def local_dir_writer():
    """Return :func:`write_local_dir` (fixtures share helpers; tests never import from tests)."""
    return write_local_dir


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
    tokens += ["th", "the</w>", "do", "dog</w>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [("t", "h"), ("th", "e</w>"), ("d", "o"), ("do", "g</w>")]
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture
def hf_clip_dir(tmp_path: Path) -> Path:
    """A tiny transformers ``CLIPModel`` saved with its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = _clip_tokenizer()
    text = dict(
        vocab_size=len(tok.get_vocab()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vision["patch_size"] = 8
    torch.manual_seed(7)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    out = tmp_path / "hf_clip"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # bilinear + a non-default std so the test sees that the processor's values are used
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_std=[0.5, 0.5, 0.5], resample=2
    ).save_pretrained(out)
    return out


@pytest.fixture
def hf_blip_dir(tmp_path: Path) -> Path:
    """A tiny ``BlipForConditionalGeneration`` saved with a tiny BERT tokenizer and its processor."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = "a the dog cat on of in with red blue green shape circle square photo".split()
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "."] + words)}
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=vocab["[DEC]"],
        sep_token_id=vocab["[SEP]"],
        eos_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
        encoder_hidden_size=32,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vision["patch_size"] = 8
    torch.manual_seed(11)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    out = tmp_path / "hf_blip"
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(
        out
    )
    model.save_pretrained(out)
    return out
