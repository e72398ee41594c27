"""The README's demo table is what `benchmarks/readme_demo_table.py` renders from the demo's own summary.json
(`benchmarks/out/demo_summary.json`, a copy of a real `distill demo` run), so the figures cannot go stale."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "benchmarks" / "out" / "demo_summary.json"


@pytest.fixture(scope="module")
def script():
    name = "readme_demo_table_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "readme_demo_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_block_equals_the_rendering_of_the_committed_summary(script):
    summary = json.loads(SUMMARY.read_text())
    readme = (ROOT / "README.md").read_text()
    assert script.current_block(readme) == script.render(summary)
    assert script.main([str(SUMMARY), "--check", str(ROOT / "README.md")]) == 0


def test_rendering_follows_the_summary_and_write_replaces_only_the_block(script, tmp_path, capsys):
    summary = json.loads(SUMMARY.read_text())
    changed = copy.deepcopy(summary)
    changed["teacher"]["zeroshot_top1"] = 12.345
    changed["seconds"]["total"] = 61.4
    block = script.render(changed)
    teacher_bs = summary.get("teacher_batch_size", summary["batch_size"])
    steps = f"{summary['teacher_steps']} steps x {teacher_bs}"
    teacher = f"| teacher `{summary['teacher_arch']}` (scratch, {steps}) | 12.3 |"
    assert teacher in block
    assert "1 min 1 s wall in all" in block
    (tmp_path / "summary.json").write_text(json.dumps(changed))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{script.START}\nold table\n{script.END}\n\nafter\n")
    assert script.main([str(tmp_path / "summary.json"), "--check", str(readme)]) == 1
    assert "stale" in capsys.readouterr().err
    assert script.main([str(tmp_path / "summary.json"), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert script.current_block(text) == block
    with pytest.raises(ValueError, match="demo-table"):
        script.replace_block("no markers here", block)
