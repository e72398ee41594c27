"""Training throughput of a MobileCLIP-S0-sized student: plain open_clip loop vs `distill` (same run, same machine).

Three measurements, samples/s over timed optimizer steps after warm-up:
  baseline   the loop a user would write: open_clip `MobileCLIP2-S0`, AdamW, `torch.autocast` (bf16 on GPU),
             `open_clip.ClipLoss`, random in-memory tensors;
  memory     `distill.module.DistillModule` (MobileCLIP KD loss against in-memory teacher targets) under a Lightning
             Trainer fed from memory, with the speed options on (channels-last, fused AdamW on GPU, compile opt-in);
  pipeline   the real `distill train` in reinforced mode: tar shards -> decode -> replay one stored augmentation at
             the student's 256 px -> stored teacher embeddings -> KD loss (DataLoader workers).

Usage: python benchmarks/train_throughput.py [--batch_size 256 --steps 30] (defaults shrink on CPU).
Writes benchmarks/out/train_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline(args: argparse.Namespace, device: torch.device) -> float:
    """Plain open_clip AMP training loop on in-memory tensors."""
    import open_clip

    model = open_clip.create_model("MobileCLIP2-S0").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    texts = torch.randint(1, 49000, (args.batch_size, 77), device=device)
    texts[:, -1] = 49407
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        with amp:
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return args.batch_size * len(times) / sum(times)


class _MemoryBatches(torch.utils.data.IterableDataset):
    """One fixed reinforced-style batch, repeated: measures the training step without any data loading."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def memory(args: argparse.Namespace, device: torch.device) -> float:
    """`DistillModule` under Lightning, fed from memory."""
    import pytorch_lightning as pl

    from distill.args import OptimArgs
    from distill.callbacks import Throughput
    from distill.losses import DistillLoss
    from distill.module import DistillModule
    from students import create_student

    student = create_student(args.student)
    b = args.batch_size
    feats = {
        "t0": torch.nn.functional.normalize(torch.randn(b, 768), dim=-1),
        "t1": torch.nn.functional.normalize(torch.randn(b, 768), dim=-1),
    }
    batch = {
        "image": torch.randint(0, 255, (b, 3, args.image_size, args.image_size), dtype=torch.uint8),
        "text": student.tokenize(["a photo of a small red circle"] * b),
        "syn_text": student.tokenize(["a red circle left of a blue square"] * b),
        "teacher_image_features": feats,
        "teacher_text_features": feats,
        "teacher_syn_text_features": feats,
    }
    loss = DistillLoss(contrastive_weight=0.0, kd_weight=1.0, teacher_logit_scales={"t0": 100.0, "t1": 100.0})
    module = DistillModule(
        student,
        None,
        loss,
        OptimArgs(lr=1e-4, warmup_steps=1),
        max_steps=args.warmup + args.steps,
        channels_last=device.type == "cuda",
    )
    if args.compile:
        module.student = torch.compile(module.student)
    speed = Throughput(b, warmup=args.warmup)
    loader = torch.utils.data.DataLoader(_MemoryBatches(batch), batch_size=None)
    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[speed],
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return float(speed.samples_per_second)


def pipeline(args: argparse.Namespace, device: torch.device, work: Path) -> float:
    """`distill train` in reinforced mode on shards built by `build-data` (real decode + replay + KD)."""
    from distill.args import DataArgs, EvalArgs, LossArgs, OptimArgs, TrainerArgs
    from distill.train import train
    from reinforced_data.build import BuildArgs, build_data
    from reinforced_data.shapes import CorpusCfg, write_shapes_corpus

    n = max(args.batch_size * (args.warmup + args.steps + 2), 256)
    corpus = work / "corpus"
    write_shapes_corpus(
        corpus, CorpusCfg(n_train=n, n_val=16, n_zeroshot_per_class=1, image_size=128, shard_size=max(256, n // 4))
    )
    data = work / "reinforced"
    build_data(
        out=data,
        input=str(corpus / "train"),
        teacher="test_tiny_ensemble",
        build=BuildArgs(num_augs=4, num_syn=0, num_workers=args.workers, progress=False),
    )
    res = train(
        student=args.student,
        data=DataArgs(path=str(data), batch_size=args.batch_size, num_workers=args.workers),
        loss=LossArgs(preset="mobileclip"),
        optim=OptimArgs(lr=1e-4, warmup_steps=1),
        trainer=TrainerArgs(
            max_steps=args.warmup + args.steps,
            default_root_dir=str(work / "run"),
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            channels_last=device.type == "cuda",
            enable_progress_bar=False,
            compile=args.compile,
            resume="never",
        ),
        val=EvalArgs(),
    )
    return float(res["samples_per_second"])


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="mobileclip2_s0")
    p.add_argument("--batch_size", type=int, default=256 if cuda else 16)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30 if cuda else 4)
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--only", choices=["baseline", "memory", "pipeline"], action="append")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or ["baseline", "memory", "pipeline"]:
            t = time.time()
            fn = {"baseline": baseline, "memory": memory, "pipeline": lambda a, d: pipeline(a, d, Path(tmp))}[name]
            results[name] = round(fn(args, device), 2)
            print(f"{name}: {results[name]} samples/s ({time.time() - t:.0f} s)", flush=True)
    import importlib.metadata as md

    out = {
        "benchmark": "train_throughput",
        "student": args.student,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu {platform.machine()} x{os.cpu_count()}",
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "compile": args.compile,
        "versions": {k: md.version(k) for k in ("torch", "open_clip_torch", "pytorch-lightning", "timm")},
        "samples_per_s": results,
    }
    if "baseline" in results:
        out["ratio_vs_baseline"] = {k: round(v / results["baseline"], 3) for k, v in results.items()}
    if "memory" in results and "pipeline" in results:
        out["pipeline_vs_memory"] = round(results["pipeline"] / results["memory"], 3)
    dest = ROOT / "benchmarks" / "out" / "train_throughput.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
