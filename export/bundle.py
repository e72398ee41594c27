"""App bundle written next to the exported models: manifest, tokenizer files, class embeddings.

* ``clip-vocab.json`` (token -> id) and ``clip-merges.txt`` (``#version: 0.2`` header, one merge per line) are
  derived from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``, in the form the MobileCLIP iOS app's
  Swift ``CLIPTokenizer`` (and Hugging Face ``CLIPTokenizer``) reads; SOT/EOT are ``<|startoftext|>`` (49406)
  and ``<|endoftext|>`` (49407), padding is 0.
* ``tokenizer/`` instead, for a student whose text tower is a Hugging Face encoder (`students.hf_text`): that
  tokenizer's own ``save_pretrained`` files (``tokenizer.json`` for the Rust ``tokenizers`` library and
  ``AutoTokenizer``), with its special ids, lower-casing and padding rule in the manifest.
* ``class_embeddings.json``: L2-normalised text embeddings of class names (prompt-ensembled) computed with the
  PyTorch text tower, so an app can classify images without running the text tower.
* ``manifest.json``: model facts (image size, mean/std, context length, embed dim, logit scale), tokenizer,
  artifacts with checksums and parity results, versions.

References: open_clip ``tokenizer.py`` (``SimpleTokenizer``); apple/ml-mobileclip ``ios_app`` Resources.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mcd_common.files import atomic_path, atomic_write_bytes, atomic_write_text, package_versions, sha256_file

if TYPE_CHECKING:  # annotations only: transformers is heavy and only Hugging Face text towers need it
    from transformers import PreTrainedTokenizerBase

_logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_EMBEDDINGS_NAME",
    "DEFAULT_TEMPLATES",
    "MANIFEST_NAME",
    "MERGES_NAME",
    "TOKENIZER_DIR",
    "VOCAB_NAME",
    "class_embeddings",
    "read_manifest",
    "versions",
    "write_class_embeddings",
    "write_hf_tokenizer",
    "write_json",
    "write_student_tokenizer",
    "write_tokenizer_files",
]

MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "clip-vocab.json"
MERGES_NAME = "clip-merges.txt"
CLASS_EMBEDDINGS_NAME = "class_embeddings.json"
TOKENIZER_DIR = "tokenizer"
"""Folder of a Hugging Face text tower's tokenizer (``save_pretrained``) in the bundle."""
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
"""Id of SOT in the CLIP vocabulary (checked against the built vocabulary in `write_tokenizer_files`)."""
EOT_ID = 49407
"""Id of EOT: the largest id, which is why open_clip's argmax pooling finds it."""
# NOTE: open_clip keeps the first 49152 - 256 - 2 merges of the file; 256 byte tokens + 256 "</w>" byte tokens +
# 48894 merges + SOT + EOT = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_VERSIONED = (
    *("torch", "executorch", "coremltools", "onnx", "onnxruntime", "onnxscript", "transformers"),
    *("open_clip_torch", "timm", "torchao", "mobileclip-distill"),
)
"""The distributions whose versions shape the artifacts (`versions`)."""


