"""`distill demo --quick`: the whole pipeline (corpus, teacher, build-data, KD + scratch students, eval, export,
bench) on tiny sizes, through the real CLI."""

import json

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
