"""Render the README's demo table (and the line saying on what machine) from the demo's own `summary.json`.

`distill demo` (`make demo`) writes `<out>/summary.json`; a copy of the run quoted in the README is kept as
`benchmarks/out/demo_summary.json`. The README block between `<!-- demo-table:start -->` and
`<!-- demo-table:end -->` is exactly what this script renders from that copy (tests/test_readme_demo_table.py checks
it), so the figures cannot drift from a real run again.

Usage:
    python benchmarks/readme_demo_table.py demo_out/summary.json                  # print the block
    python benchmarks/readme_demo_table.py demo_out/summary.json --write README.md   # replace the README block
    python benchmarks/readme_demo_table.py benchmarks/out/demo_summary.json --check README.md   # exit 1 if stale
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from mcd_common.files import atomic_write_text

START = "<!-- demo-table:start -->"
END = "<!-- demo-table:end -->"
COLUMNS = (
    ("zero-shot top-1 %", "zeroshot_top1"),
    ("i2t R@1", "i2t_R@1"),
    ("t2i R@1", "t2i_R@1"),
    ("t2i R@5", "t2i_R@5"),
)


def duration(seconds: float) -> str:
    """`406.7` -> `6 min 47 s` (whole seconds; under a minute: `42 s`)."""
    total = round(seconds)
    minutes, secs = divmod(total, 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def machine_line(summary: dict) -> str:
    """The sentence introducing the table: machine, load, wall time, evaluation sets."""
    bench = (summary.get("bench") or {}).get("results") or [{}]
    first = bench[0]
    device = (summary.get("teacher") or {}).get("device", "cpu")
    parts = [first.get("device", "unknown CPU")]
    if first.get("platform"):
        parts.append(first["platform"])
    parts.append("no GPU" if device == "cpu" else f"on {device}")
    threads, workers = summary.get("torch_threads"), summary.get("num_workers")
    if threads is not None and workers is not None:
        parts.append(f"{threads} torch thread{'s' * (threads != 1)} + {workers} loader worker{'s' * (workers != 1)}")
    if first.get("load_avg_1m") is not None:
        parts.append(f"load average {first['load_avg_1m']} at the bench")
    seconds = summary.get("seconds") or {}
    when = []
    if "total" in seconds:
        when.append(f"{duration(seconds['total'])} wall in all")
    if "teacher_train" in seconds:
        when.append(f"{duration(seconds['teacher_train'])} of it the teacher")
    teacher = summary.get("teacher") or {}
    sets = (
        f"on the corpus's {teacher.get('retrieval_images', '?')} held-out scenes "
        f"({teacher.get('retrieval_captions', 0):,} captions) and its {teacher.get('zeroshot_classes', '?')}-class "
        "zero-shot split"
    )
    line = f"What it printed here ({', '.join(parts)}; {', '.join(when)}), {sets}:"
    # NOTE: wrapped like the README's prose (lines under 120 characters); markdown joins the lines again.
    return textwrap.fill(line, width=116, break_long_words=False, break_on_hyphens=False)


def table(summary: dict) -> str:
    """The markdown table: teacher, student from scratch, student distilled from reinforced data."""
    teacher_bs = summary.get("teacher_batch_size", summary["batch_size"])
    rows = [
        ("teacher", f"teacher `{summary['teacher_arch']}` (scratch, {summary['teacher_steps']} steps x {teacher_bs})"),
        ("student_scratch", f"student `{summary['student_arch']}` scratch ({summary['student_steps']} steps)"),
        ("student_kd", f"student `{summary['student_arch']}` reinforced KD ({summary['student_steps']} steps)"),
    ]
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "| --- " * (len(COLUMNS) + 1) + "|"]
    for key, label in rows:
        result = summary[key]
        lines.append(f"| {label} | " + " | ".join(f"{result[k]:.1f}" for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def render(summary: dict) -> str:
    """The whole README block between the markers (markers excluded)."""
    return f"{machine_line(summary)}\n\n{table(summary)}"


def replace_block(text: str, block: str) -> str:
    """`text` with the content between the demo-table markers replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def current_block(text: str) -> str:
    """The content between the markers, without the newlines next to them."""
    if START not in text or END not in text:
        raise ValueError(f"expected one {START} ... {END} block")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="summary.json written by `distill demo`")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the marked block in this file")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 when the marked block differs")
    args = parser.parse_args(argv)
    block = render(json.loads(args.summary.read_text()))
    if args.write:
        atomic_write_text(args.write, replace_block(args.write.read_text(), block))
    elif args.check:
        if current_block(args.check.read_text()) != block:
            print(f"{args.check}: the demo table is stale; rerun with --write", file=sys.stderr)
            return 1
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
