"""App bundle written next to the exported models: manifest, CLIP BPE tokenizer files, class embeddings.

* ``clip-vocab.json`` (token -> id) and ``clip-merges.txt`` (``#version: 0.2`` header, one merge per line) are
  derived from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``, in the form the MobileCLIP iOS app's
  Swift ``CLIPTokenizer`` (and Hugging Face ``CLIPTokenizer``) reads; SOT/EOT are ``<|startoftext|>`` (49406)
  and ``<|endoftext|>`` (49407), padding is 0.
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
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mcd_common.files import atomic_write_bytes, atomic_write_text, package_versions

_logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_EMBEDDINGS_NAME",
    "DEFAULT_TEMPLATES",
    "MANIFEST_NAME",
    "MERGES_NAME",
    "VOCAB_NAME",
    "class_embeddings",
    "read_manifest",
    "versions",
    "write_class_embeddings",
    "write_json",
    "write_tokenizer_files",
]

MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "clip-vocab.json"
MERGES_NAME = "clip-merges.txt"
CLASS_EMBEDDINGS_NAME = "class_embeddings.json"
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
