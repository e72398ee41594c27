"""``distill bench``: latency of exported towers with the ExecuTorch runtime (and CoreML on macOS) vs eager PyTorch.

Protocol (timm ``InferenceBenchmarkRunner`` style; MobileCLIP reports image and text towers separately):
batch 1, a fixed thread count for both runtimes, ``warmup`` untimed runs, then ``iters`` timed runs per model;
median, p90, mean, min and std in ms. With ``rounds > 1`` every model is timed once per round, in turn, so slow
drifts of a shared machine hit all models alike; the per-round medians are reported as the spread.
Eager PyTorch runs the same student (loaded from the manifest's checkpoint) on the same CPU in the same process:
``pytorch-eager`` is the folded wrapper that was exported, ``pytorch-student`` the student's own forward.

Output: one JSON line per (model, runtime) appended to ``bench.jsonl`` (device, runtime, thread count, versions,
git SHA, params, MACs, file size, statistics), a readable table, and optionally an accuracy-vs-latency PNG across
students from a ``{student: metric}`` JSON.

References: timm ``benchmark.py`` (``InferenceBenchmarkRunner``); MobileCLIP README latency protocol.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export import bundle

_logger = logging.getLogger(__name__)

__all__ = ["BenchArgs", "bench", "cpu_label", "format_table", "plot_accuracy_latency", "time_fn"]


@dataclass
class BenchArgs:
    """Options of ``distill bench`` (flags ``--args.<name>``)."""

    iters: int = 50
    """Timed runs per model (use >= 50 for reported numbers)."""
    warmup: int = 10
    """Untimed runs before timing each model."""
    threads: int = 2
    """CPU threads for both ExecuTorch (its threadpool) and eager PyTorch (torch.set_num_threads)."""
    rounds: int = 1
    """Time every model this many times, interleaved; the spread of the per-round medians is reported."""
    eager: bool = True
    """Also time eager PyTorch on the same student (needs the checkpoint)."""
    checkpoint: Path | None = None
    """Student for the eager comparison; default: the checkpoint recorded in manifest.json."""
    coreml: bool = True
    """Time .mlpackage files with compute units ALL and CPU_ONLY (macOS only; skipped with a message elsewhere)."""
    output: Path | None = None
    """JSON-lines file to append results to; default: <artifacts>/bench.jsonl."""
    accuracy: Path | None = None
    """JSON mapping student -> accuracy metric; with it, an accuracy-vs-latency PNG is drawn."""
    results: list[Path] | None = None
    """More bench.jsonl files (other students) to include in the plot."""
    plot: Path | None = None
    """PNG path of the plot; default: <artifacts>/accuracy_latency.png."""

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"--args.iters must be >= 1, got {self.iters}")
        if self.warmup < 0:
            raise ValueError(f"--args.warmup must be >= 0, got {self.warmup}")
        if self.threads < 1:
            raise ValueError(f"--args.threads must be >= 1, got {self.threads}")
        if self.rounds < 1:
            raise ValueError(f"--args.rounds must be >= 1, got {self.rounds}")
        if self.accuracy is not None and not Path(self.accuracy).is_file():
            raise ValueError(f"--args.accuracy: {self.accuracy} is not a file")


def cpu_label() -> str:
    """``<cpu model> (<n> cores)`` from /proc/cpuinfo, sysctl or ``platform``."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not name and sys.platform == "darwin":
        import subprocess

        res = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False)
        name = res.stdout.strip()
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def time_fn(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Run ``fn`` ``warmup`` times, then time ``iters`` runs; returns milliseconds per run."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    p90 = s[min(len(s) - 1, max(0, round(0.9 * (len(s) - 1))))]
    return {
        "median_ms": round(statistics.median(s), 3),
        "p90_ms": round(p90, 3),
        "mean_ms": round(statistics.fmean(s), 3),
        "min_ms": round(s[0], 3),
        "std_ms": round(statistics.pstdev(s), 3),
    }


def _example(tower: str, manifest: dict[str, Any]) -> torch.Tensor:
    from export.prepare import example_inputs

    model = manifest["model"]
    image, tokens = example_inputs(model["image_size"], model["context_length"], manifest["tokenizer"]["vocab_size"])
    return image if tower == "image" else tokens


def _candidates(artifacts: Path, manifest: dict[str, Any], args: BenchArgs) -> list[dict[str, Any]]:
    """One entry per thing to time: label, runtime, tower, callable factory, metadata."""
    from export.executorch import load_pte

    out: list[dict[str, Any]] = []
    towers = manifest["model"].get("towers", {})
    for art in manifest["artifacts"]:
        path = artifacts / art["file"]
        base = {
            "tower": art["tower"],
            "file": art["file"],
            "file_size": art["file_size"],
            "precision": art["precision"],
            **towers.get(art["tower"], {}),
        }
        if art["format"] == "executorch":
            if art["checked_with"] != "executorch.runtime":
                _logger.info("skip %s: %s", art["file"], art["checked_with"])
                continue
            x = _example(art["tower"], manifest)

            def make(path: Path = path, x: torch.Tensor = x) -> Callable[[], Any]:
                method = load_pte(path)
                return lambda: method.execute([x])

            out.append(base | {"runtime": f"executorch-{art['backend']}", "make": make})
        elif art["format"] == "coreml" and args.coreml and sys.platform == "darwin":
            for units in ("ALL", "CPU_ONLY"):
                out.append(base | {"runtime": f"coreml-{units}", "make": _coreml_factory(path, art["tower"], units)})
    return out


def _coreml_factory(path: Path, tower: str, units: str) -> Callable[[], Callable[[], Any]]:
    def make() -> Callable[[], Any]:
        import coremltools as ct
        import numpy as np
        from PIL import Image

        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
        spec_in = model.get_spec().description.input[0]
        if tower == "image":
            size = spec_in.type.imageType.width
            feed = {"image": Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8), mode="RGB")}
        else:
            feed = {"text": np.zeros([int(d) for d in spec_in.type.multiArrayType.shape], dtype=np.int32)}
        return lambda: model.predict(feed)

    return make


