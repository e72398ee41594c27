"""Slow: `benchmarks/flickr8k_recipes.py` end to end at smoke scale (a few steps on 48 Flickr8k images).

Teachers (CoCa + ViT) -> two reinforced datasets (real captions, + synthetic captions) -> KD-scale probe -> every
student row -> eval of every row and teacher -> table, JSON and curves. Skipped when the shared data is absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
FLICKR = DATA / "flickr8k"
CIFAR = DATA / "cifar10" / "test"
METRICS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "zeroshot_top1")


def _load_benchmark():
    name = "flickr8k_recipes_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "flickr8k_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_flickr8k_recipes_smoke_end_to_end(tmp_path: Path) -> None:
    if not (FLICKR / "captions.csv").is_file() or not (FLICKR / "splits" / "train.txt").is_file():
        pytest.skip(f"flickr8k not available at {FLICKR}")
    if not CIFAR.is_dir():
        pytest.skip(f"cifar10 test set not available at {CIFAR}")
    bench = _load_benchmark()
    work = tmp_path / "f8k"
    result = bench.run(["--scale", "smoke", "--work", str(work), "--inprocess", "--no-export", "--no-publish"])

    # Every step's outputs exist.
    for rel in (
        "flickr8k.json",
        "flickr8k.md",
        "flickr8k_curves.png",
        "pipeline_log.json",
        "probe/choice.json",
        "teachers/A/run.json",
        "teachers/B/run.json",
        "teachers/A/student/open_clip_config.json",
        "data/real/progress.json",
        "data/syn/progress.json",
        "data/real/teach.json",
        "eval/teacher_A.json",
        "eval/teacher_B.json",
        "eval/teacher_AB.json",
    ):
        assert (work / rel).is_file(), rel
    assert (work / "flickr8k_curves.png").stat().st_size > 1000
    for which in ("real", "syn"):
        progress = json.loads((work / "data" / which / "progress.json").read_text())
        assert progress["complete"] and progress["num_samples"] == 48
    # `real` holds only real captions (other human captions under `alt_text`, the real one as the `syn_text_gt`
    # placeholder Apple's loader needs); `syn` adds the captioner's under `syn_text`.
    for which, keys in (("real", {"syn_text_gt", "alt_text"}), ("syn", {"syn_text", "alt_text"})):
        with tarfile.open(sorted((work / "data" / which).glob("*.tar"))[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".syn.json"))
            assert set(json.loads(tar.extractfile(member).read())) == keys

    # Every table row (both students, every recipe that applies) and the teachers have finite metrics.
    expected = {student: {r.key for r in bench.ROWS if student in r.students} for student in bench.STUDENTS}
    assert {s: set(rows) for s, rows in result["rows"].items()} == expected
    for student, rows in result["rows"].items():
        for key, row in rows.items():
            assert (work / "students" / student / key / "eval.json").is_file()
            for metric in METRICS:
                assert math.isfinite(row["eval"][metric]), (student, key, metric)
            assert row["steps"] == bench.SCALES["smoke"].student_steps
            assert row["step_seconds"] is not None and row["step_seconds"] > 0
            assert [p[0] for p in result["curves"][student][key]] == [2, 4]
        assert result["params"][student]["total_M"] > 0
        assert set(result["steps_to_reach"][student]) >= {"target_t2i_R@1", *rows}
    for which in ("A", "B", "AB"):
        ev = result["teachers"][which]["eval"]
        assert all(math.isfinite(ev[m]) for m in METRICS), which
    assert result["kd_logit_scale"] in bench.SCALES["smoke"].probe_scales
    # The ablation table (the first block) has one line per (student, row); the steps-to-reach and timing tables
    # below it add one line per student.
    ablation, _, rest = (work / "flickr8k.md").read_text().partition("\n\n")
    for student in bench.STUDENTS:
        assert ablation.count(f"| {student} |") == len(expected[student]), student
        assert rest.count(f"| {student} |") == 2, student
