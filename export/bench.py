"""``distill bench``: latency of every exported artifact next to eager PyTorch, at batch 1 and batch N.

The artifacts are ExecuTorch, ONNX Runtime, CoreML (on macOS) and Hugging Face models, timed at one thread count.

Protocol (timm ``InferenceBenchmarkRunner`` style; MobileCLIP reports image and text towers separately):
a fixed thread count for every runtime (torch, the ExecuTorch threadpool, ONNX Runtime's intra-op pool),
``warmup`` untimed runs, then ``iters`` timed runs per model and batch size; median, p90, mean, min and std in ms.
Batch N runs in one call where the artifact has a batch axis (eager PyTorch, dynamic-batch ONNX, Hugging Face) and
as N batch-1 calls where it is fixed at 1 (``.pte``, static ONNX, CoreML); ``batch_mode`` says which. With
``rounds > 1`` every model is timed once per round, in turn, so slow drifts of a shared machine hit all models
alike; the per-round medians are reported as the spread. Each model also reports its peak resident memory while
it loads and runs (Linux ``VmHWM``, reset per model), its file size, and its parity (cosine and max abs against the
eager wrapper on the same input).

Output: one JSON line per (model, runtime, batch) appended to ``bench.jsonl`` (run label, device, threads,
versions, git SHA, params, MACs, file size, statistics), a table, and optionally an accuracy-vs-latency PNG
whose points are runs (a distilled and a scratch student of one architecture are two points).

References: timm ``benchmark.py`` (``InferenceBenchmarkRunner``); MobileCLIP README latency protocol.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from export import bundle
from export._report import parity
from export.executorch import PteRunner, set_executorch_threads
from export.onnx import OnnxRunner
from export.prepare import example_inputs, prepare_towers
from mcd_common import UsageError
from mcd_common.files import atomic_path, git_sha

_logger = logging.getLogger(__name__)

__all__ = [
    "DEPRECATED_FLAGS",
    "BenchOptions",
    "accuracy_latency_points",
    "bench",
    "cpu_label",
    "format_table",
    "plot_accuracy_latency",
    "time_fn",
]

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BenchOptions:
    """The validated options of one bench run (see `bench`)."""

    iters: int
    warmup: int
    threads: int
    batch: int
    rounds: int
    eager: bool
    checkpoint: Path | None
    coreml: bool
    output: Path | None
    run: str | None
    accuracy: Path | None
    results: tuple[Path, ...]
    plot: Path | None

    def __post_init__(self) -> None:
        for name, low in (("iters", 1), ("warmup", 0), ("threads", 1), ("batch", 1), ("rounds", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.accuracy is not None and not Path(self.accuracy).is_file():
            raise UsageError(f"--accuracy: {self.accuracy} is not a file")
        missing = [str(p) for p in self.results if not Path(p).is_file()]
        if missing:
            raise UsageError(f"--results: {missing} not found (bench.jsonl files of other runs)")


# NOTE: the old spellings (a jsonargparse dataclass group named `args`), accepted for one release by distill.cli
DEPRECATED_FLAGS: dict[str, str] = {
    f"--args.{f.name}": f"--{f.name}" for f in fields(BenchOptions) if f.name not in ("batch", "run")
}


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
        res = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False)
        name = res.stdout.strip()
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def time_fn(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
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


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory (Linux: VmHWM, the resident high-water mark, can be reset per process)


def _proc_kb(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> int | None:
    """Reset the resident high-water mark; returns the current RSS in kB (None where unsupported)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_kb("VmRSS")


# ----------------------------------------------------------------------------------------------------------------------
# Candidates: one runnable model each


@dataclass
class _Candidate:
    """One model to time: ``make()`` loads it and returns ``embed(x) -> [B, D]``."""

    tower: str
    runtime: str
    precision: str
    file: str
    file_size: int | None
    make: Callable[[], Embed]
    batched: bool
    stats: dict[str, int]


def _onnx_embed(path: Path, threads: int) -> tuple[Embed, bool]:
    runner = OnnxRunner(path, threads)
    return runner, runner.dynamic_batch


