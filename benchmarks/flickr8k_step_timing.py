"""Wall time per training step of Flickr8k rows, as cost ratios to scratch: each row's exact command from
`flickr8k.json`, a few steps, no validation, rows interleaved and repeated (on a shared machine the load drifts
between runs; a ratio taken within one pass, then the median over passes, cancels most of it). Writes
`benchmarks/out/flickr8k_step_timing.json`.

Usage: python benchmarks/flickr8k_step_timing.py tiny_vit_s/scratch tiny_vit_s/kd_real tiny_vit_s/kd_online \\
           --repeats 3      # the first row of each student is its baseline (scratch)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pipeline():
    spec = importlib.util.spec_from_file_location("flickr8k_recipes", ROOT / "benchmarks" / "flickr8k_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flickr8k_recipes"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _timing_command(command: str, root: Path, steps: int) -> list[str]:
    """The row's `distill train` arguments with `steps` steps, `root` as run dir and no validation/checkpoints."""
    cmd = command.split()[1:]

    def setopt(name: str, value: str) -> None:
        if name in cmd:
            cmd[cmd.index(name) + 1] = value
        else:
            cmd.extend([name, value])

    setopt("--trainer.max_steps", str(steps))
    setopt("--trainer.default_root_dir", str(root))
    setopt("--trainer.checkpoint_every_n_steps", str(10 * steps))
    setopt("--trainer.log_every_n_steps", "2")
    for flag in ("--val.retrieval", "--val.split_file", "--trainer.val_check_interval", "--val.max_images"):
        if flag in cmd:
            i = cmd.index(flag)
            del cmd[i : i + 2]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", help="<student>/<row> keys of flickr8k.json's commands")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "flickr8k")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/flickr8k_step_timing"))
    a = p.parse_args()
    f8k = _pipeline()
    commands = json.loads((a.work / "flickr8k.json").read_text())["commands"]
    out_path = ROOT / "benchmarks" / "out" / "flickr8k_step_timing.json"
    passes: list[dict[str, float | None]] = []
    loads: list[list[float]] = []
    for rep in range(a.repeats):
        this: dict[str, float | None] = {}
        for key in a.rows:
            root = a.scratch / key.replace("/", "_")
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "distill.cli", *_timing_command(commands[key], root, a.steps)],
                cwd=ROOT,
                env=f8k._env(1),
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise SystemExit(f"{key}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            this[key] = f8k.step_seconds(root)
            loads.append(list(os.getloadavg()))
            print(f"pass {rep}: {key} {this[key]} s/step ({time.perf_counter() - t0:.0f} s)", flush=True)
        passes.append(this)
    baselines = {k.split("/")[0]: k for k in reversed(a.rows)}  # the first row of each student
    summary = {}
    for key in a.rows:
        base = baselines[key.split("/")[0]]
        ratios = [ps[key] / ps[base] for ps in passes if ps[key] and ps[base]]
        summary[key] = {
            "step_seconds_per_pass": [ps[key] for ps in passes],
            "vs": base,
            "ratio_per_pass": [round(r, 3) for r in ratios],
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "step_seconds_median": round(statistics.median(ps[key] for ps in passes if ps[key]), 4),
        }
    out = {"steps": a.steps, "repeats": a.repeats, "loadavg_after_each_run": loads, "rows": summary}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
