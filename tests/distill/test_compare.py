"""`distill compare` on two real tiny runs of one architecture: table, JSON and a plot labelled by run."""

import json
import shutil

import pytest
from PIL import Image

from distill.cli import main
from distill.compare import compare, compare_positionals, load_rows
from mcd_common import UsageError


def _train(root, corpus, seed):
    args = ["train", "--student", "test_tiny", "--data.path", str(corpus / "train"), "--data.batch_size", "16"]
    args += ["--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.seed", str(seed)]
    args += ["--val.zeroshot", str(corpus / "zeroshot"), "--val.retrieval", str(corpus / "val")]
    assert main(args) == 0
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    base = tmp_path_factory.mktemp("runs")
    # Same directory name under two parents: labels must still tell them apart.
    a, b = _train(base / "x" / "run", tiny_corpus, 0), _train(base / "y" / "run", tiny_corpus, 1)
    eval_args = ["eval", "--student", str(a / "student"), "--out", str(a / "eval.json")]
    eval_args += ["--data.zeroshot", str(tiny_corpus / "zeroshot"), "--data.retrieval", str(tiny_corpus / "val")]
    assert main(eval_args) == 0
    return a, b


def _bench_dir(path, checkpoint, image_ms):
    # An export directory as `distill export` + `distill bench` leave it (the keys compare reads: manifest.model,
    # and bench.jsonl lines with student/tower/runtime/precision/median_ms; older lines first, append-only).
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"model": {"name": "test_tiny", "checkpoint": str(checkpoint)}}))
    xnn = {"student": "test_tiny", "runtime": "executorch-xnnpack", "precision": "fp32"}
    lines = [
        xnn | {"tower": "image", "median_ms": 99.0},
        xnn | {"tower": "image", "median_ms": image_ms},
        xnn | {"tower": "text", "median_ms": 1.0},
        xnn | {"tower": "text", "runtime": "pytorch-eager", "median_ms": 50.0},
    ]
    (path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture
def export_beside_run_a(runs):
    export = _bench_dir(runs[0].parent / "export", runs[0] / "student", 2.0)  # found without being named
    yield export
    shutil.rmtree(export)


def test_two_runs_table_json_and_plot_by_run(runs, export_beside_run_a, tmp_path, capsys):
    a, b = runs
    other = _bench_dir(tmp_path / "elsewhere" / "exp", b / "checkpoints" / "last.ckpt", 3.0)
    out = tmp_path / "cmp" / "compare"
    assert main(["compare", str(a), str(b), str(other / "bench.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| x/run | test_tiny | scratch |" in printed and "| y/run | test_tiny | scratch |" in printed
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["label"]: r for r in saved["rows"]}
    assert set(rows) == {"x/run", "y/run"}
    assert rows["x/run"]["latency_ms"] == {"image": 2.0, "text": 1.0}  # the latest line wins
    assert rows["y/run"]["total_latency_ms"] == 4.0
    eval_a = json.loads((a / "eval.json").read_text())
    assert rows["x/run"]["metrics"]["zeroshot_top1"] == pytest.approx(eval_a["zeroshot_top1"], rel=1e-3)
    assert rows["x/run"]["metrics_source"] == "eval eval.json" and rows["y/run"]["metrics_source"] == "validation"
    assert rows["x/run"]["steps"] == 2 and rows["y/run"]["wall_seconds"] > 0
    assert {p["label"] for p in saved["points"]} == {"x/run", "y/run"} and saved["metric"] == "zeroshot_top1"
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| run | model |")
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert im.format == "PNG"


def test_an_eval_json_alone_brings_its_run_and_no_bench_plots_against_time(runs, tmp_path):
    a, b = runs
    res = compare([str(a / "eval.json"), str(b / "run.json")], out=tmp_path / "c.md", metric="t2i_R@1")
    assert [r["label"] for r in res["rows"]] == ["x/run", "y/run"]
    assert res["rows"][0]["mode"] == "scratch" and res["rows"][0]["metrics_source"] == "eval eval.json"
    assert (tmp_path / "c.md").is_file() and (tmp_path / "c.json").is_file() and res["plot"] == str(tmp_path / "c.png")
    assert {p["label"] for p in res["points"]} == {"x/run", "y/run"}  # x = training wall time: no bench here


def test_bad_inputs_are_usage_errors(runs, tmp_path, capsys):
    with pytest.raises(UsageError, match="no such run directory"):
        load_rows([str(tmp_path / "missing")])
    (tmp_path / "odd.json").write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not a run.json, an eval JSON"):
        load_rows([str(tmp_path / "odd.json")])
    with pytest.raises(UsageError, match="--metric"):
        compare([str(runs[0])], metric="accuracy")
    assert main(["compare", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_positional_paths_become_runs():
    args = ["compare", "a", "--out", "o", "b c", "--metric=t2i_R@1", "--help"]
    assert compare_positionals(args) == [
        "compare",
        "--out",
        "o",
        "--metric=t2i_R@1",
        "--help",
        "--runs",
        '["a", "b c"]',
    ]
    assert compare_positionals(["compare", "--runs", "[a]"]) == ["compare", "--runs", "[a]"]
    assert compare_positionals(["zoo"]) == ["zoo"]


@pytest.mark.slow
def test_real_export_and_bench_beside_a_run_give_its_latency(runs, tmp_path):
    a, _ = runs
    export = a.parent / "export_real"
    try:
        assert main(["export", "--checkpoint", str(a / "student"), "--out", str(export), "--format", "executorch"]) == 0
        bench = ["--args.iters", "2", "--args.warmup", "1", "--args.eager", "false"]
        assert main(["bench", "--artifacts", str(export), *bench]) == 0
        res = compare([str(a)], out=tmp_path / "c")
        row = res["rows"][0]
        assert set(row["latency_ms"]) == {"image", "text"}
        assert row["latency_source"].endswith("(export_real/bench.jsonl)")
        assert res["points"][0]["x"] == pytest.approx(row["total_latency_ms"])
    finally:
        shutil.rmtree(export, ignore_errors=True)
