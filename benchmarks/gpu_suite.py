"""One-command GPU suite: teacher embedding, `build-data` end to end, training throughput and `pytest -m gpu`.

Made for a short slot on a bare GPU machine (one H100/H200-class GPU, 16 cores, no network, Python 3.12 with
torch, timm, Lightning, transformers and onnxruntime but without open_clip, webdataset or jsonargparse):

1. installs the packages the machine lacks from the wheels in `<repo>/.whl/` (listed, with the download command,
   in `benchmarks/gpu_wheels.txt`) into a temporary folder, never over the machine's own packages;
2. runs each part in its own process with a hard deadline (killed with its children when it overruns) inside a
   total budget (default 360 s), so one hung or crashed part costs only its own figures;
3. writes one JSON (machine, GPU, versions, every figure, ratios, targets) and a table to `--out`
   (default: `$OUT` when set, else `benchmarks/out/gpu_suite-<time>/`), rewritten after every part.

Parts, in order:
- env: machine, GPU, driver, versions;
- pytest: `pytest -m gpu` over the test files that hold gpu-marked tests;
- embed: measured bf16 matmul peak; ViT-L/14 image tower (random weights) in the plain open_clip loop (autocast
  bf16, batch 256, in-device tensors) vs the calls `build-data` makes (teachers API on pinned uint8 views), and bf16
  weights as a reference; images/s and % of the measured peak;
- build: synthetic JPEG shards written on all cores, then the real `build_data` with a two-member ViT-L/14
  ensemble and K views per image: images/s, views/s, teacher forwards/s, % of peak;
- train_mobileclip2_s0, train_mobileclip_s0: batch 256, bf16: the plain open_clip AMP loop, `DistillModule` fed
  from memory, and `distill train --mode reinforced` on the shards of `build`; eager, channels-last + fused AdamW,
  and `torch.compile` (compiled variants last; each variant is skipped when too little of the part's time is left).

`--dry-run` runs the same parts on the CPU with tiny models and a few steps (the default test suite runs it).
Usage (on the GPU machine, from the repository root): `python3 benchmarks/gpu_suite.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WHEEL_DIR = ROOT / ".whl"
WHEEL_LIST = BENCH / "gpu_wheels.txt"
SITE = Path(tempfile.gettempdir()) / "mcd-gpu-site"
# Modules the project imports that the GPU machine's image lacks (their wheels are in gpu_wheels.txt).
CARRIED_MODULES = ("open_clip", "webdataset", "jsonargparse", "braceexpand", "ftfy", "docstring_parser")
VERSIONED = (
    "torch", "torchvision", "timm", "open_clip_torch", "pytorch-lightning", "transformers", "numpy", "pillow",
    "safetensors", "webdataset", "jsonargparse", "onnxruntime", "triton",
)  # fmt: skip

# Workload sizes. Real: the figures; dry: tiny models, a few steps, CPU.
SIZES = {
    "real": {
        "arch": "ViT-L-14", "embed_batch": 256, "embed_steps": 12, "embed_warmup": 3, "matmul_n": 8192,
        "images": 3072, "per_shard": 256, "jpeg_size": (384, 288), "num_augs": 4, "build_batch": 256,
        "students": ("mobileclip2_s0", "mobileclip_s0"), "train_batch": 256, "train_steps": 20, "train_warmup": 5,
        "variant_budget_s": 15.0, "compile_backend": "inductor", "budget_s": 360.0,
    },
    "dry": {
        "arch": "test-tiny-clip", "embed_batch": 8, "embed_steps": 2, "embed_warmup": 1, "matmul_n": 128,
        "images": 24, "per_shard": 12, "jpeg_size": (48, 40), "num_augs": 2, "build_batch": 8,
        "students": ("test_tiny", "test_tiny_mct"), "train_batch": 8, "train_steps": 2, "train_warmup": 1,
        "variant_budget_s": 5.0, "compile_backend": "eager", "budget_s": 1500.0,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Part:
    """One suite part: its hard deadline and the least time worth starting it with (seconds, real run)."""

    name: str
    max_s: float
    min_s: float


PARTS = (
    Part("env", 30, 5),
    Part("pytest", 75, 15),
    Part("embed", 70, 20),
    Part("build", 110, 40),
    Part("train_mobileclip2_s0", 200, 40),
    Part("train_mobileclip_s0", 90, 30),
)
DRY_SCALE = 8.0  # dry-run deadlines: a shared 2-core CI machine is slower than 16 idle cores for process starts


# ------------------------------------------------------------------------------------------------ bootstrap


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def bootstrap() -> dict:
    """Put the repository on the path and install the carried wheels of missing distributions into `SITE`.

    Wheels of distributions the machine already has are skipped, so the machine's own packages are never shadowed.
    Child processes get `PYTHONPATH=<repo>:<SITE>:...`.
    """
    missing = [m for m in CARRIED_MODULES if importlib.util.find_spec(m) is None]
    report: dict = {"missing_before": missing, "installed": [], "wheel_dir": str(WHEEL_DIR)}
    if missing:
        wheels = [w for w in sorted(WHEEL_DIR.glob("*.whl")) if not _installed(_dist_name(w))]
        report["installed"] = [w.name for w in wheels]
        if wheels:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            cmd += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            report["pip_returncode"] = proc.returncode
            if proc.returncode:
                report["pip_error"] = proc.stderr[-2000:]
    for path in (str(ROOT), str(SITE)):
        if path not in sys.path:
            sys.path.append(path) if path == str(SITE) else sys.path.insert(0, path)
    parts = [str(ROOT), str(SITE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    importlib.invalidate_caches()
    report["missing_after"] = [m for m in CARRIED_MODULES if importlib.util.find_spec(m) is None]
    lines = [ln.strip() for ln in WHEEL_LIST.read_text().splitlines()]
    listed = [ln.split("==")[0] for ln in lines if "==" in ln and not ln.startswith("#")]
    have = {_dist_name(w) for w in WHEEL_DIR.glob("*.whl")}
    report["listed_wheels_absent"] = [n for n in listed if n.lower().replace("_", "-") not in have]
    return report


# ------------------------------------------------------------------------------------------- part machinery


class _Record:
    """A part's results, rewritten to its JSON file after every measurement (a killed part keeps what it had)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def put(self, key: str, value: object) -> None:
        self.data[key] = value
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclass
class _Ctx:
    """What a part process gets: work folder, absolute deadline, sizes, device and its record."""

    work: Path
    deadline: float
    dry: bool
    sizes: dict
    rec: _Record

    @property
    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self):  # noqa: ANN201 - torch.device (torch is imported inside parts only)
        import torch

        return torch.device("cuda" if torch.cuda.is_available() and not self.dry else "cpu")


