"""Training throughput of a MobileCLIP student: the plain open_clip loop vs `distill` (same process, same machine).

Measurements (samples/s over timed optimizer steps after warm-up; the GPU suite `benchmarks/gpu_suite.py` calls
the same functions):
  plain      the loop a user writes: open_clip's model of the student's architecture (MobileCLIP2-S0 is
             `open_clip.create_model("MobileCLIP2-S0")`; MCt students, which open_clip lacks, use our student in the
             same loop), AdamW, `torch.autocast` bf16, open_clip `ClipLoss`, random in-memory tensors;
  memory     `distill.DistillModule` under a Lightning Trainer fed from memory with the reinforced-training batch
             (two 768-d teachers, real + synthetic caption, MobileCLIP KD loss from `distill.train.build_loss`),
             clipping as `distill train` does; `--no_syn` drops the synthetic caption (the plain loop's work);
  pipeline   the real `distill train --mode reinforced` (a subprocess) on shards written by `build-data`:
             tar -> decode -> replay one stored augmentation at the student's size -> stored targets -> KD loss.
  overhead   (CPU) the cost of Lightning + `DistillModule` against the bare loops, measured interleaved: every
             Lightning step is followed by one bare open_clip step and one bare student step on the same weights and
             batch, so machine load hits all three alike; then Lightning's SimpleProfiler and the bare loop's own
             phase timers say where the time goes.

Usage:
  python benchmarks/train_throughput.py                          # plain, memory, pipeline (sizes shrink on CPU)
  python benchmarks/train_throughput.py --only overhead --rounds 12 --threads 2
Writes benchmarks/out/train_throughput[-overhead].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's packages are not installed
    sys.path.insert(0, str(ROOT))

_logger = logging.getLogger("benchmarks.train_throughput")

# Students whose architecture open_clip ships under another name (what a user would create).
OPEN_CLIP_ARCH = {
    "mobileclip2_s0": "MobileCLIP2-S0",
    "mobileclip_s1": "MobileCLIP-S1",
    "mobileclip_s2": "MobileCLIP-S2",
}
TEACHER_DIM = 768  # the DataCompDR / DFNDR teachers (ViT-L/14) embed in 768-d


@dataclass
class StepCfg:
    """One training-throughput measurement."""

    student: str = "mobileclip2_s0"
    """Registered student name."""
    batch_size: int = 256
    """Per-device batch."""
    steps: int = 20
    """Timed steps (fewer when `budget_s` runs out)."""
    warmup: int = 5
    """Untimed steps first (allocator, cuDNN autotune, compilation)."""
    device: str = "cuda"
    """Torch device."""
    bf16: bool = True
    """bf16 autocast (Lightning `bf16-mixed`); fp32 otherwise."""
    channels_last: bool = False
    """Channels-last images and image tower."""
    fused: bool = False
    """Fused AdamW (CUDA only; `DistillModule` fuses on CUDA by itself)."""
    compile: bool = False
    """`torch.compile` (the plain model's forward; our student's two towers, as `distill train` does)."""
    compile_backend: str = "inductor"
    """Compiler backend (`eager` in the CPU dry run: dynamo tracing without code generation)."""
    budget_s: float | None = None
    """Stop timing after this many seconds of timed steps (at least one timed step)."""

    def label(self) -> str:
        opts = [o for o, on in (("cl", self.channels_last), ("fused", self.fused), ("compile", self.compile)) if on]
        return "+".join(opts) or "eager"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(cfg: StepCfg, steps: int, seconds: float, **extra: object) -> dict:
    return {
        "student": cfg.student,
        "variant": cfg.label(),
        "batch_size": cfg.batch_size,
        "steps_timed": steps,
        "seconds": round(seconds, 3),
        "step_ms": round(1000 * seconds / max(steps, 1), 2),
        "samples_per_s": round(cfg.batch_size * steps / seconds, 2) if seconds > 0 else None,
        **extra,
    }


def _time_loop(step: Callable[[], None], cfg: StepCfg, device: torch.device) -> tuple[int, float]:
    """Run `warmup` untimed then up to `steps` timed calls of `step`; returns (timed steps, seconds)."""
    for _ in range(cfg.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    for _ in range(cfg.steps):
        step()
        done += 1
        if cfg.budget_s is not None and time.perf_counter() - t0 > cfg.budget_s:
            break
    _sync(device)
    return done, time.perf_counter() - t0


def _image_size(student: str) -> int:
    from students import get_student_cfg

    return get_student_cfg(student).image.image_size


def plain_model(student: str) -> tuple[torch.nn.Module, str]:
    """The model a plain open_clip user trains for `student`'s architecture, and where it came from."""
    import open_clip

    from students import create_student, get_student_cfg

    if student in OPEN_CLIP_ARCH:
        return open_clip.create_model(OPEN_CLIP_ARCH[student]), f"open_clip {OPEN_CLIP_ARCH[student]}"
    cfg = get_student_cfg(student)
    if cfg.text.kind == "mct":  # open_clip has no MCt text tower: our student in the same plain loop
        return create_student(student), f"students.{student} (open_clip lacks MCt)"
    model_cfg = {k: v for k, v in cfg.open_clip_model_cfg().items() if k != "custom_text"}
    return open_clip.CustomTextCLIP(**model_cfg), f"open_clip CustomTextCLIP({student} config)"


