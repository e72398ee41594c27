"""Prove the distillation recipes on real data: teachers -> reinforced data -> distilled students on Flickr8k.

Every step runs through the real `distill` command line (a subprocess of `python -m distill.cli`, or the same
function in-process with `--inprocess`), writes under `--work` (default `runs/flickr8k/`), and is skipped when its
output exists, so an interrupted run is resumed by running the same command again (each `distill train` resumes
itself from `<run>/checkpoints/last.ckpt`).

Steps:
1. Teachers, trained here on the flickr8k train split (no pretrained CLIP can be downloaded): A = CoCa
   (`tiny_coca`: contrastive + captioning loss), whose captioner writes the synthetic captions; B = a plain CLIP
   ViT (`tiny_vit`, another seed). The ensemble is `local-dir:A,local-dir:B`.
2. `distill build-data` twice on the train split with that ensemble, same augmentation records (same seed):
   `real` (flickr's other four captions in `syn_text_alt`, no captioner) and `syn` (the same plus `num_syn`
   captions of A under `syn_text`). Both use several ranks (one process per core) when `build_ranks > 1`.
3. A short probe picks the KD logit scale on the dev split (ViT student, reinforced `real` data).
4. Students (`tiny_mci` = MobileCLIP-S0 class, `tiny_vit_s` = TinyCLIP-ViT-8M class), all rows at the same steps
   and batch size: scratch (contrastive, same augmentations), KD from reinforced data with real captions only,
   + synthetic captions, online KD with the live ensemble (same loss), TinyCLIP affinity mimicking + manual
   inheritance from B (ViT student), + CLIP-KD feature distillation.
5. `distill eval` of every row and of the teachers on the flickr8k test split (R@1/5/10 both ways) and zero-shot
   CIFAR-10; `distill export --format executorch` + `distill bench` per student architecture.
6. Curves (test R@1 vs steps, from the validation during training), steps-to-reach the scratch run's final R@1,
   wall time per step (median over logging intervals, from the TensorBoard event times), and the outputs:
   `<work>/flickr8k.json` and `<work>/flickr8k.md`, copied to `benchmarks/out/flickr8k.{json,md}` and the curves to
   `docs/flickr8k_curves.png` for the reduced/full scales.

Usage:
    python benchmarks/flickr8k_recipes.py --scale reduced            # ~2 h on 2 CPU cores
    python benchmarks/flickr8k_recipes.py --scale smoke --work /tmp/f8k --inprocess --no-export   # the slow test
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

STUDENTS = ("tiny_mci", "tiny_vit_s")
"""MobileCLIP-S0 class (FastViT-T8 image tower) and TinyCLIP-ViT-8M class (ViT that inherits from teacher B)."""


@dataclass(frozen=True)
class Scale:
    """Sizes of one pipeline scale (every figure of the report names the scale it came from)."""

    name: str
    image_size: int
    """Input resolution of every model (teachers and students)."""
    teacher_a_steps: int
    teacher_b_steps: int
    teacher_batch: int
    student_steps: int
    batch_size: int
    val_every: int
    """Validation (flickr8k test retrieval) interval during student training: the curves."""
    num_augs: int
    num_syn: int
    probe_steps: int
    probe_scales: tuple[float, ...]
    teacher_a_context: int = 20
    """CoCa context: covers 92% of flickr8k captions whole and bounds the captioner's decoding length."""
    build_ranks: int = 2
    shard_size: int = 500
    scale_min: float = 0.35
    """RandomResizedCrop area floor of every augmentation (build-data records and on-the-fly views alike)."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    train_images: int | None = None
    """Use only the first N train images (smoke)."""
    test_images: int | None = None
    """Cap the retrieval/zero-shot sets (smoke)."""
    num_workers: int = 2
    log_every: int = 5
    bench_iters: int = 50


SCALES: dict[str, Scale] = {
    # A few steps on 48 images: exercises every code path (the slow test).
    "smoke": Scale(
        "smoke",
        image_size=32,
        teacher_a_steps=3,
        teacher_b_steps=3,
        teacher_batch=16,
        student_steps=4,
        batch_size=16,
        val_every=2,
        num_augs=2,
        num_syn=1,
        probe_steps=2,
        probe_scales=(20.0, 100.0),
        build_ranks=1,
        shard_size=24,
        train_images=48,
        test_images=16,
        num_workers=1,
        log_every=1,
        bench_iters=5,
    ),
    # What fits ~2 h of a shared 2-core CPU (measured per-sample costs in docs/RESULTS.md).
    "reduced": Scale(
        "reduced",
        image_size=32,
        teacher_a_steps=300,
        teacher_b_steps=600,
        teacher_batch=128,
        student_steps=250,
        batch_size=128,
        val_every=25,
        num_augs=10,
        num_syn=1,
        probe_steps=100,
        probe_scales=(20.0, 50.0, 100.0),
    ),
    # The same recipe at the students' native 64 px and 5 synthetic captions (about a day on this CPU).
    "full": Scale(
        "full",
        image_size=64,
        teacher_a_steps=3000,
        teacher_b_steps=4000,
        teacher_batch=128,
        student_steps=2000,
        batch_size=128,
        val_every=100,
        num_augs=10,
        num_syn=5,
        probe_steps=300,
        probe_scales=(20.0, 50.0, 100.0),
        teacher_a_context=32,
    ),
}


@dataclass(frozen=True)
class Row:
    """One ablation row: how a student is trained."""

    key: str
    label: str
    students: tuple[str, ...]
    note: str = ""


ROWS: tuple[Row, ...] = (
    Row(
        "scratch",
        "scratch (contrastive only)",
        STUDENTS,
        "CLIP loss, one of the 5 real captions per sample, on-the-fly RRC + RandAugment",
    ),
    Row(
        "kd_real",
        "+ KD, reinforced data (real captions)",
        STUDENTS,
        "MobileCLIP loss (w_con 0, w_kd 1) on stored ensemble embeddings; caption 1 + one of the other 4 real ones",
    ),
    Row(
        "kd_syn",
        "+ synthetic captions",
        STUDENTS,
        "as above; the second caption is drawn from the other real captions or A's synthetic ones (50/50)",
    ),
    Row(
        "kd_online",
        "online KD, live teacher (same loss)",
        STUDENTS,
        "MobileCLIP loss, the ensemble runs every step on the on-the-fly views; one real caption per sample",
    ),
    Row(
        "tinyclip",
        "TinyCLIP: affinity mimicking + inheritance",
        ("tiny_vit_s",),
        "online teacher B, affinity KD at scale 50 (student scale frozen at 50), manual inheritance from B",
    ),
    Row(
        "fd",
        "+ feature distillation (CLIP-KD)",
        STUDENTS,
        "adds CLIP-KD FD (w 2000) to the student's best-suited KD row: TinyCLIP row (ViT), reinforced real (MCi)",
    ),
)


# ------------------------------------------------------------------------------------------------ infrastructure


@dataclass
class Ctx:
    """Paths and options shared by every step."""

    scale: Scale
    work: Path
    seed: int
    flickr: Path
    cifar: Path
    threads: int
    inprocess: bool
    export: bool
    log: list[dict] = field(default_factory=list)
    train_students: tuple[str, ...] | None = None
    """Train new rows only for these students (rows already trained are still evaluated and reported)."""

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

    @property
    def ensemble(self) -> str:
        return f"local-dir:{self.teacher_dir('A') / 'student'},local-dir:{self.teacher_dir('B') / 'student'}"

    def data_dir(self, which: str) -> Path:
        return self.work / "data" / which


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # NOTE: one intra-op thread: on a shared 2-core machine OpenMP spin-waiting with 2 threads was 2-4x slower
    # (measured); the second core runs the DataLoader workers.
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


def distill(
    ctx: Ctx, args: list[str], *, name: str, extra_env: dict[str, str] | None = None, force_subprocess: bool = False
) -> float:
    """Run one `distill` subcommand; returns its wall time in seconds. Raises on a non-zero exit."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    _say(f"{name}: distill {' '.join(args)}")
    if ctx.inprocess and not force_subprocess and not extra_env:
        from distill.cli import main

        code = main(list(args))
    else:
        log_dir = ctx.work / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{name}.log", "a", encoding="utf-8") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "distill.cli", *args],
                cwd=ROOT,
                env=_env(ctx.threads) | (extra_env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        code = proc.returncode
    dt = time.perf_counter() - t0
    _log_step(
        ctx,
        {"step": name, "seconds": round(dt, 1), "rc": code, "loadavg_before": load0, "loadavg_after": os.getloadavg()},
    )
    if code != 0:
        raise RuntimeError(f"{name}: distill {args[0]} exited with {code} (log: {ctx.work / 'logs' / name}.log)")
    _say(f"{name}: done in {dt:.0f}s")
    return dt


def _log_step(ctx: Ctx, entry: dict) -> None:
    """Append to the pipeline log (`<work>/pipeline_log.json`, kept across resumed invocations)."""
    ctx.log.append(entry)
    _write(ctx.work / "pipeline_log.json", json.dumps(ctx.log, indent=1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _val_args(ctx: Ctx, split: Path) -> list[str]:
    out = ["--val.retrieval", str(ctx.flickr), "--val.retrieval_split_file", str(split)]
    if ctx.scale.test_images:
        out += ["--val.max_images", str(ctx.scale.test_images)]
    return out


def _train_common(ctx: Ctx, root: Path, steps: int, batch: int, seed: int, val_every: int | None) -> list[str]:
    s = ctx.scale
    out = [
        "--data.batch_size",
        str(batch),
        "--data.num_workers",
        str(s.num_workers),
        "--data.rrc_scale_min",
        str(s.scale_min),
        "--optim.lr",
        str(s.lr),
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
        str(max(1, steps // 5)),
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


# --------------------------------------------------------------------------------------------------------- steps


def prepare_splits(ctx: Ctx) -> None:
    """Smoke scale: a split file with the first N train images (the data itself is read in place)."""
    if not ctx.scale.train_images:
        return
    names = [ln.strip() for ln in (ctx.flickr / "splits" / "train.txt").read_text().splitlines() if ln.strip()]
    _write(ctx.train_split, "\n".join(names[: ctx.scale.train_images]) + "\n")


def teacher_args(ctx: Ctx, which: str) -> list[str]:
    """`distill train` arguments of teacher A (CoCa: contrastive + caption loss, seed `seed`) or B (plain CLIP
    ViT, seed `seed + 1`); both validate on the dev split at the end."""
    s = ctx.scale
    arch, steps, seed, extra = {
        "A": ("tiny_coca", s.teacher_a_steps, ctx.seed, ["--context_length", str(s.teacher_a_context)]),
        "B": ("tiny_vit", s.teacher_b_steps, ctx.seed + 1, []),
    }[which]
    return [
        "train",
        "--student",
        arch,
        "--mode",
        "scratch",
        "--loss.preset",
        "contrastive",
        *_plain_data(ctx),
        *_train_common(ctx, ctx.teacher_dir(which), steps, s.teacher_batch, seed, None),
        *extra,
        *_val_args(ctx, ctx.dev_split),
    ]


def train_teachers(ctx: Ctx) -> None:
    for which in ("A", "B"):
        if not (ctx.teacher_dir(which) / "run.json").is_file():
            distill(ctx, teacher_args(ctx, which), name=f"teacher_{which}")


def build_args(ctx: Ctx, which: str) -> list[str]:
    """`distill build-data` arguments of the `real` (no captioner) or `syn` (captioner A) dataset; both share
    the seed, so their augmentation records and teacher image embeddings are identical."""
    s = ctx.scale
    args = [
        "build-data",
        "--out",
        str(ctx.data_dir(which)),
        "--input",
        str(ctx.flickr),
        "--split_file",
        str(ctx.train_split),
        "--teacher",
        ctx.ensemble,
        "--build.num_augs",
        str(s.num_augs),
        "--build.alt_captions",
        "true",
        "--build.scale_min",
        str(s.scale_min),
        "--build.seed",
        str(ctx.seed),
        "--build.shard_size",
        str(s.shard_size),
        "--build.num_workers",
        "1",
        "--build.progress",
        "false",
        "--build.device",
        "cpu",
    ]
    if which == "syn":
        return args + [
            "--captioner",
            f"local-dir:{ctx.teacher_dir('A') / 'student'}",
            "--build.num_syn",
            str(s.num_syn),
        ]
    return args + ["--build.num_syn", "0"]


def build_data(ctx: Ctx) -> None:
    """Reinforced datasets `real` and `syn` (see `build_args`)."""
    s = ctx.scale
    for which in ("real", "syn"):
        out = ctx.data_dir(which)
        if (_read_json(out / "progress.json") or {}).get("complete"):
            continue
        args = build_args(ctx, which)
        if s.build_ranks == 1:
            distill(ctx, args, name=f"build_{which}")
            continue
        # One process per rank (torchrun-style variables); each owns input shards index % world == rank.
        t0 = time.perf_counter()
        _say(f"build_{which}: {s.build_ranks} ranks: distill {' '.join(args)}")
        procs = []
        for rank in range(s.build_ranks):
            env = _env(ctx.threads) | {"RANK": str(rank), "WORLD_SIZE": str(s.build_ranks), "LOCAL_RANK": "0"}
            log_path = ctx.work / "logs" / f"build_{which}_rank{rank}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "distill.cli", *args],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        codes = [p.wait() for p in procs]
        dt = time.perf_counter() - t0
        _log_step(
            ctx, {"step": f"build_{which}", "seconds": round(dt, 1), "rc": codes, "loadavg_after": os.getloadavg()}
        )
        if any(codes):
            raise RuntimeError(f"build_{which}: ranks exited with {codes} (logs in {ctx.work / 'logs'})")
        _say(f"build_{which}: done in {dt:.0f}s")
        _write(out / "build_wall.json", json.dumps({"seconds": round(dt, 1), "ranks": s.build_ranks}))


def probe_args(ctx: Ctx, scale: float) -> list[str]:
    """A short reinforced KD run of the ViT student at one teacher logit scale, validated on the dev split."""
    s = ctx.scale
    root = ctx.work / "probe" / f"scale_{scale:g}"
    return [
        "train",
        "--student",
        "tiny_vit_s",
        "--mode",
        "reinforced",
        "--data.path",
        str(ctx.data_dir("real")),
        "--loss.preset",
        "mobileclip",
        "--loss.teacher_logit_scale",
        str(scale),
        *_train_common(ctx, root, s.probe_steps, s.batch_size, ctx.seed, None),
        *_val_args(ctx, ctx.dev_split),
    ]


def probe_kd_scale(ctx: Ctx) -> float:
    """Short KD runs of the ViT student on reinforced `real` data, one per candidate teacher logit scale; the best
    dev-split R@1 (mean of both directions) wins. Returns the chosen scale."""
    s = ctx.scale
    out_path = ctx.work / "probe" / "choice.json"
    choice = _read_json(out_path)
    if choice:
        return float(choice["scale"])
    results = {}
    for scale in s.probe_scales:
        root = ctx.work / "probe" / f"scale_{scale:g}"
        if not (root / "run.json").is_file():
            distill(ctx, probe_args(ctx, scale), name=f"probe_scale_{scale:g}")
        m = _read_json(root / "run.json")["metrics"]
        results[f"{scale:g}"] = {k.removeprefix("val/"): v for k, v in m.items()}
    best = max(results, key=lambda k: results[k]["t2i_R@1"] + results[k]["i2t_R@1"])
    teach = _read_json(ctx.data_dir("real") / "teach.json") or {}
    own = {t["name"]: t["logit_scale"] for t in teach.get("teachers", [])}
    _write(
        out_path,
        json.dumps(
            {"scale": float(best), "dev_metrics": results, "teachers_own_scales": own, "steps": s.probe_steps}, indent=1
        ),
    )
    return float(best)


def student_args(ctx: Ctx, student: str, row: str, kd_scale: float) -> list[str] | None:
    """`distill train` arguments of one (student, row), or None when the row does not apply."""
    s = ctx.scale
    root = ctx.work / "students" / student / row
    common = _train_common(ctx, root, s.student_steps, s.batch_size, ctx.seed, s.val_every) + _val_args(
        ctx, ctx.test_split
    )
    kd = ["--loss.preset", "mobileclip", "--loss.teacher_logit_scale", f"{kd_scale:g}"]
    teacher_b = f"local-dir:{ctx.teacher_dir('B') / 'student'}"
    base = ["train", "--student", student]
    if row == "scratch":
        return base + ["--mode", "scratch", "--loss.preset", "contrastive", *_plain_data(ctx), *common]
    if row == "kd_real":
        return base + ["--mode", "reinforced", "--data.path", str(ctx.data_dir("real")), *kd, *common]
    if row == "kd_syn":
        return base + ["--mode", "reinforced", "--data.path", str(ctx.data_dir("syn")), *kd, *common]
    if row == "kd_online":
        return base + ["--mode", "online", "--teacher", ctx.ensemble, *_plain_data(ctx), *kd, *common]
    tinyclip = [
        "--mode",
        "online",
        "--teacher",
        teacher_b,
        "--loss.preset",
        "tinyclip",
        "--inherit.source",
        str(ctx.teacher_dir("B") / "student"),
        "--inherit.mode",
        "manual",
    ]
    if row == "tinyclip":
        return base + [*tinyclip, *_plain_data(ctx), *common] if student == "tiny_vit_s" else None
    if row == "fd":
        if student == "tiny_vit_s":
            return base + [*tinyclip, "--loss.fd_weight", "2000", *_plain_data(ctx), *common]
        return base + [
            "--mode",
            "reinforced",
            "--data.path",
            str(ctx.data_dir("real")),
            *kd,
            "--loss.fd_weight",
            "2000",
            *common,
        ]
    raise KeyError(row)


def train_students(ctx: Ctx, kd_scale: float) -> None:
    # The cheaper ViT student first: an interrupted run then has one student's rows complete.
    for student in sorted(STUDENTS, key=lambda s: s != "tiny_vit_s"):
        if ctx.train_students is not None and student not in ctx.train_students:
            continue
        for row in ROWS:
            args = student_args(ctx, student, row.key, kd_scale)
            root = ctx.work / "students" / student / row.key
            if args is None or (root / "run.json").is_file():
                continue
            distill(ctx, args, name=f"{student}_{row.key}")


def _eval_args(ctx: Ctx) -> list[str]:
    out = [
        "--data.zeroshot",
        str(ctx.cifar),
        "--data.retrieval",
        str(ctx.flickr),
        "--data.retrieval_split_file",
        str(ctx.test_split),
        "--num_workers",
        "1",
        "--device",
        "cpu",
    ]
    if ctx.scale.test_images:
        out += ["--data.max_images", str(max(ctx.scale.test_images, 100))]
    return out


def evaluate_all(ctx: Ctx) -> None:
    """`distill eval` of every student row and of the teachers (A, B and the A+B ensemble)."""
    jobs: list[tuple[Path, list[str], str]] = []
    for which, spec in (
        ("A", f"local-dir:{ctx.teacher_dir('A') / 'student'}"),
        ("B", f"local-dir:{ctx.teacher_dir('B') / 'student'}"),
        ("AB", ctx.ensemble),
    ):
        jobs.append((ctx.work / "eval" / f"teacher_{which}.json", ["--teacher", spec], f"eval_teacher_{which}"))
    for student in STUDENTS:
        for row in ROWS:
            root = ctx.work / "students" / student / row.key
            if (root / "run.json").is_file():
                jobs.append((root / "eval.json", ["--student", str(root / "student")], f"eval_{student}_{row.key}"))
    for out, model, name in jobs:
        if not out.is_file():
            distill(ctx, ["eval", *model, *_eval_args(ctx), "--out", str(out)], name=name)


def export_and_bench(ctx: Ctx) -> None:
    """ExecuTorch export + latency per student architecture (every row of a student shares its architecture)."""
    if not ctx.export:
        return
    for student in STUDENTS:
        out = ctx.work / "export" / student
        if not (out / "manifest.json").is_file():
            ckpt = ctx.work / "students" / student / "scratch" / "student"
            distill(
                ctx,
                ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "executorch"],
                name=f"export_{student}",
                force_subprocess=True,
            )
        if not (out / "bench.jsonl").is_file():
            distill(
                ctx,
                [
                    "bench",
                    "--artifacts",
                    str(out),
                    "--args.threads",
                    str(ctx.threads),
                    "--args.iters",
                    str(ctx.scale.bench_iters),
                    "--args.rounds",
                    "3",
                ],
                name=f"bench_{student}",
                force_subprocess=True,
            )


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


def steps_to_reach(curve: list[tuple[int, float, float, float, float]], target: float) -> int | None:
    """First validated step whose t2i R@1 is >= target (None if never)."""
    return next((p[0] for p in curve if p[1] >= target), None)


def param_counts(student_dir: Path) -> dict[str, float]:
    import torch  # noqa: F401 - loads the students package's dependencies

    from students import load_student

    m = load_student(student_dir)

    def count(mod: Any) -> float:
        return round(sum(p.numel() for p in mod.parameters()) / 1e6, 3)

    out = {"total_M": count(m), "image_M": count(m.visual), "text_M": count(m.text)}
    emb = getattr(m.text, "token_embedding", None)
    if emb is not None:
        out["text_token_embedding_M"] = count(emb)
    return out


def latency(ctx: Ctx, student: str) -> dict[str, float] | None:
    path = ctx.work / "export" / student / "bench.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    out: dict[str, float] = {}
    for r in rows:
        out[f"{r['runtime']}/{r['tower']}_median_ms"] = r["median_ms"]
    return out


def collect(ctx: Ctx, kd_scale: float) -> dict:
    s = ctx.scale
    result: dict[str, Any] = {
        "scale": asdict(s),
        "seed": ctx.seed,
        "work": str(ctx.work),
        "kd_logit_scale": kd_scale,
        "probe": _read_json(ctx.work / "probe" / "choice.json"),
        "machine": machine(),
        "versions": versions(),
        "teachers": {},
        "rows": {},
        "curves": {},
        "steps_to_reach": {},
        "latency": {},
        "params": {},
        "build": {},
        "timing": {},
        "commands": {},
    }
    cmds = result["commands"]
    cmds.update({f"teacher_{w}": "distill " + " ".join(teacher_args(ctx, w)) for w in ("A", "B")})
    cmds.update({f"build_{w}": "distill " + " ".join(build_args(ctx, w)) for w in ("real", "syn")})
    cmds.update({f"probe_{c:g}": "distill " + " ".join(probe_args(ctx, c)) for c in s.probe_scales})
    cmds["eval (every row; teachers with --teacher local-dir:A|B|A,B)"] = (
        "distill eval --student <run>/student " + " ".join(_eval_args(ctx)) + " --out <run>/eval.json"
    )
    cmds["export + bench (per student)"] = (
        "distill export --checkpoint <student>/scratch/student --out <work>/export/<student> --format executorch && "
        f"distill bench --artifacts <work>/export/<student> --args.threads {ctx.threads} "
        f"--args.iters {s.bench_iters} --args.rounds 3"
    )
    for which in ("A", "B"):
        root = ctx.teacher_dir(which)
        run = _read_json(root / "run.json") or {}
        result["teachers"][which] = {
            "eval": _read_json(ctx.work / "eval" / f"teacher_{which}.json"),
            "steps": run.get("steps"),
            "fit_seconds": run.get("fit_seconds"),
            "step_seconds": step_seconds(root),
            "dev_metrics": run.get("metrics"),
            "params": param_counts(root / "student") if run else None,
            "student_cfg_name": (run.get("student_cfg") or {}).get("name"),
        }
    result["teachers"]["AB"] = {"eval": _read_json(ctx.work / "eval" / "teacher_AB.json")}
    for which in ("real", "syn"):
        d = ctx.data_dir(which)
        result["build"][which] = {
            "progress": _read_json(d / "progress.json"),
            "wall": _read_json(d / "build_wall.json"),
            "config": (_read_json(d / "config.json") or {}).get("build"),
        }
    for student in STUDENTS:
        result["rows"][student], result["curves"][student] = {}, {}
        for row in ROWS:
            root = ctx.work / "students" / student / row.key
            run = _read_json(root / "run.json")
            if run is None:
                continue
            ev = _read_json(root / "eval.json") or {}
            result["rows"][student][row.key] = {
                "eval": ev,
                "steps": run["steps"],
                "batch_size": s.batch_size,
                "mode": run["mode"],
                "fit_seconds": run["fit_seconds"],
                "wall_seconds": run.get("wall_seconds"),
                "step_seconds": step_seconds(root),
                "samples_per_second": run.get("samples_per_second"),
                "final_val": run.get("metrics"),
                "loss": run.get("loss"),
                "inheritance": run.get("inheritance"),
            }
            result["curves"][student][row.key] = val_curve(root)
            result["commands"][f"{student}/{row.key}"] = "distill " + " ".join(
                student_args(ctx, student, row.key, kd_scale) or []
            )
        if (ctx.work / "students" / student / "scratch" / "student").is_dir():
            result["params"][student] = param_counts(ctx.work / "students" / student / "scratch" / "student")
        result["latency"][student] = latency(ctx, student)
        rows = result["rows"][student]
        if "scratch" in rows and rows["scratch"]["eval"].get("t2i_R@1") is not None:
            target = rows["scratch"]["eval"]["t2i_R@1"]
            result["steps_to_reach"][student] = {
                "target_t2i_R@1": target,
                **{k: steps_to_reach(result["curves"][student][k], target) for k in rows},
            }
            sc = rows["scratch"]["step_seconds"]
            result["timing"][student] = {
                k: {
                    "step_seconds": v["step_seconds"],
                    "vs_scratch": round(v["step_seconds"] / sc, 3) if sc and v["step_seconds"] else None,
                }
                for k, v in rows.items()
            }
    result["pipeline_log"] = ctx.log
    return result


def machine() -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = (
            "Model name",
            "CPU(s)",
            "Thread(s) per core",
            "Core(s) per socket",
            "L2 cache",
            "L3 cache",
            "Hypervisor vendor",
        )
        info["lscpu"] = {
            k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lscpu.splitlines()) if k.strip() in keep
        }
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
    except ImportError:
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
        "numpy",
        "executorch",
        "webdataset",
        "jsonargparse",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_sha"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    return out


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    """The ablation table, teacher rows, timing and steps-to-reach as Markdown."""
    lines = [
        "| student | row | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | CIFAR-10 top-1 | "
        "params (M) | steps x batch | s/step | train wall (s) | ExecuTorch latency img+txt (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for which, label in (("A", "teacher A (CoCa)"), ("B", "teacher B (ViT)"), ("AB", "teacher ensemble A+B")):
        t = result["teachers"].get(which) or {}
        ev = t.get("eval") or {}
        p = (t.get("params") or {}).get("total_M")
        steps = f"{t['steps']} x {result['scale']['teacher_batch']}" if t.get("steps") else "-"
        lines.append(
            f"| {label} | - | {_f(ev.get('t2i_R@1'))} | {_f(ev.get('t2i_R@5'))} | {_f(ev.get('t2i_R@10'))} | "
            f"{_f(ev.get('i2t_R@1'))} | {_f(ev.get('i2t_R@5'))} | {_f(ev.get('i2t_R@10'))} | "
            f"{_f(ev.get('zeroshot_top1'))} | {_f(p, 2)} | {steps} | {_f(t.get('step_seconds'), 2)} | "
            f"{_f(t.get('fit_seconds'), 0)} | - |"
        )
    labels = {r.key: r.label for r in ROWS}
    for student, rows in result["rows"].items():
        lat = result["latency"].get(student) or {}
        et = [v for k, v in lat.items() if k.startswith("executorch")]
        lat_s = (
            " + ".join(
                f"{lat.get(f'{rt}/{t}_median_ms', 0):.2f}"
                for rt in {k.split("/")[0] for k in lat if k.startswith("executorch")}
                for t in ("image", "text")
            )
            if et
            else "n/a"
        )
        p = (result["params"].get(student) or {}).get("total_M")
        for key, r in rows.items():
            ev = r["eval"]
            lines.append(
                f"| {student} | {labels[key]} | {_f(ev.get('t2i_R@1'))} | {_f(ev.get('t2i_R@5'))} | "
                f"{_f(ev.get('t2i_R@10'))} | {_f(ev.get('i2t_R@1'))} | {_f(ev.get('i2t_R@5'))} | "
                f"{_f(ev.get('i2t_R@10'))} | {_f(ev.get('zeroshot_top1'))} | {_f(p, 2)} | "
                f"{r['steps']} x {r['batch_size']} | {_f(r['step_seconds'], 3)} | {_f(r['fit_seconds'], 0)} | "
                f"{lat_s} |"
            )
    lines += [
        "",
        "Steps to reach the scratch run's final test t2i R@1 (validated every "
        f"{result['scale']['val_every']} steps; '-' = not reached within the run):",
        "",
        "| student | target t2i R@1 | " + " | ".join(labels[r.key] for r in ROWS) + " |",
        "|---|---|" + "---|" * len(ROWS),
    ]
    for student, reach in result["steps_to_reach"].items():
        cells = [
            str(reach.get(r.key)) if reach.get(r.key) is not None else ("-" if r.key in reach else "n/a") for r in ROWS
        ]
        lines.append(f"| {student} | {_f(reach['target_t2i_R@1'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per training step (median over logging intervals) relative to scratch:",
        "",
        "| student | " + " | ".join(labels[r.key] for r in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for student, timing in result["timing"].items():
        cells = [
            f"{timing[r.key]['step_seconds']:.3f} s ({timing[r.key]['vs_scratch']:.2f}x)"
            if r.key in timing and timing[r.key]["vs_scratch"]
            else "n/a"
            for r in ROWS
        ]
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {r.key: r.label for r in ROWS}
    students = [s for s in result["curves"] if result["curves"][s]]
    n = max(1, len(students))
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n, 8.4), squeeze=False)
    styles = {
        "scratch": dict(color="black", lw=2.2),
        "tinyclip": dict(color="tab:red", lw=2.2),
        "kd_syn": dict(color="tab:blue", lw=2.2),
    }
    for col, student in enumerate(students):
        for row, (idx, metric) in enumerate(((1, "R@1"), (3, "R@10"))):
            ax = axes[row][col]
            for key, pts in result["curves"][student].items():
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[idx] for p in pts],
                        marker="o",
                        ms=3,
                        label=labels[key],
                        **styles.get(key, dict(lw=1.2, alpha=0.85)),
                    )
            final = ((result["rows"][student].get("scratch") or {}).get("eval") or {}).get(f"t2i_{metric}")
            if final is not None:
                ax.axhline(final, color="gray", ls="--", lw=1, label="scratch final")
            ax.set_title(f"{student} ({result['scale']['name']} scale, {result['scale']['image_size']} px)")
            ax.set_xlabel(f"training steps (batch {result['scale']['batch_size']})")
            ax.set_ylabel(f"Flickr8k test text->image {metric} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main


def run(argv: list[str] | None = None) -> dict:
    """Run (or resume) the pipeline and write the outputs; returns the result dict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "flickr8k", help="work directory (all outputs)")
    p.add_argument("--seed", type=int, default=0, help="teacher A / students / build seed (teacher B: seed + 1)")
    p.add_argument("--flickr", type=Path, default=SHARED / "flickr8k")
    p.add_argument("--cifar", type=Path, default=SHARED / "cifar10" / "test")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every step (default 1, see _env)")
    p.add_argument("--inprocess", action="store_true", help="call the CLI function in this process (faster start)")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip ExecuTorch export + latency")
    p.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="copy the JSON/table to benchmarks/out/ and the curves to docs/ (default: not for smoke)",
    )
    p.add_argument(
        "--train-students",
        nargs="+",
        choices=STUDENTS,
        default=None,
        help="train new rows only for these students (default: all); finished rows are always reported",
    )
    a = p.parse_args(argv)
    ctx = Ctx(
        SCALES[a.scale],
        a.work.resolve(),
        a.seed,
        a.flickr,
        a.cifar,
        a.threads,
        a.inprocess,
        a.export,
        train_students=tuple(a.train_students) if a.train_students else None,
    )
    if not (ctx.flickr / "captions.csv").is_file():
        raise SystemExit(f"flickr8k not found at {ctx.flickr} (--flickr)")
    if a.inprocess:
        import torch

        torch.set_num_threads(a.threads)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.log = _read_json(ctx.work / "pipeline_log.json") or []
    t0 = time.perf_counter()
    _say(f"flickr8k recipes, scale {a.scale}, work {ctx.work}")
    prepare_splits(ctx)
    train_teachers(ctx)
    build_data(ctx)
    kd_scale = probe_kd_scale(ctx)
    _say(f"KD logit scale: {kd_scale:g}")
    train_students(ctx, kd_scale)
    evaluate_all(ctx)
    export_and_bench(ctx)
    _log_step(ctx, {"step": "pipeline", "seconds": round(time.perf_counter() - t0, 1)})
    result = collect(ctx, kd_scale)
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