def _eager_candidates(manifest: dict[str, Any], args: BenchArgs) -> list[dict[str, Any]]:
    import students
    from export.prepare import prepare_towers

    ckpt = Path(args.checkpoint or manifest["model"]["checkpoint"])
    if not ckpt.exists():
        _logger.warning("eager comparison skipped: checkpoint %s not found (--args.checkpoint)", ckpt)
        return []
    student = students.load_student(ckpt).eval()
    encoders = dict(zip(("image", "text"), prepare_towers(student, backend="eager"), strict=True))
    towers = manifest["model"].get("towers", {})
    out = []
    for tower, enc in encoders.items():
        x = _example(tower, manifest)
        own = (
            (lambda x=x: student.encode_image(student.normalize(x)))
            if tower == "image"
            else (lambda x=x: student.encode_text(x.long()))
        )
        base = {"tower": tower, "file": "", "file_size": None, "precision": "fp32", **towers.get(tower, {})}
        out.append(base | {"runtime": "pytorch-eager", "make": lambda enc=enc, x=x: lambda: enc(x)})
        out.append(base | {"runtime": "pytorch-student", "make": lambda own=own: own})
    return out


def bench(artifacts: Path, args: BenchArgs = BenchArgs()) -> dict:  # noqa: B008 - jsonargparse dataclass group
    """Time the exported towers in ``artifacts`` (a directory written by ``distill export``).

    Args:
        artifacts: The export output directory (with ``manifest.json``).
        args: Benchmark options (`BenchArgs`).

    Returns:
        ``{"results": [one dict per model and runtime], "table": str, "jsonl": path, "plot": path | None,
        "notes": [...]}``.
    """
    from export.executorch import set_executorch_threads

    artifacts = Path(artifacts)
    manifest = bundle.read_manifest(artifacts)
    notes: list[str] = []
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    set_executorch_threads(args.threads)
    try:
        cands = _candidates(artifacts, manifest, args)
        if any(a["format"] == "coreml" for a in manifest["artifacts"]) and not (
            args.coreml and sys.platform == "darwin"
        ):
            notes.append("CoreML timing needs macOS: .mlpackage files were not timed here")
        if args.eager:
            cands += _eager_candidates(manifest, args)
        runners = [c["make"]() for c in cands]
        samples: list[list[float]] = [[] for _ in cands]
        rounds: list[list[float]] = [[] for _ in cands]
        with torch.inference_mode():
            for _ in range(args.rounds):
                for i, fn in enumerate(runners):
                    ms = time_fn(fn, args.iters, args.warmup)
                    samples[i] += ms
                    rounds[i].append(round(statistics.median(ms), 3))
    finally:
        torch.set_num_threads(torch_threads)

    common = {
        "time": bundle.utc_now(),
        "student": manifest["model"]["name"],
        "device": cpu_label(),
        "platform": f"{platform.system()} {platform.machine()}",
        "threads": args.threads,
        "batch": 1,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "torch": bundle.versions()["torch"],
        "executorch": bundle.versions()["executorch"],
        "git_sha": bundle.git_sha(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    cores = os.cpu_count() or 1
    if common["load_avg_1m"] is not None and common["load_avg_1m"] > 0.5 * cores:
        notes.append(
            f"the machine is busy (load {common['load_avg_1m']} on {cores} cores): timings are noisy, and eager "
            "PyTorch with >1 thread loses much more than ExecuTorch to OpenMP spin-waits (OMP_WAIT_POLICY=PASSIVE "
            "helps); rerun on a quiet machine for numbers to report"
        )
    results = []
    for c, ms, per_round in zip(cands, samples, rounds, strict=True):
        row = {k: v for k, v in c.items() if k != "make"}
        results.append(common | row | _stats(ms) | {"round_medians_ms": per_round})
    out_path = Path(args.output) if args.output is not None else artifacts / "bench.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: append-only by design (one line per run, history kept); each line is one write() call
    with open(out_path, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    table = format_table(results)
    _logger.debug("latency (%s, %d threads):\n%s", common["device"], args.threads, table)
    for n in notes:
        _logger.info(n)
    plot = None
    if args.accuracy is not None:
        rows = list(results)
        for extra in args.results or []:
            rows += [json.loads(ln) for ln in Path(extra).read_text().splitlines() if ln.strip()]
        plot = plot_accuracy_latency(
            rows, json.loads(Path(args.accuracy).read_text()), args.plot or artifacts / "accuracy_latency.png"
        )
    # "_table" is what `distill bench` prints (distill.cli shows it instead of the JSON dump)
    return {"results": results, "table": table, "_table": table, "jsonl": str(out_path), "plot": plot, "notes": notes}


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of bench results."""
    header = ("tower", "runtime", "precision", "median ms", "p90 ms", "min ms", "params M", "GMACs", "file MB")
    rows = []
    for r in results:
        rows.append(
            (
                r["tower"],
                r["runtime"],
                r.get("precision", ""),
                f"{r['median_ms']:.2f}",
                f"{r['p90_ms']:.2f}",
                f"{r['min_ms']:.2f}",
                f"{r['params'] / 1e6:.2f}" if r.get("params") else "",
                f"{r['macs'] / 1e9:.3f}" if r.get("macs") else "",
                f"{r['file_size'] / 1e6:.1f}" if r.get("file_size") else "",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    return "\n".join(lines)


def plot_accuracy_latency(
    results: list[dict[str, Any]],
    accuracy: dict[str, float],
    path: Path,
    runtime: str = "executorch-xnnpack",
    precision: str = "fp32",
) -> str | None:
    """Scatter accuracy vs image+text median latency per student; written atomically as PNG (matplotlib Agg).

    Returns:
        The PNG path, or None when no student has both an accuracy and latencies for ``runtime``/``precision``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency: dict[str, dict[str, float]] = {}
    for r in results:
        if r.get("runtime") == runtime and r.get("precision") == precision:
            latency.setdefault(r["student"], {})[r["tower"]] = r["median_ms"]
    points = [(s, sum(t.values()), accuracy[s]) for s, t in latency.items() if s in accuracy and len(t) == 2]
    if not points:
        _logger.warning("no student has both an accuracy and %s %s latencies: no plot", runtime, precision)
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, ms, acc in points:
        ax.scatter(ms, acc)
        ax.annotate(name, (ms, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"image + text latency, median ms ({runtime} {precision}, batch 1)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)