def plain_loop(cfg: StepCfg) -> dict:
    """The plain AMP loop a user writes, on random in-memory tensors already on the device."""
    import open_clip

    device = torch.device(cfg.device)
    model, source = plain_model(cfg.student)
    model = model.to(device).train()
    size = _image_size(cfg.student)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    texts = torch.randint(1, 49000, (cfg.batch_size, 77), device=device)
    texts = texts[:, : getattr(model, "context_length", 77)]
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2, fused=cfg.fused or None)
    loss_fn = open_clip.ClipLoss()
    forward = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def step() -> None:
        with amp:
            out = forward(images, texts)
            if isinstance(out, dict):  # our student (MCt) returns a dict
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(out[0], out[1], out[2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps, seconds = _time_loop(step, cfg, device)
    return _result(cfg, steps, seconds, loop="plain", model=source)


class _MemoryBatches(torch.utils.data.IterableDataset):
    """One fixed batch, repeated: the training step without any data loading."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.batch


def reinforced_batch(student: torch.nn.Module, batch_size: int, device: torch.device, syn: bool = True) -> dict:
    """A batch shaped like `distill train --mode reinforced` gives the module (two 768-d teachers)."""
    b, size = batch_size, student.image_size
    gen = torch.Generator().manual_seed(0)

    def feats() -> dict[str, torch.Tensor]:
        return {
            name: torch.nn.functional.normalize(torch.randn(b, TEACHER_DIM, generator=gen), dim=-1).to(device)
            for name in ("t0", "t1")
        }

    batch = {
        "image": torch.randint(0, 255, (b, 3, size, size), dtype=torch.uint8, generator=gen).to(device),
        "text": student.tokenize(["a photo of a small red circle"] * b).to(device),
        "teacher_image_features": feats(),
        "teacher_text_features": feats(),
    }
    if syn:
        batch["syn_text"] = student.tokenize(["a red circle left of a blue square"] * b).to(device)
        batch["teacher_syn_text_features"] = feats()
    return batch


def build_module(student: torch.nn.Module, preset: str, max_steps: int, channels_last: bool) -> torch.nn.Module:
    """`DistillModule` with the loss `distill train` builds for `preset` (teachers t0, t1 of 768 dims)."""
    from distill import DistillModule, LossArgs, OptimArgs
    from distill.train import build_loss

    scales = {"t0": 100.0, "t1": 100.0}
    dims = {"t0": TEACHER_DIM, "t1": TEACHER_DIM}
    has_teacher = preset != "contrastive"
    loss, desc = build_loss(
        LossArgs(preset=preset),
        has_teacher=has_teacher,
        teacher_scales=scales if has_teacher else {},
        teacher_dims=dims if has_teacher else {},
        student_dim=student.embed_dim,
    )
    return DistillModule(
        student,
        None,
        loss,
        OptimArgs(lr=1e-4, warmup_steps=1),
        max_steps=max_steps,
        channels_last=channels_last,
        freeze_logit_scale=desc["freeze_student_logit_scale"],
    )


def compile_towers(student: torch.nn.Module, backend: str) -> None:
    """Compile the student the way `distill train --trainer.compile` does (each tower in place)."""
    for tower in (student.visual, student.text):
        tower.compile(backend=backend)


def _trainer(cfg: StepCfg, max_steps: int, callbacks: list, **kwargs: object):  # noqa: ANN202 - pl.Trainer
    import pytorch_lightning as pl

    device = torch.device(cfg.device)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if cfg.bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def memory_module(cfg: StepCfg, syn: bool = True, preset: str = "mobileclip", clip: float | None = 1.0) -> dict:
    """`DistillModule` under Lightning, fed one in-device batch repeatedly (the step without data loading)."""
    import pytorch_lightning as pl

    from students import create_student

    device = torch.device(cfg.device)
    student = create_student(cfg.student)
    module = build_module(student, preset, cfg.warmup + cfg.steps, cfg.channels_last)
    # NOTE: channels_last converts the images only (DistillModule's forward), not the weights: as `distill train`.
    if cfg.compile:
        compile_towers(student, cfg.compile_backend)
    batch = reinforced_batch(student, cfg.batch_size, device, syn=syn)

    class _Timer(pl.Callback):
        steps, t0, seconds = 0, 0.0, 0.0

        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            self.steps += 1
            if self.steps == cfg.warmup:
                _sync(device)
                self.t0 = time.perf_counter()
            elif self.steps > cfg.warmup:
                elapsed = time.perf_counter() - self.t0
                if cfg.budget_s is not None and elapsed > cfg.budget_s:
                    trainer.should_stop = True

        def on_train_end(self, *args: object) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.t0

    timer = _Timer()
    loader = torch.utils.data.DataLoader(_MemoryBatches(batch), batch_size=None)
    trainer = _trainer(cfg, cfg.warmup + cfg.steps, [timer], gradient_clip_val=clip)
    trainer.fit(module, train_dataloaders=loader)
    timed = timer.steps - cfg.warmup
    return _result(cfg, timed, timer.seconds, loop="memory", preset=preset, syn_caption=syn, clip=clip)


def reinforced_train(cfg: StepCfg, data: Path, root: Path, workers: int, timeout_s: float) -> dict:
    """The real `distill train --mode reinforced` as a user runs it (a subprocess); figures from its run.json."""
    argv = [
        sys.executable,
        "-m",
        "distill.cli",
        "train",
        "--student",
        cfg.student,
        "--mode",
        "reinforced",
        "--data.path",
        str(data),
        "--data.batch_size",
        str(cfg.batch_size),
        "--data.num_workers",
        str(workers),
        "--optim.warmup_steps",
        "1",
        "--trainer.max_steps",
        str(cfg.warmup + cfg.steps),
        "--trainer.precision",
        "bf16-mixed" if cfg.bf16 else "32-true",
        "--trainer.channels_last",
        str(cfg.channels_last).lower(),
        "--trainer.compile",
        str(cfg.compile).lower(),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.resume",
        "never",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.checkpoint_every_n_steps",
        str(10 * (cfg.warmup + cfg.steps)),
        "--val.zeroshot",
        "null",
        "--val.retrieval",
        "null",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distill train exited {proc.returncode}: {proc.stderr[-3000:]}")
    run = json.loads((root / "run.json").read_text())
    return {
        "student": cfg.student,
        "variant": cfg.label(),
        "batch_size": cfg.batch_size,
        "loop": "pipeline",
        "samples_per_s": run["samples_per_second"],
        "steps": run["steps"],
        "workers": workers,
        "fit_seconds": run["fit_seconds"],
        "wall_seconds": round(wall, 2),
        "note": "Throughput callback of distill train (steps after the first 2; no device sync)",
    }


# ------------------------------------------------------------------------------------------- CPU overhead study


def _spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {
        "median": round(statistics.median(values), 4),
        "p10": round(q[0], 4),
        "p90": round(q[-1], 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


class _BareLoop:
    """A bare training step on one model: forward + loss, backward, AdamW step, with phase timers."""

    def __init__(self, model: torch.nn.Module, loss: Callable, images: torch.Tensor, texts: torch.Tensor) -> None:
        self.model, self.loss, self.images, self.texts = model.train(), loss, images, texts
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2)
        self.phases: dict[str, list[float]] = {"forward+loss": [], "backward": [], "optimizer": []}

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.loss(self.model(self.images, self.texts))
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        for key, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            self.phases[key].append(dt)
        return t3 - t0


def overhead(student_name: str, batch_size: int, rounds: int, warmup: int, profile_steps: int) -> dict:
    """Interleaved per-step times of Lightning + `DistillModule` vs the bare open_clip and bare student loops.

    The three run the same architecture from the same weights on the same batch and contrastive loss (no
    synthetic caption, no clipping), so their difference is Lightning, the module and the loss implementation.
    """
    import open_clip
    import pytorch_lightning as pl

    from students import create_student

    torch.manual_seed(0)
    student = create_student(student_name)
    module = build_module(student, "contrastive", warmup + rounds + 1, channels_last=False)
    batch = reinforced_batch(student, batch_size, torch.device("cpu"), syn=False)
    batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    pixels = student.normalize(batch["image"])  # the bare loops get preprocessed floats, as a user's loader gives

    oc_model, source = plain_model(student_name)
    oc_model.load_state_dict(student.state_dict())  # same keys (open_clip CustomTextCLIP layout)
    oc_loss = open_clip.ClipLoss()
    bare_oc = _BareLoop(oc_model, lambda out: oc_loss(*out[:3]), pixels, batch["text"])
    twin = create_student(student_name)
    twin.load_state_dict(student.state_dict())
    twin_module = build_module(twin, "contrastive", 1, channels_last=False)  # only for its loss
    bare_st = _BareLoop(twin, lambda out: sum(twin_module.loss(**out).values()), pixels, batch["text"])

    times: dict[str, list[float]] = {"lightning": [], "bare_open_clip": [], "bare_student": []}

    class _Interleave(pl.Callback):
        mark: float | None = None
        n = 0

        def on_train_batch_end(self, *args: object) -> None:
            now = time.perf_counter()
            self.n += 1
            if self.n > warmup and self.mark is not None:
                times["lightning"].append(now - self.mark)
            bare = [("bare_open_clip", bare_oc), ("bare_student", bare_st)]
            for name, loop in bare if self.n % 2 else bare[::-1]:  # alternate which bare loop runs first
                dt = loop.step()
                if self.n > warmup:
                    times[name].append(dt)
            if self.n > warmup and times["lightning"]:
                row = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v)
                print(f"overhead round {self.n - warmup}: {row}", flush=True)  # progress of a long CPU run
            self.mark = time.perf_counter()

    loader = torch.utils.data.DataLoader(_MemoryBatches(batch), batch_size=None)
    cfg = StepCfg(student=student_name, batch_size=batch_size, device="cpu", bf16=False)
    _trainer(cfg, warmup + rounds + 1, [_Interleave()], gradient_clip_val=None).fit(module, loader)

    lightning, bare = times["lightning"], times["bare_open_clip"]
    paired = [a / b for a, b in zip(lightning, bare, strict=False)]
    paired_st = [a / b for a, b in zip(lightning, times["bare_student"], strict=False)]
    out = {
        "student": student_name,
        "open_clip_model": source,
        "batch_size": batch_size,
        "rounds": len(lightning),
        "step_s": {k: _spread(v) for k, v in times.items()},
        "ratio_lightning_vs_bare_open_clip": _spread(paired),
        "ratio_lightning_vs_bare_student": _spread(paired_st),
        "ratio_of_medians": round(statistics.median(lightning) / statistics.median(bare), 4),
    }
    if profile_steps > 0:
        out["profile"] = _profile_phases(student, batch, bare_st, cfg, profile_steps)
    return out


def _profile_phases(student: torch.nn.Module, batch: dict, bare: _BareLoop, cfg: StepCfg, steps: int) -> dict:
    """Lightning's SimpleProfiler (seconds per step by action) beside the bare student loop's phase timers."""
    from pytorch_lightning.profilers import SimpleProfiler

    module = build_module(student, "contrastive", steps + 1, channels_last=False)
    loader = torch.utils.data.DataLoader(_MemoryBatches(batch), batch_size=None)
    with tempfile.TemporaryDirectory() as tmp:
        profiler = SimpleProfiler(dirpath=tmp, filename="profile")
        _trainer(cfg, steps + 1, [], gradient_clip_val=None, profiler=profiler).fit(module, loader)
        durations = {k: v[1:] for k, v in profiler.recorded_durations.items() if len(v) > 1}  # drop step 1
    per_step = {k: round(sum(v) / len(v), 4) for k, v in durations.items() if len(v) >= steps - 1}
    top = dict(sorted(per_step.items(), key=lambda kv: -kv[1])[:14])
    for _ in range(steps):
        bare.step()
    return {
        "lightning_s_per_step": top,
        "bare_student_s_per_step": {k: round(statistics.median(v[-steps:]), 4) for k, v in bare.phases.items()},
    }


# ----------------------------------------------------------------------------------------------------- script


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "open_clip_torch", "pytorch-lightning", "timm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _pipeline_data(work: Path, n: int, workers: int) -> Path:
    """Shapes corpus -> `build-data` with the tiny ensemble (dims differ from 768: the student only reads them)."""
    from reinforced_data import BuildArgs, CorpusCfg, build_data, write_shapes_corpus

    corpus = work / "corpus"
    write_shapes_corpus(
        corpus, CorpusCfg(n_train=n, n_val=16, n_zeroshot_per_class=1, image_size=128, shard_size=max(256, n // 4))
    )
    data = work / "reinforced"
    build_data(
        out=data,
        input=str(corpus / "train"),
        teacher="test_tiny_ensemble",
        build=BuildArgs(num_augs=4, num_syn=0, num_workers=workers, progress=False),
    )
    return data


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="mobileclip2_s0")
    p.add_argument("--batch_size", type=int, default=256 if cuda else 16)
    p.add_argument("--steps", type=int, default=30 if cuda else 4)
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels_last", action="store_true", default=cuda)
    p.add_argument("--rounds", type=int, default=10, help="overhead: interleaved rounds")
    p.add_argument("--profile_steps", type=int, default=3, help="overhead: profiled steps (0: none)")
    p.add_argument("--only", choices=["plain", "memory", "pipeline", "overhead"], action="append")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    base = StepCfg(
        student=args.student,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        bf16=cuda,
        channels_last=args.channels_last,
        fused=cuda,
        compile=args.compile,
    )
    record: dict = {
        "benchmark": "train_throughput",
        "cfg": asdict(base),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu {platform.machine()} x{os.cpu_count()}",
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "versions": _versions(),
    }
    names = args.only or ["plain", "memory", "pipeline"]
    if names == ["overhead"]:
        record["overhead"] = overhead(args.student, args.batch_size, args.rounds, args.warmup, args.profile_steps)
        record["load_avg_end"] = os.getloadavg()
        dest = OUT_DIR / "train_throughput-overhead.json"
    else:
        results: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                if name == "plain":
                    results[name] = plain_loop(base)
                elif name == "memory":
                    results[name] = memory_module(base)
                elif name == "pipeline":
                    n = max(args.batch_size * (args.warmup + args.steps + 2), 256)
                    data = _pipeline_data(Path(tmp), n, args.workers)
                    results[name] = reinforced_train(base, data, Path(tmp) / "run", args.workers, 3600)
                print(f"{name}: {results[name]['samples_per_s']} samples/s", flush=True)
        record["results"] = results
        if "plain" in results:
            record["ratio_vs_plain"] = {
                k: round(v["samples_per_s"] / results["plain"]["samples_per_s"], 3) for k, v in results.items()
            }
        dest = OUT_DIR / "train_throughput.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