def write_json(path: Path, data: object, indent: int | None = 2) -> None:
    """Atomically write ``data`` as UTF-8 JSON (non-ASCII kept as is: class names may be in any language)."""
    atomic_write_text(Path(path), json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def read_manifest(bundle: Path) -> dict[str, object]:
    """Read ``manifest.json`` of an exported bundle."""
    return json.loads((Path(bundle) / MANIFEST_NAME).read_text(encoding="utf-8"))


def _bpe_merges() -> list[str]:
    from open_clip.tokenizer import default_bpe  # lazy: open_clip imports transformers (heavy)

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return lines[1 : _NUM_MERGES + 1]  # line 0 is the "#version" header


def write_tokenizer_files(out: Path) -> dict[str, object]:
    """Write ``clip-vocab.json`` and ``clip-merges.txt`` into ``out``; returns the manifest's tokenizer entry."""
    from open_clip.tokenizer import bytes_to_unicode  # lazy: open_clip imports transformers (heavy)

    merges = _bpe_merges()
    byte_tokens = list(bytes_to_unicode().values())
    # same id order as open_clip's SimpleTokenizer.encoder: bytes, bytes + "</w>", merges, SOT, EOT
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or (vocab[SOT_TOKEN], vocab[EOT_TOKEN]) != (SOT_ID, EOT_ID):
        raise RuntimeError("unexpected CLIP vocabulary (duplicate tokens or SOT/EOT ids moved)")
    out = Path(out)
    write_json(out / VOCAB_NAME, vocab, indent=None)
    atomic_write_bytes(out / MERGES_NAME, ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    return {
        "type": "clip_bpe",
        "vocab": VOCAB_NAME,
        "merges": MERGES_NAME,
        "files": _file_entries(out, [out / VOCAB_NAME, out / MERGES_NAME]),
        "vocab_size": len(vocab),
        "sot_token": SOT_TOKEN,
        "eot_token": EOT_TOKEN,
        "sot_token_id": vocab[SOT_TOKEN],
        "eot_token_id": vocab[EOT_TOKEN],
        "pad_token_id": 0,
        "lowercase": True,
        "pattern": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        "truncation": "keep the first context_length - 1 ids and end with EOT (open_clip)",
    }


def _file_entries(root: Path, paths: Sequence[Path]) -> list[dict[str, str]]:
    """``[{"file": path relative to root, "sha256": ...}]`` in sorted order."""
    return [{"file": p.relative_to(root).as_posix(), "sha256": sha256_file(p)} for p in sorted(paths)]


def _lowercase(tok: PreTrainedTokenizerBase) -> bool | None:
    """Whether the tokenizer lower-cases (``do_lower_case``, else its normalizer's ``lowercase``); None if unknown."""
    value = getattr(tok, "do_lower_case", None)
    normalizer = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    if value is None and normalizer is not None:
        value = json.loads(normalizer.__getstate__()).get("lowercase")
    return None if value is None else bool(value)


def _special(tok: PreTrainedTokenizerBase, name: str) -> dict[str, object]:
    token, token_id = getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None)
    return {f"{name}_token": None if token is None else str(token), f"{name}_token_id": token_id}


def write_hf_tokenizer(out: Path, tok: PreTrainedTokenizerBase, context_length: int) -> dict[str, object]:
    """Write a Hugging Face tokenizer (``save_pretrained``) into ``out/tokenizer``; returns the manifest entry.

    The entry says how the student tokenises (what an app must repeat): special tokens added, right padding with
    ``pad_token_id`` to ``context_length``, truncation to ``context_length``. The exported text towers take the
    ids alone: the attention mask is computed inside them (``ids != pad_token_id``), as `students.hf_text` does.
    """
    out = Path(out)
    with atomic_path(out / TOKENIZER_DIR) as tmp:
        tok.save_pretrained(tmp)
    for stale in (VOCAB_NAME, MERGES_NAME):  # a CLIP student exported into the same folder before
        (out / stale).unlink(missing_ok=True)
    model_max = getattr(tok, "model_max_length", None)
    return {
        "type": "hf",
        "dir": TOKENIZER_DIR,
        "class": type(tok).__name__,
        "files": _file_entries(out, [p for p in (out / TOKENIZER_DIR).rglob("*") if p.is_file()]),
        "vocab_size": len(tok),
        **_special(tok, "pad"),
        **_special(tok, "cls"),
        **_special(tok, "sep"),
        **_special(tok, "unk"),
        "lowercase": _lowercase(tok),
        "context_length": int(context_length),
        "model_max_length": model_max if isinstance(model_max, int) and model_max < 1_000_000 else None,
        "add_special_tokens": True,
        "padding": f"{getattr(tok, 'padding_side', 'right')}, with pad_token_id, to context_length",
        "truncation": f"{getattr(tok, 'truncation_side', 'right')}: to context_length ids, special tokens kept",
        "model_inputs": ["input_ids"],
        "attention_mask_input": False,
        "note": "the text model takes int32 input_ids only; it masks the ids equal to pad_token_id itself "
        "(no attention_mask or token_type_ids input)",
    }


def write_student_tokenizer(out: Path, student: torch.nn.Module, context_length: int) -> dict[str, object]:
    """Write the student's tokenizer files into ``out``; returns the manifest's tokenizer entry.

    A Hugging Face text tower gets its own tokenizer (`write_hf_tokenizer`); every other student tokenises with
    CLIP BPE (`write_tokenizer_files`).
    """
    # NOTE: lazy: students imports open_clip (heavy); an exported student has imported it already
    from students.hf_text import HFTokenizer

    text_tokenizer = getattr(student, "text_tokenizer", None)
    tok = text_tokenizer() if callable(text_tokenizer) else None
    if isinstance(tok, HFTokenizer):
        return write_hf_tokenizer(out, tok.tokenizer, context_length)
    shutil.rmtree(Path(out) / TOKENIZER_DIR, ignore_errors=True)  # a Hugging Face student exported here before
    return write_tokenizer_files(out) | {"context_length": int(context_length)}


@torch.no_grad()
def class_embeddings(
    student: torch.nn.Module, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """Prompt-ensembled, L2-normalised class embeddings `[C, D]` from the PyTorch text tower.

    Each class is embedded with every template (``"a photo of a {}."``), the normalised embeddings are averaged
    and normalised again (CLIP's zero-shot recipe).
    """
    if not class_names:
        raise ValueError("class_names is empty")
    student = student.eval()
    out = []
    for name in class_names:
        tokens = student.tokenize([t.format(name) for t in templates])
        emb = student.encode_text(tokens, normalize=True)  # [T, D]
        out.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)


def write_class_embeddings(
    out: Path, class_names: Sequence[str], embeddings: torch.Tensor, templates: Sequence[str]
) -> dict[str, object]:
    """Write ``class_embeddings.json`` (names, templates, ``[C, D]`` float list); returns the manifest entry."""
    data = {
        "classes": list(class_names),
        "templates": list(templates),
        "dim": int(embeddings.shape[1]),
        "normalized": True,
        "embeddings": embeddings.float().tolist(),
    }
    write_json(Path(out) / CLASS_EMBEDDINGS_NAME, data, indent=None)
    return {"file": CLASS_EMBEDDINGS_NAME, "count": len(class_names), "templates": list(templates)}


def versions() -> dict[str, str]:
    """Versions of the packages that shape the artifacts."""
    return package_versions(_VERSIONED)


def utc_now() -> str:
    """ISO-8601 UTC timestamp (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
