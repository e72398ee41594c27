"""Clean wall time per training step of Flickr8k rows: each row's exact command from `flickr8k.json`, 40 steps, no
validation, one row at a time (run it on a quiet machine; the pipeline's own timings share the CPU with whatever
else ran). Writes `benchmarks/out/flickr8k_step_timing.json`.

Usage: python benchmarks/flickr8k_step_timing.py tiny_vit_s/scratch tiny_vit_s/kd_real tiny_vit_s/kd_online ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pipeline():
    spec = importlib.util.spec_from_file_location("flickr8k_recipes", ROOT / "benchmarks" / "flickr8k_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flickr8k_recipes"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", help="<student>/<row> keys of flickr8k.json's commands")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "flickr8k")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/flickr8k_step_timing"))
    a = p.parse_args()
    f8k = _pipeline()
    commands = json.loads((a.work / "flickr8k.json").read_text())["commands"]
    out_path = ROOT / "benchmarks" / "out" / "flickr8k_step_timing.json"
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for key in a.rows:
        cmd = commands[key].split()[1:]
        root = a.scratch / key.replace("/", "_")

        def setopt(name: str, value: str, cmd: list[str] = cmd) -> None:
            if name in cmd:
                cmd[cmd.index(name) + 1] = value
            else:
                cmd.extend([name, value])

        setopt("--trainer.max_steps", str(a.steps))
        setopt("--trainer.default_root_dir", str(root))
        setopt("--trainer.checkpoint_every_n_steps", str(10 * a.steps))
        for flag in ("--val.retrieval", "--val.retrieval_split_file", "--trainer.val_check_interval"):
            if flag in cmd:
                i = cmd.index(flag)
                del cmd[i : i + 2]
        shutil.rmtree(root, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "distill.cli", *cmd], cwd=ROOT, env=f8k._env(1), capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(f"{key}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        out[key] = {"step_seconds": f8k.step_seconds(root), "steps": a.steps, "loadavg_after": os.getloadavg()}
        print(key, out[key], flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
