"""``distill export`` then ``distill bench --iters 2``, end to end on a saved tiny MCt student."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from export import BenchArgs, ExportArgs, bench, export
from export._report import sha256_path
from export.bundle import read_manifest
from export.executorch import load_pte


@pytest.fixture(scope="module")
def exported(saved_mct: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle")
    args = ExportArgs(class_names=["cat", "dog"], executorch_backends=["xnnpack", "mps"])
    return out, export(saved_mct, out, "all", args)


def test_export_writes_a_complete_bundle(exported: tuple[Path, dict], saved_mct: Path) -> None:
    import students

    out, summary = exported
    student = students.load_student(saved_mct)
    manifest = read_manifest(out)
    names = {a["file"] for a in manifest["artifacts"]}
    assert names == {
        "image_encoder_xnnpack_fp32.pte",
        "text_encoder_xnnpack_fp32.pte",
        "image_encoder_fp16.mlpackage",
        "text_encoder_fp16.mlpackage",
    }
    assert summary["ok"] and summary["parity_failures"] == [] and any("mps" in s for s in summary["skipped"])
    for art in manifest["artifacts"]:
        assert sha256_path(out / art["file"]) == art["sha256"]
        if art["format"] == "executorch":
            assert art["passed"] and art["cosine"] >= 0.999 and art["delegation"]["delegated_subgraphs"] >= 1
    model = manifest["model"]
    assert (model["name"], model["image_size"], model["context_length"], model["embed_dim"]) == (
        "test_tiny_mct",
        32,
        16,
        32,
    )
    assert model["mean"] == list(student.mean) and model["std"] == list(student.std)
    assert model["towers"]["text"]["params"] > 0 and model["towers"]["image"]["macs"] > 0
    assert manifest["tokenizer"]["context_length"] == 16 and (out / manifest["tokenizer"]["vocab"]).is_file()
    assert manifest["versions"]["executorch"] and manifest["git_sha"]

    # the app path: tokens from the student's tokenizer -> .pte text embedding -> zero-shot against the bundle's
    # class embeddings gives the same logits as PyTorch
    classes = json.loads((out / "class_embeddings.json").read_text())
    class_emb = torch.tensor(classes["embeddings"])
    image = torch.rand(1, 3, 32, 32)
    got = load_pte(out / "image_encoder_xnnpack_fp32.pte").execute([image])[0] @ class_emb.T
    with torch.no_grad():
        want = student.encode_image(student.normalize(image)) @ class_emb.T
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tokens = student.tokenize(["a photo of a cat."]).to(torch.int32)
    text = load_pte(out / "text_encoder_xnnpack_fp32.pte").execute([tokens])[0]
    torch.testing.assert_close(text[0], class_emb[0], atol=1e-4, rtol=1e-4)  # same prompt as the class embedding


def test_bench_two_iterations(exported: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = exported
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"test_tiny_mct": 0.42}))
    res = bench(out, BenchArgs(iters=2, warmup=1, accuracy=accuracy, plot=tmp_path / "plot.png"))
    runtimes = {(r["tower"], r["runtime"]) for r in res["results"]}
    for tower in ("image", "text"):
        assert {(tower, "executorch-xnnpack"), (tower, "pytorch-eager"), (tower, "pytorch-student")} <= runtimes
    lines = [json.loads(ln) for ln in Path(res["jsonl"]).read_text().splitlines()]
    assert len(lines) == len(res["results"])
    for row in lines:
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["threads"] == 2
        assert {"device", "torch", "executorch", "git_sha", "params", "macs"} <= row.keys()
    assert "median ms" in res["table"]
    assert Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if sys.platform != "darwin":
        assert any("CoreML timing needs macOS" in n for n in res["notes"])


def test_args_validation_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--args.calibration_data"):
        ExportArgs(quantize="int8")
    with pytest.raises(ValueError, match="--args.executorch_backends"):
        ExportArgs(executorch_backends=["tflite"])
    with pytest.raises(ValueError, match="--args.templates"):
        ExportArgs(templates=["no placeholder"])
    with pytest.raises(ValueError, match="--args.iters"):
        BenchArgs(iters=0)
    with pytest.raises(ValueError, match="--format"):
        export(tmp_path, tmp_path / "out", "onnx")  # type: ignore[arg-type]
