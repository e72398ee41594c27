"""`distill demo`: the whole toolkit end to end on the embedded corpus, on a laptop CPU, with no download.

1. generate the shapes corpus;
2. train a tiny CLIP teacher from scratch (contrastive) and evaluate it: no pretrained teacher can be downloaded, so
   the teacher's advantage is compute - it sees ten times the student's training samples (1,000 steps x 128
   against 200 x 64), the stand-in for the larger data and model of a real teacher;
3. `build-data`: reinforce the corpus with that teacher (K stored augmentations + teacher embeddings);
4. train a small student from the reinforced shards (MobileCLIP KD, no teacher at train time), and the same
   student from scratch for the same number of steps, and evaluate both;
5. `export` the distilled student (ExecuTorch .pte + CoreML .mlpackage + app bundle) and `bench` it.
Prints a summary table and writes `summary.json`. Every step is the same code path a user runs from the CLI.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from distill.args import DataArgs, EvalArgs, LossArgs, OptimArgs, TrainerArgs
from distill.evaluate import evaluate
from distill.train import train
from export.api import export as export_fn
from export.bench import bench
from mcd_common.files import atomic_write_json
from reinforced_data.build import BuildArgs, InputArgs, build_data
from reinforced_data.shapes import CorpusCfg, write_shapes_corpus

_logger = logging.getLogger(__name__)

__all__ = ["demo"]


@dataclass
class _Demo:
    """The demo's resolved settings, shared by its steps, and what they produced."""

    out: Path
    teacher: str
    student: str
    image_size: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_batch_size: int
    num_augs: int
    num_workers: int
    seed: int
    quick: bool
    summary: dict[str, object] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    def step(self, title: str) -> float:
        print(f"\n=== {title}", flush=True)
        return time.time()

    def train_run(self, name: str, student: str, steps: int, data: DataArgs, val: EvalArgs, **kw: object) -> dict:
        """One `distill train` run in `<out>/runs/<name>` with the demo's schedule."""
        trainer = TrainerArgs(
            max_steps=steps,
            default_root_dir=str(self.out / "runs" / name),
            seed=self.seed,
            log_every_n_steps=max(1, min(20, steps // 5)),
            enable_progress_bar=False,
            checkpoint_every_n_steps=max(1, steps),
        )
        optim = OptimArgs(lr=2e-3, warmup_steps=max(1, steps // 10), weight_decay=0.1)
        return train(
            student=student, trainer=trainer, optim=optim, val=val, image_size=self.image_size, data=data, **kw
        )


def demo(
    out: Path = Path("demo_out"),
    teacher: str = "tiny_vit_s",
    student: str = "tiny_vit_s",
    image_size: int = 32,
    teacher_steps: int = 1000,
    student_steps: int = 200,
    batch_size: int = 64,
    teacher_batch_size: int = 128,
    num_augs: int = 4,
    num_workers: int | None = None,
    seed: int = 0,
    export: bool = True,
    quick: bool = False,
) -> dict:
    """Run the end-to-end demo on the embedded corpus.

    Args:
        out: Output directory (corpus, runs, reinforced shards, exports, summary.json).
        teacher: Student architecture trained from scratch to serve as the demo's teacher.
        student: Student architecture distilled from it.
        image_size: Input resolution of teacher and students (32 px keeps the demo within minutes on 2 cores).
        teacher_steps: Teacher training steps.
        student_steps: Student training steps (distilled and scratch baselines alike).
        batch_size: Batch size of the student runs.
        teacher_batch_size: Batch size of the teacher run.
        num_augs: Augmentations stored per image by build-data.
        num_workers: DataLoader workers (default: 1 on <= 2 cores, else 2; the rest of the cores run torch).
        seed: Seed of every step.
        export: Also export the distilled student and benchmark it.
        quick: Tiny sizes for a smoke test (a few steps; numbers are meaningless).

    Returns:
        The summary (also written to `<out>/summary.json`).
    """
    cores = os.cpu_count() or 1
    if num_workers is None:
        num_workers = 1 if cores <= 2 else 2
    # NOTE: oversubscribing cores (torch threads + loader workers) makes OpenMP spin-waits dominate on small CPUs.
    torch.set_num_threads(max(1, cores - num_workers))
    if quick:
        teacher, student, image_size = "test_tiny", "test_tiny", 32
        teacher_steps, student_steps, batch_size, teacher_batch_size, num_augs = 3, 3, 16, 16, 2
    d = _Demo(
        Path(out).expanduser(), teacher, student, image_size, teacher_steps, student_steps, batch_size,
        teacher_batch_size, num_augs, num_workers, seed, quick,
    )  # fmt: skip
    d.out.mkdir(parents=True, exist_ok=True)
    d.summary.update(
        out=str(d.out), teacher_arch=teacher, student_arch=student, image_size=image_size,
        teacher_steps=teacher_steps, student_steps=student_steps, batch_size=batch_size,
        teacher_batch_size=teacher_batch_size,
        torch_threads=torch.get_num_threads(), num_workers=num_workers,
    )  # fmt: skip
    t_all = time.time()
    meta, data, val = _corpus(d)
    teacher_dir = _teacher(d, data, val)
    reinforced = _reinforce(d, teacher_dir)
    kd_dir = _students(d, data, val, reinforced)
    if export:
        _export_and_bench(d, kd_dir, meta)
    d.times["total"] = time.time() - t_all
    d.summary["seconds"] = {k: round(v, 1) for k, v in d.times.items()}
    d.summary["_table"] = _table(d.summary)
    atomic_write_json(d.out / "summary.json", {k: v for k, v in d.summary.items() if k != "_table"})
    return d.summary


def _corpus(d: _Demo) -> tuple[dict, DataArgs, EvalArgs]:
    """Step 1: the embedded corpus, and the training data and validation sets every run uses."""
    t = d.step("1/5 embedded corpus")
    corpus = d.out / "corpus"
    cfg = CorpusCfg(n_train=256, n_val=64, n_zeroshot_per_class=2, shard_size=128) if d.quick else CorpusCfg()
    meta = write_shapes_corpus(corpus, cfg)
    d.times["corpus"] = time.time() - t
    print(f"{meta['num_samples']} samples, {len(meta['classes'])} zero-shot classes -> {corpus}")
    data = DataArgs(batch_size=d.batch_size, num_workers=d.num_workers, corpus_dir=str(corpus), rrc_scale_min=0.35)
    return meta, data, EvalArgs(zeroshot=str(corpus / "zeroshot"), retrieval=str(corpus / "val"))


def _teacher(d: _Demo, data: DataArgs, val: EvalArgs) -> Path:
    """Step 2: train the demo's own teacher from scratch and evaluate it."""
    t = d.step(f"2/5 train the demo teacher ({d.teacher}, scratch, {d.teacher_steps} steps x {d.teacher_batch_size})")
    teacher_data = replace(data, batch_size=d.teacher_batch_size)
    res = d.train_run("teacher", d.teacher, d.teacher_steps, teacher_data, val, loss=LossArgs(preset="contrastive"))
    d.times["teacher_train"] = time.time() - t
    teacher_dir = Path(res["student_dir"])
    d.summary["teacher"] = evaluate(teacher=f"local-dir:{teacher_dir}", val=val)
    return teacher_dir


def _reinforce(d: _Demo, teacher_dir: Path) -> Path:
    """Step 3: `build-data` reinforces the corpus with the teacher."""
    t = d.step(f"3/5 build-data: reinforce the corpus with the teacher ({d.num_augs} augmentations per image)")
    reinforced = d.out / "reinforced"
    build = BuildArgs(
        num_augs=d.num_augs, num_syn=0, batch_size=128, num_workers=d.num_workers, seed=d.seed, scale_min=0.35,
        progress=False,
    )  # fmt: skip
    d.summary["build_data"] = build_data(
        out=reinforced,
        data=InputArgs(path=str(d.out / "corpus" / "train")),
        teacher=f"local-dir:{teacher_dir}",
        build=build,
    )
    d.times["build_data"] = time.time() - t
    return reinforced


def _students(d: _Demo, data: DataArgs, val: EvalArgs, reinforced: Path) -> Path:
    """Step 4: the student from the reinforced shards and from scratch, same steps; both evaluated."""
    t = d.step(
        f"4/5 train the student ({d.student}) from reinforced shards, and from scratch ({d.student_steps} steps)"
    )
    kd_data = DataArgs(path=str(reinforced), batch_size=d.batch_size, num_workers=d.num_workers)
    res_kd = d.train_run("student_kd", d.student, d.student_steps, kd_data, val)
    d.times["student_kd_train"] = time.time() - t
    t = time.time()
    scratch = LossArgs(preset="contrastive")
    res_sc = d.train_run("student_scratch", d.student, d.student_steps, data, val, loss=scratch)
    d.times["student_scratch_train"] = time.time() - t
    d.summary["student_kd"] = evaluate(student=res_kd["student_dir"], val=val)
    d.summary["student_scratch"] = evaluate(student=res_sc["student_dir"], val=val)
    return Path(res_kd["student_dir"])


def _export_and_bench(d: _Demo, kd_dir: Path, meta: dict) -> None:
    """Step 5: export the distilled student (ExecuTorch + CoreML + app bundle) and benchmark it."""
    t = d.step("5/5 export (ExecuTorch + CoreML + app bundle) and bench")
    d.summary["export"] = export_fn(
        checkpoint=kd_dir,
        out=d.out / "export",
        format="all",
        class_names=meta["classes"],
        templates=list(meta["templates"]),
    )
    d.summary["export"].pop("_table", None)
    bench_res = bench(artifacts=d.out / "export", iters=5 if d.quick else 50, warmup=2 if d.quick else 10)
    d.summary["bench_table"] = bench_res.pop("_table", None)
    d.summary["bench"] = bench_res
    d.times["export_bench"] = time.time() - t


def _table(s: dict[str, object]) -> str:
    rows = [("model", "zero-shot top-1 %", "i2t R@1", "t2i R@1", "t2i R@5")]
    teacher_run = f"{s['teacher_steps']} x {s.get('teacher_batch_size', s.get('batch_size'))}"
    for key, label in (
        ("teacher", f"teacher {s['teacher_arch']} (scratch, {teacher_run})"),
        ("student_scratch", f"student {s['student_arch']} scratch"),
        ("student_kd", f"student {s['student_arch']} reinforced KD"),
    ):
        r = s.get(key) or {}
        rows.append(
            (
                label,
                f"{r.get('zeroshot_top1', float('nan')):.1f}",
                f"{r.get('i2t_R@1', float('nan')):.1f}",
                f"{r.get('t2i_R@1', float('nan')):.1f}",
                f"{r.get('t2i_R@5', float('nan')):.1f}",
            )
        )
    n_classes = (s.get("teacher") or {}).get("zeroshot_classes")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if n_classes:
        lines.append(f"(chance: {100.0 / n_classes:.1f} % zero-shot over {n_classes} classes)")
    if s.get("bench_table"):
        lines += ["", s["bench_table"]]
    if "seconds" in s:
        lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    return "\n".join(lines)