def _run_part(part: Part, timeout: float, work: Path, dry: bool) -> dict:
    """Run one part in its own process group; kill the group at `timeout`."""
    out_json, log = work / f"part-{part.name}.json", work / f"part-{part.name}.log"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--work", str(work)]
    cmd += ["--deadline", str(time.time() + timeout - 2)] + (["--dry-run"] if dry else [])
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "error"
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=5)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    res: dict = {"status": status, "seconds": round(time.time() - t0, 1), "timeout_s": round(timeout, 1)}
    if status != "ok":
        res["returncode"] = proc.returncode
        res["log_tail"] = log.read_text(errors="replace")[-3000:]
    res["results"] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    return res


# ------------------------------------------------------------------------------------------------- parts


def part_env(ctx: _Ctx) -> None:
    """Machine, GPU and versions."""
    import torch

    from mcd_common.files import git_sha

    ctx.rec.put("python", platform.python_version())
    ctx.rec.put("platform", platform.platform())
    ctx.rec.put("cpu_count", os.cpu_count())
    versions = {}
    for dist in VERSIONED:
        versions[dist] = md.version(dist) if _installed(dist) else "missing"
    ctx.rec.put("versions", versions)
    ctx.rec.put("cuda", torch.version.cuda)
    ctx.rec.put("git_sha", git_sha(ROOT))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        gpu["multiprocessors"] = p.multi_processor_count
        gpu["cudnn"] = torch.backends.cudnn.version()
        ctx.rec.put("gpu", gpu)
    try:
        q = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=15
        )
        ctx.rec.put("nvidia_smi", smi.stdout.strip())
    except (OSError, subprocess.SubprocessError) as err:
        ctx.rec.put("nvidia_smi", f"unavailable: {err}")