def _coreml_embed(path: Path, tower: str, units: str) -> Embed:
    import coremltools as ct  # lazy: heavy optional dependency (and prediction runs on macOS only)

    model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))

    def embed(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for row in x.split(1):
            if tower == "image":
                pixels = (row[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                feed = {"image": Image.fromarray(pixels, mode="RGB")}
            else:
                feed = {"text": row.to(torch.int32).numpy()}
            outs.append(torch.from_numpy(np.asarray(model.predict(feed)["embedding"], dtype=np.float32)))
        return torch.cat(outs)

    return embed


def _hf_embed(path: Path, tower: str, mean: list[float], std: list[float]) -> Embed:
    from export.hf import hf_features, load_hf  # lazy: export.hf imports open_clip and transformers (heavy)

    model = load_hf(path)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(hf_features(model, tower, (x - m) / s if tower == "image" else x), dim=-1)

    return embed


def _artifact_candidates(artifacts: Path, manifest: dict, opts: BenchOptions, notes: list[str]) -> list[_Candidate]:
    """One candidate per runnable artifact of the manifest; missing or unrunnable ones become notes."""
    towers, model = manifest["model"].get("towers", {}), manifest["model"]
    out: list[_Candidate] = []
    for art in manifest["artifacts"]:
        path, tower, fmt = artifacts / art["file"], art["tower"], art["format"]
        base = {"tower": tower, "precision": art["precision"], "file": art["file"], "stats": towers.get(tower, {})}
        base["file_size"] = art["file_size"]
        if not path.exists():
            notes.append(f"{art['file']}: listed in manifest.json but missing: not timed")
        elif fmt == "executorch" and art["checked_with"] != "executorch.runtime":
            notes.append(f"{art['file']}: {art['checked_with']}")
        elif fmt == "executorch":
            out.append(
                _Candidate(
                    runtime=f"executorch-{art['backend']}", make=lambda p=path: PteRunner(p), batched=False, **base
                )
            )
        elif fmt == "onnx":
            dynamic = art.get("input", {}).get("shape", [1])[0] != 1
            make = lambda p=path: _onnx_embed(p, opts.threads)[0]  # noqa: E731
            out.append(_Candidate(runtime="onnxruntime", make=make, batched=dynamic, **base))
        elif fmt == "hf":
            make = lambda p=path, t=tower: _hf_embed(p, t, model["mean"], model["std"])  # noqa: E731
            out.append(_Candidate(runtime="transformers", make=make, batched=True, **base))
        elif fmt == "coreml" and opts.coreml and sys.platform == "darwin":
            for units in ("ALL", "CPU_ONLY"):
                make = lambda p=path, t=tower, u=units: _coreml_embed(p, t, u)  # noqa: E731
                out.append(_Candidate(runtime=f"coreml-{units}", make=make, batched=False, **base))
    if any(a["format"] == "coreml" for a in manifest["artifacts"]) and not (opts.coreml and sys.platform == "darwin"):
        notes.append("CoreML timing needs macOS: .mlpackage files were not timed here")
    return out


def _eager_candidates(manifest: dict, opts: BenchOptions, notes: list[str]) -> list[_Candidate]:
    # NOTE: lazy: students imports open_clip, which imports transformers (heavy; ~1.4 s), kept out of
    # `distill bench --help`
    import students

    ckpt = Path(opts.checkpoint or manifest["model"]["checkpoint"])
    if not ckpt.exists():
        notes.append(f"eager comparison skipped: checkpoint {ckpt} not found (--checkpoint)")
        return []
    student = students.load_student(ckpt).eval()
    wrappers = dict(zip(("image", "text"), prepare_towers(student, backend="eager"), strict=True))
    own: dict[str, Embed] = {
        "image": lambda x: student.encode_image(student.normalize(x)),
        "text": lambda x: student.encode_text(x.long()),
    }
    towers = manifest["model"].get("towers", {})
    out = []
    for tower, enc in wrappers.items():
        base = {"tower": tower, "precision": "fp32", "file": "", "file_size": None, "stats": towers.get(tower, {})}
        out.append(_Candidate(runtime="pytorch-eager", make=lambda enc=enc: enc, batched=True, **base))
        out.append(_Candidate(runtime="pytorch-student", make=lambda f=own[tower]: f, batched=True, **base))
    return out


def _inputs(manifest: dict, batch: int) -> dict[str, dict[int, torch.Tensor]]:
    """Fixed inputs per tower and batch size (batch N: N different images; the example token row N times)."""
    m = manifest["model"]
    image, tokens = example_inputs(m["image_size"], m["context_length"], manifest["tokenizer"]["vocab_size"])
    images = torch.cat([image, torch.rand(batch - 1, *image.shape[1:], generator=torch.Generator().manual_seed(1))])
    return {"image": {1: image, batch: images[:batch]}, "text": {1: tokens, batch: tokens.repeat(batch, 1)}}


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def bench(
    artifacts: Path,
    iters: int = 50,
    warmup: int = 10,
    threads: int = 2,
    batch: int = 8,
    rounds: int = 1,
    eager: bool = True,
    checkpoint: Path | None = None,
    coreml: bool = True,
    output: Path | None = None,
    run: str | None = None,
    accuracy: Path | None = None,
    results: list[Path] | None = None,
    plot: Path | None = None,
) -> dict:
    """Time every artifact in ``artifacts`` (a directory written by ``distill export``) next to eager PyTorch.

    Args:
        artifacts: The export output directory (with ``manifest.json``).
        iters: Timed runs per model and batch size (use >= 50 for reported numbers).
        warmup: Untimed runs before timing each model.
        threads: CPU threads for every runtime (torch, ExecuTorch's threadpool, ONNX Runtime's intra-op pool).
        batch: The second batch size N timed beside batch 1.
        rounds: Time every model this many times, interleaved; the spread of the per-round medians is reported.
        eager: Also time eager PyTorch on the same student (needs the checkpoint).
        checkpoint: Student for the eager comparison; default: the checkpoint recorded in manifest.json.
        coreml: Time .mlpackage files with compute units ALL and CPU_ONLY (macOS only; noted elsewhere).
        output: JSON-lines file to append results to; default: <artifacts>/bench.jsonl.
        run: Label of this run in the results and the plot; default: the run directory of the checkpoint.
        accuracy: JSON mapping run label -> accuracy metric; with it, an accuracy-vs-latency PNG is drawn.
        results: More bench.jsonl files (other runs) to include in the plot.
        plot: PNG path of the plot; default: <artifacts>/accuracy_latency.png.

    Returns:
        ``{"results": [one dict per model, runtime and batch], "table", "_table", "jsonl", "plot", "notes"}``.
    """
    opts = BenchOptions(
        iters=iters,
        warmup=warmup,
        threads=threads,
        batch=batch,
        rounds=rounds,
        eager=eager,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        coreml=coreml,
        output=None if output is None else Path(output),
        run=run,
        accuracy=None if accuracy is None else Path(accuracy),
        results=tuple(Path(p) for p in results or ()),
        plot=None if plot is None else Path(plot),
    )
    artifacts = Path(artifacts)
    if not (artifacts / bundle.MANIFEST_NAME).is_file():
        raise UsageError(f"--artifacts: {artifacts} has no {bundle.MANIFEST_NAME} (run distill export first)")
    manifest = bundle.read_manifest(artifacts)
    notes: list[str] = []
    rows = _measure(artifacts, manifest, opts, notes)
    out_path = opts.output or artifacts / "bench.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: append-only by design (one line per run, history kept); each line is one write() call
    with open(out_path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = format_table(rows)
    for n in notes:
        _logger.info(n)
    plot_path = None
    if opts.accuracy is not None:
        all_rows = list(rows)
        for extra in opts.results:
            all_rows += [json.loads(ln) for ln in extra.read_text().splitlines() if ln.strip()]
        acc = json.loads(opts.accuracy.read_text())
        plot_path = plot_accuracy_latency(all_rows, acc, opts.plot or artifacts / "accuracy_latency.png")
    # "_table" is what `distill bench` prints (distill.cli shows it instead of the JSON dump)
    return {"results": rows, "table": table, "_table": table, "jsonl": str(out_path), "plot": plot_path, "notes": notes}


def _run_label(manifest: dict, opts: BenchOptions) -> str:
    if opts.run:
        return opts.run
    ckpt = Path(opts.checkpoint or manifest["model"]["checkpoint"])
    # <run>/student (students.save_student) or <run>/checkpoints/last.ckpt (distill train)
    parts = [p for p in ckpt.parts if p not in ("student", "checkpoints") and not p.endswith(".ckpt")]
    return parts[-1] if parts else manifest["model"]["name"]


def _measure(artifacts: Path, manifest: dict, opts: BenchOptions, notes: list[str]) -> list[dict]:
    """Load every candidate (peak memory, parity), time it at batch 1 and N, interleaved over rounds."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    set_executorch_threads(opts.threads)
    inputs = _inputs(manifest, opts.batch)
    cands = _artifact_candidates(artifacts, manifest, opts, notes)
    if opts.eager:
        cands += _eager_candidates(manifest, opts, notes)
    batches = sorted({1, opts.batch})
    try:
        with torch.inference_mode():
            loaded = [_load(c, inputs, batches) for c in cands]
            reference = {
                c.tower: out for c, (_, _, out) in zip(cands, loaded, strict=True) if c.runtime == "pytorch-eager"
            }
            samples = {(i, b): [] for i in range(len(cands)) for b in batches}
            per_round = {(i, b): [] for i in range(len(cands)) for b in batches}
            for _ in range(opts.rounds):
                for i, (fn, _, _) in enumerate(loaded):
                    for b in batches:
                        ms = time_fn(_call(fn, inputs[cands[i].tower][b], cands[i].batched), opts.iters, opts.warmup)
                        samples[i, b] += ms
                        per_round[i, b].append(round(statistics.median(ms), 3))
    finally:
        torch.set_num_threads(torch_threads)
    common = _common(manifest, opts, notes)
    rows = []
    for i, (c, (_, peak, out)) in enumerate(zip(cands, loaded, strict=True)):
        diff, cos = parity(reference[c.tower], out) if c.tower in reference else (None, None)
        row = {
            "tower": c.tower,
            "runtime": c.runtime,
            "precision": c.precision,
            "file": c.file,
            "file_size": c.file_size,
            "peak_rss_mb": peak,
            "cosine_vs_eager": cos,
            "max_abs_vs_eager": diff,
            **c.stats,
        }
        for b in batches:
            mode = "one call" if b == 1 or c.batched else f"{b} x batch 1"
            rows.append(
                common
                | row
                | {"batch": b, "batch_mode": mode}
                | _stats(samples[i, b])
                | {"round_medians_ms": per_round[i, b]}
            )
    return rows


def _call(fn: Embed, x: torch.Tensor, batched: bool) -> Callable[[], object]:
    if batched or x.shape[0] == 1:
        return lambda: fn(x)
    rows = list(x.split(1))
    return lambda: [fn(r) for r in rows]


def _load(c: _Candidate, inputs: dict, batches: list[int]) -> tuple[Embed, float | None, torch.Tensor]:
    """Load one candidate and run it once per batch size: ``(embed, peak MB above the RSS before, batch-1 output)``."""
    before = _reset_peak()
    fn = c.make()
    out = fn(inputs[c.tower][1])
    for b in batches[1:]:
        _call(fn, inputs[c.tower][b], c.batched)()
    peak = _proc_kb("VmHWM")
    mb = None if before is None or peak is None else round((peak - before) / 1024, 1)
    return fn, mb, out


def _common(manifest: dict, opts: BenchOptions, notes: list[str]) -> dict[str, object]:
    """Fields shared by every row of one bench run (and a note when the machine is busy)."""
    versions = bundle.versions()
    common = {
        "time": bundle.utc_now(),
        "run": _run_label(manifest, opts),
        "student": manifest["model"]["name"],
        "device": cpu_label(),
        "platform": f"{platform.system()} {platform.machine()}",
        "threads": opts.threads,
        "iters": opts.iters,
        "warmup": opts.warmup,
        "rounds": opts.rounds,
        **{k: versions[k] for k in ("torch", "executorch", "onnxruntime", "transformers")},
        "git_sha": git_sha(),
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
    return common


def format_table(results: list[dict]) -> str:
    """A plain-text table of bench results: one line per model, batch 1 and batch N side by side."""
    by_model: dict[tuple, dict[int, dict]] = {}
    for r in results:
        by_model.setdefault((r["tower"], r["runtime"], r.get("precision", ""), r.get("file", "")), {})[r["batch"]] = r
    n = max((b for per in by_model.values() for b in per), default=1)
    header = ("tower", "runtime", "precision", "b1 median ms", "b1 p90", f"b{n} median ms", f"b{n} p90",
              "peak MB", "file MB", "cosine")  # fmt: skip
    rows = []
    for (tower, runtime, precision, _), per in by_model.items():
        one, big = per.get(1, {}), per.get(n, {})
        first = one or big
        rows.append(
            (
                tower,
                runtime,
                precision,
                f"{one['median_ms']:.2f}" if one else "",
                f"{one['p90_ms']:.2f}" if one else "",
                f"{big['median_ms']:.2f}" if big and n > 1 else "",
                f"{big['p90_ms']:.2f}" if big and n > 1 else "",
                "" if first.get("peak_rss_mb") is None else f"{first['peak_rss_mb']:.0f}",
                f"{first['file_size'] / 1e6:.1f}" if first.get("file_size") else "",
                "" if first.get("cosine_vs_eager") is None else f"{first['cosine_vs_eager']:.6f}",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)


def accuracy_latency_points(
    results: list[dict], accuracy: dict[str, float], runtime: str, precision: str
) -> list[tuple[str, float, float]]:
    """``(run, image + text median ms at batch 1, accuracy)`` per run that has both towers and an accuracy.

    Points are keyed by run (``row["run"]``), so two runs of one architecture are two points; an accuracy given
    by student name is used only when that name is a single run's.
    """
    latency: dict[str, dict[str, float]] = {}
    student_of: dict[str, str] = {}
    for r in results:
        if r.get("runtime") == runtime and r.get("precision") == precision and r.get("batch", 1) == 1:
            label = r.get("run") or r["student"]
            latency.setdefault(label, {})[r["tower"]] = r["median_ms"]
            student_of[label] = r["student"]
    runs_per_student: dict[str, int] = {}
    for s in student_of.values():
        runs_per_student[s] = runs_per_student.get(s, 0) + 1
    points = []
    for label, towers in latency.items():
        acc = accuracy.get(label)
        if acc is None and runs_per_student[student_of[label]] == 1:
            acc = accuracy.get(student_of[label])
        if acc is not None and len(towers) == 2:
            points.append((label, sum(towers.values()), float(acc)))
    return points


def plot_accuracy_latency(
    results: list[dict],
    accuracy: dict[str, float],
    path: Path,
    runtime: str = "executorch-xnnpack",
    precision: str = "fp32",
) -> str | None:
    """Scatter accuracy vs image+text median latency per run; written atomically as PNG (matplotlib Agg).

    Returns:
        The PNG path, or None when no run has both an accuracy and latencies for ``runtime``/``precision``.
    """
    # NOTE: lazy: matplotlib costs ~0.5 s to import and `distill bench --help` imports this module; the object API
    # (no pyplot) leaves the process-wide backend alone, as distill.curves
    from matplotlib.figure import Figure

    points = accuracy_latency_points(results, accuracy, runtime, precision)
    if not points:
        _logger.warning("no run has both an accuracy and %s %s latencies: no plot", runtime, precision)
        return None
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for name, ms, acc in points:
        ax.scatter(ms, acc)
        ax.annotate(name, (ms, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"image + text latency, median ms ({runtime} {precision}, batch 1)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, format="png")
    return str(path)
