"""The README's "Using it on your own data" walkthrough, run as written (slow, about 2 min on 2 CPU cores).

Every `distill` command between the `<!-- walkthrough:start -->` and `<!-- walkthrough:end -->` markers of
README.md is parsed (continuation lines joined, comments dropped) and run through `distill.cli.main` in a fresh
directory holding `my_data/` (Flickr8k's layout: `images/`, `captions.csv`, `splits/{train,dev,test}.txt`, rendered
shapes scenes), so the paths are the README's own. Only sizes are changed, by the documented maps below:
- `VALUES`: the value that follows a flag (`--student mobileclip_s2` -> `test_tiny`, `--trainer.max_steps 3000`
  -> `3`, ...);
- `EXTRA`: flags appended to every command of a subcommand (small batches, no loader workers, few bench
  iterations; for the recipe run, the tiny student instead of the recipe's).
Every entry of both maps must be used, so a README edit that drops a flag fails here instead of leaving the map
stale. No network: the teacher is trained by the walkthrough's own first command.
"""

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from distill.cli import main
from reinforced_data.shapes import render_scene

README = Path(__file__).resolve().parent.parent / "README.md"

VALUES: dict[str, dict[str, str]] = {
    "--student": {"mobileclip_s2": "test_tiny"},
    "--trainer.max_steps": {"3000": "3"},
    "--build.num_augs": {"10": "2"},
    "--trainer.val_check_interval": {"500": "2"},
}
"""flag -> {value in the README: value run here}."""

_TINY_TRAIN = ["--data.batch_size", "8", "--data.num_workers", "0", "--optim.warmup_steps", "1"]
EXTRA: dict[str, list[str]] = {
    "train": _TINY_TRAIN,
    "train --config": ["--student", "test_tiny", "--trainer.max_steps", "4", *_TINY_TRAIN],
    "build-data": ["--build.num_workers", "0", "--build.batch_size", "16", "--build.progress", "false"],
    "eval": ["--device", "cpu"],
    "bench": ["--iters", "2", "--warmup", "1", "--batch", "2"],
}
"""subcommand (or `train --config`, a recipe run) -> flags appended; later flags override the config's."""

_SPLITS = {"train": range(0, 24), "dev": range(24, 30), "test": range(30, 36)}


def readme_commands(text: str) -> list[list[str]]:
    """The `distill` commands between the walkthrough markers, as argument lists without `distill`."""
    section = re.search(r"<!-- walkthrough:start -->(.*?)<!-- walkthrough:end -->", text, re.S)
    assert section, "README.md lost its walkthrough markers"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    assert block, "the walkthrough has no bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "distill":
            commands.append(words[1:])
    return commands


def _make_my_data(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    rows = []
    for i in range(36):
        image, captions, _ = render_scene(1, "walkthrough", i, image_size=32)
        image.save(root / "images" / f"{i:03d}.jpg")
        rows += [(f"{i:03d}.jpg", c) for c in captions[:3]]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    for split, indices in _SPLITS.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i:03d}.jpg\n" for i in indices))


def _sized(argv: list[str], used: set[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in VALUES and out[i + 1] in VALUES[arg]:
            used.add(f"{arg} {out[i + 1]}")
            out[i + 1] = VALUES[arg][out[i + 1]]
    key = "train --config" if out[0] == "train" and "--config" in out else out[0]
    if key in EXTRA:
        used.add(key)
        out += EXTRA[key]
    return out


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = readme_commands(README.read_text())
    assert [c[0] for c in commands] == [
        "zoo", "train", "build-data", "build-data", "train", "eval", "eval", "export", "bench", "compare",
    ]  # fmt: skip
    _make_my_data(tmp_path / "my_data")
    monkeypatch.chdir(tmp_path)
    used: set[str] = set()
    for argv in commands:
        assert main(_sized(argv, used)) == 0, argv
    capsys.readouterr()
    assert used == {f"{flag} {value}" for flag, values in VALUES.items() for value in values} | set(EXTRA)
    # what each step promises
    assert (tmp_path / "runs" / "teacher" / "student").is_dir()
    assert (tmp_path / "data" / "dr" / "manifest.jsonl").is_file()
    s0 = tmp_path / "runs" / "s0"
    run = json.loads((s0 / "run.json").read_text())
    assert run["mode"] == "reinforced" and run["steps"] == 4
    # the defaults the walkthrough relies on: KD at 50 for a teacher without a published scale, crops >= 0.08
    teach = json.loads((tmp_path / "data" / "dr" / "teach.json").read_text())
    assert [t["logit_scale"] for t in teach["teachers"]] == [50.0] and teach["teachers"][0]["learned_logit_scale"]
    assert set(run["loss"]["teacher_logit_scales"].values()) == {50.0}
    assert Path(run["best_checkpoint"]) == (s0 / "checkpoints" / "best.ckpt").resolve()
    assert Path(run["best_checkpoint"]).is_file() and run["best_metric"] == "val/t2i_R@1"
    for name in ("teacher", "s0"):
        ev = json.loads((tmp_path / "runs" / name / "eval.json").read_text())
        assert ev["retrieval_images"] == len(_SPLITS["test"]) and ev["retrieval_split"].endswith("test.txt")
    assert (s0 / "export" / "manifest.json").is_file() and (s0 / "export" / "bench.jsonl").is_file()
    table = (tmp_path / "compare.md").read_text()
    assert "teacher" in table and "s0" in table
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    by_label = {r["label"]: r for r in rows}
    assert by_label["s0"]["latency_ms"] and by_label["s0"]["metrics_source"].endswith("eval.json")
    assert (tmp_path / "compare.png").is_file()
