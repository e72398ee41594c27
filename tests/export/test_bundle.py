"""export.bundle: tokenizer files an app can use, class embeddings equal to the PyTorch text tower."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import regex
import torch

from export import bundle
from mcd_common.files import sha256_file


def _bpe_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], context_length: int) -> list[int]:
    """A minimal CLIP BPE tokenizer written from the two files only (what an app implements)."""
    byte_map = open_clip.tokenizer.bytes_to_unicode()
    pattern = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    ids = [vocab["<|startoftext|>"]]
    for piece in pattern.findall(" ".join(text.lower().split())):
        word = [byte_map[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word[:-1], word[1:], strict=True))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            first, second = word[i], word[i + 1]
            merged, j = [], 0
            while j < len(word):  # merge every occurrence of the best pair, left to right
                if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        ids += [vocab[w] for w in word]
    ids = ids[: context_length - 1] + [vocab["<|endoftext|>"]]
    return ids + [0] * (context_length - len(ids))


def test_tokenizer_files_reproduce_open_clip(tmp_path: Path) -> None:
    entry = bundle.write_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / bundle.VOCAB_NAME).read_text(encoding="utf-8"))
    lines = (tmp_path / bundle.MERGES_NAME).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 48894
    assert len(vocab) == entry["vocab_size"] == 49408
    assert entry["sot_token_id"] == vocab["<|startoftext|>"] == 49406
    assert entry["eot_token_id"] == vocab["<|endoftext|>"] == 49407
    ranks = {tuple(line.split()): i for i, line in enumerate(lines[1:])}
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    sentences = [
        "a photo of a dog.",
        "Two RED apples, on a wooden table!",
        "The quick brown fox jumps over 13 lazy dogs' backs",
        "zebra-crossing in São Paulo at night",
        "mixing numbers 3.14159 and punctuation ... ?!",
    ]
    for text in sentences:
        want = reference([text])[0].tolist()
        assert _bpe_encode(text, vocab, ranks, 77) == want, text
    long_text = "word " * 100  # truncation keeps EOT last, like open_clip
    assert _bpe_encode(long_text, vocab, ranks, 77) == reference([long_text])[0].tolist()


def test_class_embeddings_equal_text_tower(make_student, tmp_path: Path) -> None:
    student = make_student("test_tiny_mct")
    names, templates = ["cat", "traffic light"], ["a photo of a {}.", "a drawing of a {}."]
    emb = bundle.class_embeddings(student, names, templates)
    with torch.no_grad():
        for i, name in enumerate(names):
            per_template = student.encode_text(student.tokenize([t.format(name) for t in templates]))
            want = per_template.mean(0) / per_template.mean(0).norm()
            torch.testing.assert_close(emb[i], want, atol=1e-6, rtol=1e-5)
    entry = bundle.write_class_embeddings(tmp_path, names, emb, templates)
    data = json.loads((tmp_path / entry["file"]).read_text())
    assert data["classes"] == names and data["dim"] == 32 and data["normalized"]
    torch.testing.assert_close(torch.tensor(data["embeddings"]), emb)


def test_versions() -> None:
    v = bundle.versions()
    for dist in ("executorch", "coremltools", "onnx", "onnxruntime", "onnxscript", "transformers"):
        assert v[dist] != "not installed", dist
    assert v["torch"]


def test_hf_text_student_bundles_its_own_tokenizer(tiny_hf_text_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    import students
    from export.api import export

    torch.manual_seed(0)
    student = students.create_student("test_tiny_hf", hf_model_dir=str(tiny_hf_text_dir))
    students.save_student(student, tmp_path / "student")
    out = tmp_path / "bundle"
    summary = export(tmp_path / "student", out, "onnx", class_names=["red circle"])
    assert summary["ok"]
    entry = bundle.read_manifest(out)["tokenizer"]
    assert entry["type"] == "hf" and entry["dir"] == bundle.TOKENIZER_DIR and entry["attention_mask_input"] is False
    assert not (out / bundle.VOCAB_NAME).exists() and not (out / bundle.MERGES_NAME).exists()
    files = {f["file"]: f["sha256"] for f in entry["files"]}
    assert f"{bundle.TOKENIZER_DIR}/tokenizer.json" in files
    assert all(sha256_file(out / name) == digest for name, digest in files.items())
    tok = AutoTokenizer.from_pretrained(out / entry["dir"], local_files_only=True)
    assert (entry["pad_token_id"], entry["cls_token_id"], entry["sep_token_id"], entry["unk_token_id"]) == (0, 2, 3, 1)
    assert entry["lowercase"] is True and entry["context_length"] == student.context_length
    sentences = ["A photo of a RED circle.", "two blue squares left of a star " * 20]  # the second is truncated
    ids = tok(sentences, padding="max_length", max_length=entry["context_length"], truncation=True)["input_ids"]
    assert ids == student.tokenize(sentences).tolist()
    # the class embeddings are the student's own tokens through its text tower
    emb = json.loads((out / bundle.CLASS_EMBEDDINGS_NAME).read_text())["embeddings"]
    torch.testing.assert_close(torch.tensor(emb), bundle.class_embeddings(student, ["red circle"]), atol=1e-6, rtol=0)
