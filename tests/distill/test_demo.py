"""`distill demo --quick`: the whole pipeline (corpus, teacher, build-data, KD + scratch students, eval, export,
bench) on tiny sizes, through the real CLI."""

import json

import pytest

from distill.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "true"]) == 0
    out = capsys.readouterr().out
    assert "reinforced KD" in out and "zero-shot" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("teacher", "student_kd", "student_scratch"):
        assert 0.0 <= summary[key]["zeroshot_top1"] <= 100.0
        assert summary[key]["retrieval_images"] == 64
    assert summary["build_data"]["written"] == 256 and summary["build_data"]["dataset_complete"]
    assert summary["export"]["ok"] is True
    assert (tmp_path / "export" / "manifest.json").is_file()
    assert summary["bench"]
    assert (tmp_path / "runs" / "student_kd" / "run.json").is_file()


METRICS = ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "t2i_R@5")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_demo_teacher_beats_scratch_and_kd_pays_by_a_point(tmp_path, seed):
    # The product's promise, on the default demo (no export: it does not change the models): the teacher beats the
    # scratch student on every metric the summary prints, and the reinforced-KD student beats the scratch student by
    # at least one point on each (zero-shot top-1, i2t/t2i R@1, t2i R@5), at two seeds.
    assert main(["demo", "--out", str(tmp_path), "--seed", str(seed), "--export", "false"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    for m in METRICS:
        assert s["teacher"][m] > s["student_scratch"][m], (seed, m, s["teacher"][m], s["student_scratch"][m])
        assert s["student_kd"][m] >= s["student_scratch"][m] + 1.0, (
            seed,
            m,
            s["student_kd"][m],
            s["student_scratch"][m],
        )
