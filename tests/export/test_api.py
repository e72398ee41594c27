"""``distill export`` then ``distill bench --iters 2``, end to end on saved tiny students (MCt, ViT, CoCa)."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

import students
from distill.cli import main
from export import bench, export
from export.api import DEPRECATED_FLAGS, FORMATS, format_summary
from export.bench import DEPRECATED_FLAGS as BENCH_DEPRECATED_FLAGS
from export.bench import accuracy_latency_points
from export.bundle import read_manifest
from export.executorch import load_pte
from export.onnx import OnnxRunner
from mcd_common import UsageError
from mcd_common.files import sha256_path


@pytest.fixture(scope="module")
def exported(saved_mct: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle")
    return out, export(saved_mct, out, "all", class_names=["cat", "dog"], executorch_backends=["xnnpack", "mps"])


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
        "image_encoder.onnx",
        "text_encoder.onnx",
    }
    assert summary["ok"] and summary["parity_failures"] == [] and any("mps" in s for s in summary["skipped"])
    for art in manifest["artifacts"]:
        assert sha256_path(out / art["file"]) == art["sha256"]
        if art["format"] == "executorch":
            assert art["passed"] and art["cosine"] >= 0.999 and art["delegation"]["delegated_subgraphs"] >= 1
        if art["format"] == "onnx":
            assert art["passed"] and art["input"]["shape"][0] == 1 and art["output"]["name"] == "embedding"
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
    onnx_text = OnnxRunner(out / "text_encoder.onnx")(tokens)
    torch.testing.assert_close(onnx_text[0], class_emb[0], atol=1e-4, rtol=1e-4)
    # quiet by default: a short table is what the CLI prints, the full report is a file
    assert len(summary["_table"].splitlines()) <= 12 and "{" not in summary["_table"]
    report = json.loads((out / "export_report.json").read_text())
    assert report["artifacts"] == json.loads(json.dumps(summary["artifacts"], default=str))
    assert format_summary(report) == summary["_table"]


def test_bench_two_iterations(exported: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = exported
    accuracy = tmp_path / "acc.json"
    accuracy.write_text(json.dumps({"test_tiny_mct": 0.42}))
    res = bench(out, iters=2, warmup=1, batch=3, accuracy=accuracy, plot=tmp_path / "plot.png")
    runtimes = {(r["tower"], r["runtime"], r["batch"]) for r in res["results"]}
    for tower in ("image", "text"):
        for runtime in ("executorch-xnnpack", "onnxruntime", "pytorch-eager", "pytorch-student"):
            assert {(tower, runtime, 1), (tower, runtime, 3)} <= runtimes
    lines = [json.loads(ln) for ln in Path(res["jsonl"]).read_text().splitlines()]
    assert len(lines) == len(res["results"])
    for row in lines:
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["threads"] == 2
        assert {"device", "torch", "executorch", "onnxruntime", "git_sha", "params", "macs", "run"} <= row.keys()
        assert row["cosine_vs_eager"] >= 0.999  # every artifact here is FP32
        if sys.platform == "linux":
            assert row["peak_rss_mb"] is not None
        if row["runtime"] in ("executorch-xnnpack", "onnxruntime") and row["batch"] == 3:
            assert row["batch_mode"] == "3 x batch 1"  # fixed batch-1 programs: N calls
    assert "b3 median ms" in res["table"] and "onnxruntime" in res["table"]
    assert Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if sys.platform != "darwin":
        assert any("CoreML timing needs macOS" in n for n in res["notes"])


def test_bench_times_hf_and_notes_missing_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    students.save_student(students.create_student("test_tiny").eval(), tmp_path / "run" / "student")
    out = tmp_path / "bundle"
    summary = export(tmp_path / "run" / "student", out, ["onnx", "hf"], onnx_dynamic_batch=True)
    assert summary["ok"] and {a["format"] for a in summary["artifacts"]} == {"onnx", "hf"}
    (out / "text_encoder.onnx").unlink()
    res = bench(out, iters=1, warmup=0, batch=2, eager=True)
    got = {(r["tower"], r["runtime"], r["batch_mode"]) for r in res["results"]}
    assert ("image", "onnxruntime", "one call") in got  # dynamic batch: one call for batch 2
    assert {("image", "transformers", "one call"), ("text", "transformers", "one call")} <= got
    assert not any(r["tower"] == "text" and r["runtime"] == "onnxruntime" for r in res["results"])
    assert any("text_encoder.onnx" in n and "missing" in n for n in res["notes"])
    assert all(r["run"] == "run" for r in res["results"])  # <run>/student -> the run's name
    assert all(r["cosine_vs_eager"] > 0.9999 for r in res["results"])


def test_plot_points_are_runs_not_architectures() -> None:
    """A distilled and a scratch run of one architecture are two points (they used to collapse into one)."""
    rows = [
        {"run": run, "student": "mobileclip_s0", "runtime": "executorch-xnnpack", "precision": "fp32",
         "batch": 1, "tower": tower, "median_ms": ms}
        for run, ms in (("s0_kd", 10.0), ("s0_scratch", 11.0)) for tower in ("image", "text")
    ]  # fmt: skip
    points = accuracy_latency_points(rows, {"s0_kd": 0.5, "s0_scratch": 0.3}, "executorch-xnnpack", "fp32")
    assert sorted(points) == [("s0_kd", 20.0, 0.5), ("s0_scratch", 22.0, 0.3)]
    # an accuracy keyed by architecture is ambiguous once two runs share it: no guessing
    assert accuracy_latency_points(rows, {"mobileclip_s0": 0.5}, "executorch-xnnpack", "fp32") == []


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("executorch", marks=pytest.mark.slow)])  # XNNPACK: ~1 min
def test_coca_student_exports(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    students.save_student(students.create_student("test_tiny_coca").eval(), tmp_path / "coca")
    summary = export(tmp_path / "coca", tmp_path / "out", fmt)
    assert summary["ok"], summary["parity_failures"]
    assert {(a["format"], a["tower"]) for a in summary["artifacts"]} == {(fmt, "image"), (fmt, "text")}
    assert all(a["cosine"] >= 0.9999 for a in summary["artifacts"])
    assert read_manifest(tmp_path / "out")["model"]["caption_decoder"] == "PyTorch only (not exported)"


def test_flat_flags_and_the_old_spellings(saved_mct: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the CLI takes flat flags; --format hf on an MCt student is a one-line usage error (exit 2) before any work
    assert main(["export", "--checkpoint", str(saved_mct), "--out", str(tmp_path / "o"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "--format hf" in err and "MCt" in err and "students.load_student" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    # every old --args.* spelling maps onto a flag that exists
    assert set(DEPRECATED_FLAGS.values()) <= {f"--{p}" for p in inspect.signature(export).parameters}
    assert set(BENCH_DEPRECATED_FLAGS.values()) <= {f"--{p}" for p in inspect.signature(bench).parameters}
    assert {"--args.quantize", "--args.class_names"} <= DEPRECATED_FLAGS.keys()
    assert {"--args.iters", "--args.threads", "--args.accuracy"} <= BENCH_DEPRECATED_FLAGS.keys()
    assert set(FORMATS) == {"coreml", "executorch", "onnx", "hf"}


def test_args_validation_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--calibration_data"):
        export(tmp_path, tmp_path / "out", quantize="int8")
    with pytest.raises(UsageError, match="--executorch_backends"):
        export(tmp_path, tmp_path / "out", executorch_backends=["tflite"])
    with pytest.raises(UsageError, match="--templates"):
        export(tmp_path, tmp_path / "out", templates=["no placeholder"])
    with pytest.raises(UsageError, match="--format"):
        export(tmp_path, tmp_path / "out", "tflite")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--iters"):
        bench(tmp_path, iters=0)
    with pytest.raises(UsageError, match="manifest.json"):
        bench(tmp_path)
