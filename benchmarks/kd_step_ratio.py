"""Wall time of a reinforced-KD training step relative to a scratch step (issue 14), on the embedded corpus.

Both runs train the same student, at the same size and batch, through the real `distill train` CLI in subprocesses:
  scratch  plain shards, contrastive loss, one real caption, on-the-fly RRC + RandAugment;
  kd       the same images reinforced by `distill build-data` (K stored views, teacher embeddings, the other real
           captions stored as alternatives), MobileCLIP KD loss on the real and one extra caption.
Runs are interleaved (scratch, kd, scratch, kd, ...) and, with several `--tree`s (other checkouts of this repo, e.g. a
`git archive` of the code before a change), interleaved across trees too, so a noisy shared machine hits every cell
alike. Each run's step time is the median interval between consecutive logged steps (TensorBoard event times, first
interval dropped); the table quotes the median over repeats.

Usage: python benchmarks/kd_step_ratio.py [--tree before=/tmp/before --tree after=.] [--repeats 3 --steps 30]
Writes benchmarks/out/kd_step_ratio.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(tree))
    return env


def _distill(tree: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-c", "import sys; from distill.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"exit {proc.returncode}: {' '.join(args[:3])}\n{proc.stderr[-3000:]}")


def prepare(work: Path, n_train: int) -> tuple[Path, Path]:
    """The plain corpus and its reinforced copy (built once; reused while `work` exists)."""
    from reinforced_data.shapes import CorpusCfg, write_shapes_corpus

    corpus = work / "corpus"
    write_shapes_corpus(corpus, CorpusCfg(n_train=n_train, n_val=16, n_zeroshot_per_class=1, image_size=64))
    reinforced = work / "reinforced"
    if not (reinforced / "_meta.json").is_file() and not any(reinforced.glob("*.tar")):
        build = ["--build.num_augs", "2", "--build.num_syn", "0", "--build.num_workers", "1"]
        build += ["--build.progress", "false"]
        _distill(ROOT, ["build-data", "--input", str(corpus / "train"), "--out", str(reinforced)]
                 + ["--teacher", "test_tiny", *build])  # fmt: skip
    return corpus / "train", reinforced


def step_seconds(run: Path) -> float:
    """Median seconds between consecutive logged training steps of one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted({e.step: e.wall_time for e in acc.Scalars("train/loss")}.items())
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(events, events[1:], strict=False) if s1 > s0]
    return statistics.median(per_step[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="name=path of a checkout to time (default: this one)")
    p.add_argument("--student", default="tiny_vit_s")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_train", type=int, default=1024)
    p.add_argument("--work", type=Path, default=Path("/tmp/kd_step_ratio"))
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(ROOT)}
    plain, reinforced = prepare(a.work, a.n_train)
    common = ["--student", a.student, "--image_size", str(a.image_size), "--data.batch_size", str(a.batch_size)]
    common += ["--data.num_workers", "1", "--trainer.max_steps", str(a.steps), "--trainer.log_every_n_steps", "1"]
    common += ["--trainer.checkpoint_every_n_steps", str(10 * a.steps), "--trainer.enable_progress_bar", "false"]
    common += ["--optim.warmup_steps", "1"]
    modes = {
        "scratch": ["--mode", "scratch", "--loss.preset", "contrastive", "--data.path", str(plain)],
        "kd": ["--mode", "reinforced", "--data.path", str(reinforced)],
    }
    times: dict[str, dict[str, list[float]]] = {t: {m: [] for m in modes} for t in trees}
    for r in range(a.repeats):
        for tree, path in trees.items():
            for mode, extra in modes.items():
                run = a.work / "runs" / f"{tree}-{mode}-{r}"
                _distill(Path(path), ["train", *common, *extra, "--trainer.default_root_dir", str(run)])
                times[tree][mode].append(step_seconds(run))
                print(f"repeat {r} {tree:>8} {mode:>8}: {times[tree][mode][-1]:.4f} s/step", flush=True)
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "trees": {}}
    for tree, by_mode in times.items():
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        result["trees"][tree] = {"step_seconds": by_mode, "median": med, "kd_vs_scratch": med["kd"] / med["scratch"]}
        print(f"{tree}: scratch {med['scratch']:.4f} s, kd {med['kd']:.4f} s, ratio {med['kd'] / med['scratch']:.3f}")
    out = ROOT / "benchmarks" / "out" / "kd_step_ratio.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