def part_pytest(ctx: _Ctx) -> None:
    """`pytest -m gpu` over the test files holding gpu-marked tests (others would only add collection time)."""
    files = sorted(str(p) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    ctx.rec.put("files", [str(Path(f).relative_to(ROOT)) for f in files])
    junit = ctx.work / "gpu-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:randomly"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={junit}", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left - 3))
    ctx.rec.put("returncode", proc.returncode)
    ctx.rec.put("summary", (proc.stdout.strip().splitlines() or [""])[-1])
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        ctx.rec.put("counts", counts)
    if proc.returncode not in (0, 5):
        ctx.rec.put("output_tail", proc.stdout[-3000:] + proc.stderr[-1500:])


def _bench(name: str):  # noqa: ANN202 - a module from benchmarks/
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _register_tiny_configs(dry: bool) -> None:
    # The dry run's tiny open_clip architecture ships with `teachers` (package data), not with open_clip.
    if dry:
        import open_clip

        import teachers

        open_clip.add_model_config(Path(teachers.__file__).parent / "configs")


def _teacher_file(ctx: _Ctx, tag: str, seed: int) -> Path:
    bd = _bench("build_data")
    return bd.random_open_clip_weights(ctx.sizes["arch"], ctx.work / f"teacher_{tag}.safetensors", seed, ctx.device)


def part_embed(ctx: _Ctx) -> None:
    """bf16 matmul peak, then the ViT-L/14 image tower: plain open_clip loop vs the build-data calls."""
    bd, s, device = _bench("build_data"), ctx.sizes, ctx.device
    _register_tiny_configs(ctx.dry)
    ctx.rec.put("matmul_peak", bd.matmul_peak(device, s["matmul_n"], 20 if not ctx.dry else 3))
    weights = _teacher_file(ctx, "a", 1)
    args = (s["embed_batch"], s["embed_steps"], s["embed_warmup"], device)
    ctx.rec.put("plain_autocast_bf16", bd.embed_plain(s["arch"], weights, *args))
    ctx.rec.put("build_data_path", bd.embed_teacher_path(f"open_clip:{s['arch']}@{weights}", *args))
    ctx.rec.put("plain_bf16_weights", bd.embed_plain(s["arch"], weights, *args, bf16_weights=True))


def part_build(ctx: _Ctx) -> None:
    """Synthetic JPEG shards on every core, then the real `build_data` with a two-member ensemble."""
    from reinforced_data import BuildArgs, build_data

    bd, s = _bench("build_data"), ctx.sizes
    _register_tiny_configs(ctx.dry)
    cores = os.cpu_count() or 1
    ctx.rec.put("shards", bd.write_jpeg_shards(ctx.work / "jpeg", s["images"], s["per_shard"], s["jpeg_size"], cores))
    a, b = _teacher_file(ctx, "a", 1), _teacher_file(ctx, "b", 2)
    workers = 1 if ctx.dry else max(1, cores - 2)
    args = BuildArgs(
        num_augs=s["num_augs"], num_syn=0, batch_size=s["build_batch"], num_workers=workers, progress=False
    )
    spec = f"open_clip:{s['arch']}@{a},open_clip:{s['arch']}@{b}"
    summary = build_data(out=ctx.work / "ds", input=str(ctx.work / "jpeg"), teacher=spec, build=args)
    keep = ("written", "skipped", "images_per_s", "views_per_s", "wall_time_s", "device", "teachers")
    ctx.rec.put("build_data", {**{k: summary.get(k) for k in keep}, "num_augs": s["num_augs"], "workers": workers})


def _train_variants(ctx: _Ctx, primary: bool) -> list[tuple[str, dict]]:
    """(loop, StepCfg overrides) in the order they run, most wanted first, since late ones may not fit.

    The primary student (MobileCLIP2-S0, the issue's targets) gets every variant: the plain loop's eager and fast
    anchors (comparable with ENV.md's H100 figures), then the compiled module and pipeline (the 1,800 samples/s
    and within-10 % targets), then the rest. The second student gets the fast and compiled ones.
    """
    gpu = ctx.device.type == "cuda"
    fast = {"channels_last": True, "fused": gpu}
    compiled = {**fast, "compile": True}
    if primary:
        variants = [
            ("plain", {}),
            ("plain", fast),
            ("memory", fast),
            ("memory", compiled),
            ("pipeline", compiled),
            ("pipeline", fast),
            ("memory_nosyn", fast),
            ("plain", compiled),
        ]
    else:
        variants = [("plain", fast), ("memory", fast), ("pipeline", fast), ("memory", compiled), ("pipeline", compiled)]
    if not gpu:
        # `distill train --trainer.compile` uses inductor: minutes of C++ code generation on a CPU. The dry run
        # proves the second student's model paths (MCt) with its first two variants only.
        variants = [v for v in variants if v != ("pipeline", compiled)]
        variants = variants if primary else variants[:2]
    return variants


def _estimate_s(loop: str, cfg: dict, dry: bool) -> float:
    est = {"plain": 15.0, "memory": 20.0, "memory_nosyn": 20.0, "pipeline": 45.0}[loop]
    est += 75.0 if cfg.get("compile") else 0.0
    return est / 10 if dry else est


def _train_part(ctx: _Ctx, student: str) -> None:
    """Every training variant of one student that fits in the part's time."""
    tt, s = _bench("train_throughput"), ctx.sizes
    gpu = ctx.device.type == "cuda"
    data = ctx.work / "ds"
    workers = 1 if ctx.dry else max(1, min(12, (os.cpu_count() or 1) - 2))
    for loop, overrides in _train_variants(ctx, primary=student == ctx.sizes["students"][0]):
        cfg = tt.StepCfg(
            student=student,
            batch_size=s["train_batch"],
            steps=s["train_steps"],
            warmup=s["train_warmup"],
            device=str(ctx.device),
            bf16=gpu,
            compile_backend=s["compile_backend"],
            budget_s=s["variant_budget_s"],
            **overrides,
        )
        key = f"{loop}:{cfg.label()}"
        if ctx.left < _estimate_s(loop, overrides, ctx.dry):
            ctx.rec.put(key, {"skipped": f"{ctx.left:.0f} s left in the part"})
            continue
        t0 = time.time()
        try:
            if loop == "plain":
                res = tt.plain_loop(cfg)
            elif loop.startswith("memory"):
                res = tt.memory_module(cfg, syn=loop == "memory")
            elif not (data / "manifest.jsonl").is_file():
                res = {"skipped": "no dataset from the build part"}
            else:
                root = ctx.work / f"run-{student}-{cfg.label()}"
                res = tt.reinforced_train(cfg, data, root, workers, timeout_s=max(10.0, ctx.left - 3))
        except Exception as err:  # noqa: BLE001 - one variant's failure (OOM, compile error) must not end the part
            res = {"error": f"{type(err).__name__}: {str(err)[-1500:]}"}
        res["wall_s"] = round(time.time() - t0, 1)
        ctx.rec.put(key, res)


PART_FUNCS: dict[str, Callable[[_Ctx], None]] = {
    "env": part_env,
    "pytest": part_pytest,
    "embed": part_embed,
    "build": part_build,
    "train_mobileclip2_s0": lambda ctx: _train_part(ctx, ctx.sizes["students"][0]),
    "train_mobileclip_s0": lambda ctx: _train_part(ctx, ctx.sizes["students"][1]),
}


# -------------------------------------------------------------------------------------------------- summary


def _get(d: dict, *keys: str) -> object:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _pct(rate: float | None, gflop: float | None, peak_tflops: float | None) -> float | None:
    if not (rate and gflop and peak_tflops):
        return None
    return round(100 * rate * gflop / (peak_tflops * 1e3), 1)


def summarize(parts: dict, sizes: dict) -> dict:
    """Flat figures, ratios and the issue's targets from the parts' results."""
    embed, build = _get(parts, "embed", "results") or {}, _get(parts, "build", "results") or {}
    peak = _get(embed, "matmul_peak", "tflops")
    gflop = _get(embed, "plain_autocast_bf16", "gflop_per_image")
    figs: dict = {"matmul_peak_tflops": peak, "teacher_gflop_per_image": gflop}
    for key in ("plain_autocast_bf16", "build_data_path", "plain_bf16_weights"):
        rate = _get(embed, key, "images_per_s")
        figs[f"embed.{key}.images_per_s"] = rate
        figs[f"embed.{key}.pct_peak"] = _pct(rate, gflop, peak)
    views, members = _get(build, "build_data", "views_per_s"), len(_get(build, "build_data", "teachers") or [])
    forwards = views * members if views else None
    figs["build.images_per_s"] = _get(build, "build_data", "images_per_s")
    figs["build.views_per_s"] = views
    figs["build.teacher_forwards_per_s"] = forwards
    figs["build.pct_peak"] = _pct(forwards, gflop, peak)
    ratios: dict = {}
    plain = figs["embed.plain_autocast_bf16.images_per_s"]
    if plain:
        for key in ("build_data_path", "plain_bf16_weights"):
            if figs[f"embed.{key}.images_per_s"]:
                ratios[f"embed.{key}_vs_plain"] = round(figs[f"embed.{key}.images_per_s"] / plain, 3)
        if forwards:
            ratios["build.end_to_end_forwards_vs_plain"] = round(forwards / plain, 3)
    for name in parts:
        if name.startswith("train_"):
            _train_figures(name, _get(parts, name, "results") or {}, figs, ratios)
    return {"figures": figs, "ratios": ratios, "targets": _targets(figs, ratios, sizes)}


def _train_figures(part: str, res: dict, figs: dict, ratios: dict) -> None:
    rates = {k: v.get("samples_per_s") for k, v in res.items() if isinstance(v, dict) and v.get("samples_per_s")}
    for key, rate in rates.items():
        figs[f"{part}.{key}.samples_per_s"] = rate
    for key, rate in rates.items():
        loop, variant = key.split(":", 1)
        plain, memory = rates.get(f"plain:{variant}"), rates.get(f"memory:{variant}")
        if loop.startswith("memory") and plain:
            ratios[f"{part}.{key}_vs_plain"] = round(rate / plain, 3)
        if loop == "pipeline" and memory:
            ratios[f"{part}.{key}_vs_memory"] = round(rate / memory, 3)


def _targets(figs: dict, ratios: dict, sizes: dict) -> dict:
    first = "train_mobileclip2_s0"  # the training targets are for MobileCLIP2-S0
    best_train = max(
        (v for k, v in figs.items() if k.startswith(first) and (".memory:" in k or ".pipeline:" in k) and v),
        default=None,
    )
    pipe = [v for k, v in ratios.items() if k.startswith(first) and ".pipeline:" in k]
    forwards = figs.get("build.teacher_forwards_per_s")
    return {
        "build_data_3000_vit_l14_images_per_s": None if forwards is None else forwards >= 3000,
        "build_data_60_pct_of_peak": None if figs.get("build.pct_peak") is None else figs["build.pct_peak"] >= 60,
        "train_1800_samples_per_s": None if best_train is None else best_train >= 1800,
        "pipeline_within_10_pct_of_memory": None if not pipe else min(pipe) >= 0.9,
    }


def format_table(record: dict) -> str:
    """The printed table: every figure, then ratios, targets and part statuses."""
    gpu = _get(record, "parts", "env", "results", "gpu", "name") or "no GPU"
    lines = [f"gpu_suite on {gpu} ({'dry run' if record['dry_run'] else 'real run'}), {record['seconds']} s"]
    lines.append(f"{'figure':64s} {'value':>12s}")
    for key, value in record["figures"].items():
        lines.append(f"{key:64s} {'-' if value is None else value:>12}")
    for key, value in record["ratios"].items():
        lines.append(f"{key:64s} {value:>11}x")
    for key, value in record["targets"].items():
        lines.append(f"target {key:57s} {'n/a' if value is None else ('met' if value else 'MISSED'):>12}")
    for name, part in record["parts"].items():
        lines.append(f"part {name:59s} {part['status']:>12} ({part.get('seconds', 0)} s)")
    pytest_counts = _get(record, "parts", "pytest", "results", "counts")
    if pytest_counts:
        lines.append(f"pytest -m gpu: {pytest_counts}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def _out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return BENCH / "out" / f"gpu_suite-{time.strftime('%Y%m%d-%H%M%S')}"


def _write(out: Path, record: dict, logs: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {"gpu_suite.json": json.dumps(record, indent=1, default=str), "gpu_suite.txt": format_table(record)}
    if logs is not None:
        files["gpu_suite.log"] = logs
    for name, text in files.items():
        tmp = out / f"{name}.tmp-{os.getpid()}"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def run_suite(out: Path, dry: bool, budget_s: float | None, only: list[str] | None, work: Path | None) -> dict:
    """Bootstrap, run the parts within the budget, write and return the record."""
    t0 = time.time()
    sizes = SIZES["dry" if dry else "real"]
    budget = budget_s or sizes["budget_s"]
    work = work or Path(tempfile.mkdtemp(prefix="mcd-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    )
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))  # shared by every part and child
    record: dict = {"suite": "gpu_suite", "dry_run": dry, "budget_s": budget, "work": str(work), "out": str(out)}
    record["bootstrap"] = bootstrap()
    record["parts"] = {}
    parts = [p for p in PARTS if not only or p.name in only]
    scale = DRY_SCALE if dry else 1.0
    for i, part in enumerate(parts):
        reserve = sum(p.min_s * scale for p in parts[i + 1 :])
        timeout = min(part.max_s * scale, budget - (time.time() - t0) - reserve)
        if timeout < part.min_s * scale:
            record["parts"][part.name] = {"status": "skipped", "reason": f"{timeout:.0f} s left in the budget"}
            continue
        record["parts"][part.name] = _run_part(part, timeout, work, dry)
        record.update(summarize(record["parts"], sizes), seconds=round(time.time() - t0, 1))
        _write(out, record)
    record.update(summarize(record["parts"], sizes), seconds=round(time.time() - t0, 1))
    logs = [
        f"===== {p.name}\n" + (work / f"part-{p.name}.log").read_text(errors="replace")[-20000:]
        for p in parts
        if (work / f"part-{p.name}.log").is_file()
    ]
    _write(out, record, "\n".join(logs))
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every part that ran finished (figures may still miss their targets)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: $OUT, else benchmarks/out/gpu_suite-<time>)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few steps")
    p.add_argument("--budget_s", type=float, help="total time budget (default 360 s; dry run 1500 s)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(x.name for x in PARTS)}")
    p.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        sizes = SIZES["dry" if args.dry_run else "real"]
        work = Path(args.work)
        ctx = _Ctx(work, args.deadline, args.dry_run, sizes, _Record(work / f"part-{args.part}.json"))
        PART_FUNCS[args.part](ctx)
        return 0
    only = args.parts.split(",") if args.parts else None
    record = run_suite(_out_dir(args.out), args.dry_run, args.budget_s, only, Path(args.work) if args.work else None)
    print(format_table(record))
    print(f"-> {record['out']}/gpu_suite.json")
    return 0 if all(part["status"] in ("ok", "skipped") for part in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
