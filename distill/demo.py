"""`distill demo`: the whole toolkit end to end on the embedded corpus, on a laptop CPU, with no download.

1. generate the shapes corpus;
2. train a tiny CLIP teacher from scratch (contrastive) and evaluate it;
3. `build-data`: reinforce the corpus with that teacher (K stored augmentations + teacher embeddings);
4. train a small student from the reinforced shards (MobileCLIP KD, no teacher at train time), and the same
   student from scratch for the same number of steps, and evaluate both;
5. `export` the distilled student (ExecuTorch .pte + CoreML .mlpackage + app bundle) and `bench` it.
Prints a summary table and writes `summary.json`. Every step is the same code path a user runs from the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["demo"]


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def demo(
    out: Path = Path("demo_out"),
    teacher: str = "tiny_mci",
    student: str = "tiny_vit_s",
    image_size: int = 32,
    teacher_steps: int = 400,
    student_steps: int = 300,
    batch_size: int = 64,
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
        batch_size: Batch size of every training run.
        num_augs: Augmentations stored per image by build-data.
        num_workers: DataLoader workers (default: 1 on <= 2 cores, else 2; the rest of the cores run torch).
        seed: Seed of every step.
        export: Also export the distilled student and benchmark it.
        quick: Tiny sizes for a smoke test (a few steps; numbers are meaningless).

    Returns:
        The summary (also written to `<out>/summary.json`).
    """
    import torch

    from distill.args import DataArgs, EvalArgs, LossArgs, OptimArgs, TrainerArgs
    from distill.evaluate import evaluate
    from distill.train import train
    from reinforced_data.shapes import CorpusCfg, write_shapes_corpus

    cores = os.cpu_count() or 1
    if num_workers is None:
        num_workers = 1 if cores <= 2 else 2
    # NOTE: oversubscribing cores (torch threads + loader workers) makes OpenMP spin-waits dominate on small CPUs.
    torch.set_num_threads(max(1, cores - num_workers))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    corpus_cfg = CorpusCfg(n_train=256, n_val=64, n_zeroshot_per_class=2, shard_size=128) if quick else CorpusCfg()
    if quick:
        teacher, student, image_size = "test_tiny", "test_tiny", 32
        teacher_steps, student_steps, batch_size, num_augs = 3, 3, 16, 2
    summary: dict[str, Any] = {
        "out": str(out),
        "teacher_arch": teacher,
        "student_arch": student,
        "image_size": image_size,
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
    }
    times: dict[str, float] = {}
    t_all = time.time()

    t = _step("1/5 embedded corpus")
    corpus = out / "corpus"
    meta = write_shapes_corpus(corpus, corpus_cfg)
    times["corpus"] = time.time() - t
    print(f"{meta['num_samples']} samples, {len(meta['classes'])} zero-shot classes -> {corpus}")
    data = DataArgs(batch_size=batch_size, num_workers=num_workers, corpus_dir=str(corpus), rrc_scale_min=0.35)
    val = EvalArgs(zeroshot=str(corpus / "zeroshot"), retrieval=str(corpus / "val"))

    def run(name: str, **kw: Any) -> dict:
        steps = kw.pop("steps")
        trainer = TrainerArgs(
            max_steps=steps,
            default_root_dir=str(out / "runs" / name),
            seed=seed,
            log_every_n_steps=max(1, min(20, steps // 5)),
            enable_progress_bar=False,
            checkpoint_every_n_steps=max(1, steps),
        )
        optim = OptimArgs(lr=kw.pop("lr", 2e-3), warmup_steps=max(1, steps // 10), weight_decay=0.1)
        return train(trainer=trainer, optim=optim, val=val, **kw)

    t = _step(f"2/5 train the demo teacher ({teacher}, scratch, {teacher_steps} steps)")
    res_t = run(
        "teacher",
        student=teacher,
        steps=teacher_steps,
        image_size=image_size,
        data=data,
        loss=LossArgs(preset="contrastive"),
    )
    times["teacher_train"] = time.time() - t
    teacher_dir = Path(res_t["student_dir"])
    summary["teacher"] = evaluate(teacher=f"local-dir:{teacher_dir}", data=val)

    t = _step(f"3/5 build-data: reinforce the corpus with the teacher ({num_augs} augmentations per image)")
    from reinforced_data.build import BuildArgs, build_data

    reinforced = out / "reinforced"
    build = BuildArgs(
        num_augs=num_augs, num_syn=0, batch_size=128, num_workers=num_workers, seed=seed, scale_min=0.35, progress=False
    )
    summary["build_data"] = build_data(
        out=reinforced, input=str(corpus / "train"), teacher=f"local-dir:{teacher_dir}", build=build
    )
    times["build_data"] = time.time() - t

    t = _step(f"4/5 train the student ({student}) from reinforced shards, and from scratch ({student_steps} steps)")
    res_kd = run(
        "student_kd",
        student=student,
        steps=student_steps,
        image_size=image_size,
        data=DataArgs(path=str(reinforced), batch_size=batch_size, num_workers=num_workers),
    )
    times["student_kd_train"] = time.time() - t
    t2 = time.time()
    res_sc = run(
        "student_scratch",
        student=student,
        steps=student_steps,
        image_size=image_size,
        data=data,
        loss=LossArgs(preset="contrastive"),
    )
    times["student_scratch_train"] = time.time() - t2
    summary["student_kd"] = evaluate(student=res_kd["student_dir"], data=val)
    summary["student_scratch"] = evaluate(student=res_sc["student_dir"], data=val)

    if export:
        t = _step("5/5 export (ExecuTorch + CoreML + app bundle) and bench")
        from export.api import export as export_fn
        from export.bench import bench

        classes = meta["classes"]
        summary["export"] = export_fn(
            checkpoint=Path(res_kd["student_dir"]),
            out=out / "export",
            format="all",
            class_names=classes,
            templates=list(meta["templates"]),
        )
        summary["export"].pop("_table", None)
        bench_res = bench(artifacts=out / "export", iters=5 if quick else 50, warmup=2 if quick else 10)
        summary["bench_table"] = bench_res.pop("_table", None)
        summary["bench"] = bench_res
        times["export_bench"] = time.time() - t
    times["total"] = time.time() - t_all
    summary["seconds"] = {k: round(v, 1) for k, v in times.items()}
    summary["_table"] = _table(summary)
    tmp = out / f"summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({k: v for k, v in summary.items() if k != "_table"}, indent=1, default=str))
    os.replace(tmp, out / "summary.json")
    return summary


def _table(s: dict) -> str:
    rows = [("model", "zero-shot top-1 %", "i2t R@1", "t2i R@1", "t2i R@5")]
    for key, label in (
        ("teacher", f"teacher {s['teacher_arch']} (scratch)"),
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
