"""Wall time of a reinforced-KD training step relative to a scratch step (issue 14), on the embedded corpus.

Both runs train the same student, at the same size and batch, through the real `distill train` CLI in subprocesses:
  scratch  plain shards, contrastive loss, one real caption, on-the-fly RRC + RandAugment;
  kd       the same images reinforced by `distill build-data` (K stored views, teacher embeddings, the other real
           captions stored as alternatives), MobileCLIP KD loss on the real and one extra caption.
Runs are interleaved (scratch, kd, scratch, kd, ...) and, with several `--tree`s (other checkouts of this repo, e.g. a
`git archive` of the code before a change), interleaved across trees too, with the order rotated every repeat, so a
noisy shared machine hits every cell alike. Each run's step time is the median interval between consecutive logged
steps (TensorBoard event times, first interval dropped); the table quotes the median over repeats.

With `--breakdown` it also times, in-process for this checkout, the loader alone (no workers) and the compute alone
(forward + loss + backward + AdamW on a batch in memory), which tells a loader-bound step from a compute-bound one.

Usage: python benchmarks/kd_step_ratio.py [--tree before=/tmp/before --tree after=.] [--repeats 3 --steps 30]
Writes benchmarks/out/kd_step_ratio.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
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
        _distill(ROOT, ["build-data", "--data.path", str(corpus / "train"), "--out", str(reinforced)]
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


def breakdown(plain: Path, reinforced: Path, a: argparse.Namespace, rounds: int = 12) -> dict[str, dict[str, float]]:
    """In this process (this checkout): loader seconds per batch (no workers) and compute seconds per step on a
    batch already in memory (forward, loss, backward, AdamW), scratch and kd alternated `rounds` times; medians."""
    import torch

    from distill.args import DataArgs, EvalArgs, LossArgs, OptimArgs
    from distill.data import DistillDataModule, resolve_data
    from distill.module import DistillModule
    from distill.train import build_loss
    from students import create_student

    torch.set_num_threads(1)
    setups = {}
    for mode, path in (("scratch", plain), ("kd", reinforced)):
        data = DataArgs(path=str(path), batch_size=a.batch_size, num_workers=0)
        spec, kd = resolve_data(data), mode == "kd"
        torch.manual_seed(0)
        model = create_student(a.student, image_size=a.image_size)
        loss, _ = build_loss(
            LossArgs(preset="mobileclip" if kd else "contrastive"), has_teacher=kd,
            teacher_scales=spec.teacher_scales() if kd else {}, teacher_dims=spec.teacher_dims() if kd else {},
            student_dim=model.embed_dim,
        )  # fmt: skip
        dm = DistillDataModule(spec, data, model, mode="reinforced" if kd else "scratch", seed=0, val=EvalArgs())
        dm.setup("fit")
        module = DistillModule(model, None, loss, OptimArgs(), max_steps=100)
        setups[mode] = (iter(dm.train_dataloader()), module, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, dict[str, list[float]]] = {m: {"load": [], "compute": []} for m in setups}
    for _ in range(rounds):
        for mode, (it, module, opt) in setups.items():
            t = time.perf_counter()
            batch = next(it)
            times[mode]["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = module(batch["image"], batch["text"], batch.get("syn_text"))
            sum(module._loss_terms(out, batch).values()).backward()
            opt.step()
            opt.zero_grad()
            times[mode]["compute"].append(time.perf_counter() - t)
    result = {}
    for mode, t in times.items():
        result[mode] = {k + "_s": statistics.median(v[2:]) for k, v in t.items()}  # NOTE: 2 warm-up rounds dropped
        print(f"{mode:>8}: loader {result[mode]['load_s']:.4f} s/batch, compute {result[mode]['compute_s']:.4f} s/step")
    for k in ("load_s", "compute_s"):
        print(f"kd / scratch {k}: {result['kd'][k] / result['scratch'][k]:.3f}", flush=True)
    return result


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
    p.add_argument("--modes", default="scratch,kd", help="comma list of scratch, kd (default both)")
    p.add_argument("--breakdown", action="store_true", help="also time loader and compute apart, in this process")
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
    modes = {m: modes[m] for m in a.modes.split(",")}
    times: dict[str, dict[str, list[float]]] = {t: {m: [] for m in modes} for t in trees}
    cells = [(tree, mode) for tree in trees for mode in modes]
    for r in range(a.repeats):
        # NOTE: the cell order rotates every repeat: a run right after another one was measurably slower here.
        for tree, mode in cells[r % len(cells) :] + cells[: r % len(cells)]:
            run = a.work / "runs" / f"{tree}-{mode}-{r}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (no resume of an earlier one)
            _distill(Path(trees[tree]), ["train", *common, *modes[mode], "--trainer.default_root_dir", str(run)])
            times[tree][mode].append(step_seconds(run))
            print(f"repeat {r} {tree:>8} {mode:>8}: {times[tree][mode][-1]:.4f} s/step", flush=True)
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "trees": {}}
    if a.breakdown:
        result["breakdown"] = breakdown(plain, reinforced, a)
    for tree, by_mode in times.items() if a.repeats else ():
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        ratio = med["kd"] / med["scratch"] if len(med) == 2 else None
        result["trees"][tree] = {"step_seconds": by_mode, "median": med, "kd_vs_scratch": ratio}
        print(
            f"{tree}: "
            + ", ".join(f"{m} {v:.4f} s" for m, v in med.items())
            + (f", ratio {ratio:.3f}" if ratio else "")
        )
    out = ROOT / "benchmarks" / "out" / "kd_step_ratio.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
