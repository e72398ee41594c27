"""`benchmarks/gpu_suite.py`: the CPU dry run end to end, the hard part deadline, and the figures it derives.

The dry run is the GPU suite's own command line with `--dry-run` (tiny models, a few steps, CPU), so the suite
keeps working between GPU slots: every part runs in its own process and must finish `ok` with its figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_suite", None)


def test_dry_run_runs_every_part_and_writes_the_record(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("OUT", None)
    cmd = [sys.executable, str(SUITE), "--dry-run", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-> " in proc.stdout and "part train_mobileclip_s0" in proc.stdout  # the printed table

    # What comes back from the device machine: at most 8 files, plain names, two folders deep at most.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.txt"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    record = json.loads((out / "gpu_suite.json").read_text())
    assert record["dry_run"] and record["bootstrap"]["missing_after"] == []
    assert record["bootstrap"]["listed_wheels_absent"] == [] or not (ROOT / ".whl").is_dir()
    assert {name: p["status"] for name, p in record["parts"].items()} == {
        "env": "ok",
        "pytest": "ok",
        "embed": "ok",
        "build": "ok",
        "train_mobileclip2_s0": "ok",
        "train_mobileclip_s0": "ok",
    }
    env_res = record["parts"]["env"]["results"]
    assert env_res["versions"]["torch"] != "missing" and env_res["cpu_count"] >= 1
    # pytest -m gpu ran (the gpu tests are skipped without CUDA, which is what a CPU run must show)
    counts = record["parts"]["pytest"]["results"]["counts"]
    assert counts["tests"] >= 1 and counts["failures"] == counts["errors"] == 0

    figs = record["figures"]
    for key in (
        "matmul_peak_tflops",
        "teacher_gflop_per_image",
        "embed.plain_autocast_bf16.images_per_s",
        "embed.build_data_path.images_per_s",
        "embed.plain_bf16_weights.images_per_s",
        "build.images_per_s",
        "build.views_per_s",
        "build.teacher_forwards_per_s",
        "build.pct_peak",
    ):
        assert figs[key] and figs[key] > 0, key
    build = record["parts"]["build"]["results"]
    assert build["build_data"]["written"] == build["shards"]["images"]  # every synthetic JPEG was embedded
    assert len(build["build_data"]["teachers"]) == 2
    # Every training loop ran for both students (the compiled pipeline is GPU-only: inductor on CPU takes minutes).
    primary = record["parts"]["train_mobileclip2_s0"]["results"]
    for key in ("plain:eager", "plain:cl", "memory:cl", "memory_nosyn:cl", "pipeline:cl", "memory:cl+compile"):
        assert primary[key]["samples_per_s"] > 0, (key, primary[key])
    assert primary["plain:cl+compile"]["samples_per_s"] > 0
    mct = record["parts"]["train_mobileclip_s0"]["results"]
    assert mct["plain:cl"]["model"].startswith("students.test_tiny_mct") and mct["memory:cl"]["samples_per_s"] > 0
    ratios = record["ratios"]
    assert "train_mobileclip2_s0.pipeline:cl_vs_memory" in ratios and "embed.build_data_path_vs_plain" in ratios
    assert set(record["targets"]) == {
        "build_data_3000_vit_l14_images_per_s",
        "build_data_60_pct_of_peak",
        "train_1800_samples_per_s",
        "pipeline_within_10_pct_of_memory",
    }


def test_a_part_over_its_deadline_is_killed_and_recorded(suite, tmp_path):
    part = suite.Part("env", max_s=1, min_s=0)
    res = suite._run_part(part, timeout=0.5, work=tmp_path, dry=True)  # importing torch alone takes longer
    assert res["status"] == "timeout" and res["seconds"] < 10
    bad = suite._run_part(suite.Part("no_such_part", 5, 0), timeout=60, work=tmp_path, dry=True)
    assert bad["status"] == "error" and "no_such_part" in bad["log_tail"]


def test_budget_skips_parts_that_cannot_fit(suite, tmp_path, monkeypatch):
    # run_suite sets PYTHONPATH and offline variables for its parts and extends sys.path: keep them out of here
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = dict(os.environ)
    try:
        record = suite.run_suite(tmp_path / "out", dry=True, budget_s=1.0, only=["env", "embed"], work=tmp_path / "w")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert {p["status"] for p in record["parts"].values()} == {"skipped"}
    assert (tmp_path / "out" / "gpu_suite.json").is_file()


def test_figures_ratios_and_targets_from_part_results(suite):
    parts = {
        "embed": {
            "results": {
                "matmul_peak": {"tflops": 800.0},
                "plain_autocast_bf16": {"images_per_s": 1736.0, "gflop_per_image": 162.0},
                "build_data_path": {"images_per_s": 1650.0},
            }
        },
        "build": {"results": {"build_data": {"images_per_s": 400.0, "views_per_s": 1600.0, "teachers": ["a", "b"]}}},
        "train_mobileclip2_s0": {
            "results": {
                "plain:cl+fused": {"samples_per_s": 1146.0},
                "memory:cl+fused": {"samples_per_s": 1000.0},
                "pipeline:cl+fused": {"samples_per_s": 950.0},
                "memory:cl+fused+compile": {"samples_per_s": 1900.0},
                "pipeline:cl+fused+compile": {"skipped": "3 s left"},
            }
        },
    }
    out = suite.summarize(parts, suite.SIZES["real"])
    figs, ratios, targets = out["figures"], out["ratios"], out["targets"]
    assert figs["embed.plain_autocast_bf16.pct_peak"] == pytest.approx(100 * 1736 * 162 / 800e3, abs=0.05)
    assert figs["build.teacher_forwards_per_s"] == 3200.0  # 1,600 views/s through 2 teachers
    assert figs["build.pct_peak"] == pytest.approx(100 * 3200 * 162 / 800e3, abs=0.05)
    assert ratios["embed.build_data_path_vs_plain"] == pytest.approx(1650 / 1736, abs=1e-3)
    assert ratios["train_mobileclip2_s0.memory:cl+fused_vs_plain"] == pytest.approx(1000 / 1146, abs=1e-3)
    assert ratios["train_mobileclip2_s0.pipeline:cl+fused_vs_memory"] == 0.95
    assert "train_mobileclip2_s0.pipeline:cl+fused+compile.samples_per_s" not in figs  # skipped: no figure
    assert targets == {
        "build_data_3000_vit_l14_images_per_s": True,
        "build_data_60_pct_of_peak": True,
        "train_1800_samples_per_s": True,
        "pipeline_within_10_pct_of_memory": True,
    }
    assert "MISSED" not in suite.format_table({**out, "dry_run": False, "seconds": 1, "parts": {}})
