"""`distill compare RUN_OR_EVAL_JSON...`: one table (and an accuracy-vs-latency plot) across training runs.

Inputs, in any mix:
- a run directory (`run.json`, written by `distill train`): model, mode, teacher, steps, wall time, and the final
  validation metrics;
- an eval JSON (`distill eval --out`): its metrics replace the run's validation metrics when its `model` is a
  student of a run that is compared too (or whose run directory holds `run.json`); otherwise it is a row of its own;
- an export directory (`manifest.json` + `bench.jsonl`) or a `bench.jsonl` (`distill bench`): the median latency of
  the image and text towers (`--runtime`, `--precision`), attached to the run the manifest's checkpoint belongs to.
For each run directory, eval JSONs (`eval*.json`) inside it, and export directories inside it or beside it or its
parent whose manifest's checkpoint is in the run, are found without being named.

Rows are labelled by run (the directory name, with parents added until labels differ), never by architecture,
so two runs of one student both appear. Writes `<out>.md`, `<out>.json` and `<out>.png`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcd_common import UsageError
from mcd_common.files import atomic_path, atomic_write_json, atomic_write_text
from mcd_common.jsonfmt import round_floats

_logger = logging.getLogger(__name__)

__all__ = ["Row", "compare", "compare_positionals", "format_markdown", "load_rows", "plot_rows"]

METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
"""Metrics shown, in this order, when any compared row has them."""


@dataclass
class Row:
    """One compared run (or a lone eval / export)."""

    label: str
    path: str
    model: str | None = None
    mode: str | None = None
    teacher: str | None = None
    steps: int | None = None
    wall_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_source: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_source: str | None = None

    @property
    def total_latency_ms(self) -> float | None:
        """Image + text median latency (None unless both towers were timed)."""
        if {"image", "text"} <= set(self.latency_ms):
            return self.latency_ms["image"] + self.latency_ms["text"]
        return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: cannot read as JSON ({err})") from err


def _read_bench_lines(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{n}: not a JSON line ({err})") from err
    return rows


def _is_eval(obj: object) -> bool:
    return isinstance(obj, dict) and "kind" in obj and "model" in obj and any(k in obj for k in METRICS)


def _is_bench_row(obj: object) -> bool:
    return isinstance(obj, dict) and {"runtime", "tower", "median_ms"} <= set(obj)


def _run_row(run_dir: Path) -> Row:
    run = _read_json(run_dir / "run.json")
    if not isinstance(run, dict):
        raise UsageError(f"{run_dir / 'run.json'}: not a run.json written by `distill train`")
    cfg = run.get("student_cfg") or {}
    metrics = {k.removeprefix("val/"): float(v) for k, v in (run.get("metrics") or {}).items() if v is not None}
    return Row(
        label=run_dir.name,
        path=str(run_dir),
        model=cfg.get("name") or run.get("student"),
        mode=run.get("mode"),
        teacher=run.get("teacher"),
        steps=run.get("steps"),
        wall_seconds=run.get("wall_seconds"),
        metrics={k: v for k, v in metrics.items() if k in METRICS},
        metrics_source="validation" if metrics else None,
    )


def _owner_run(model: str | None) -> Path | None:
    """The run directory a student path (`<run>/student`, `<run>/checkpoints/x.ckpt`, `local-dir:...`) belongs to."""
    if not model:
        return None
    path = Path(model.removeprefix("local-dir:")).expanduser()
    for cand in (path, *list(path.parents)[:2]):
        if (cand / "run.json").is_file():
            return cand.resolve()
    return None


def _latency(bench_rows: list[dict], runtime: str, precision: str) -> dict[str, float]:
    """Median ms per tower from the latest matching bench line (bench.jsonl is append-only history)."""
    out: dict[str, float] = {}
    for r in bench_rows:
        if _is_bench_row(r) and r.get("runtime") == runtime and r.get("precision", precision) == precision:
            out[r["tower"]] = float(r["median_ms"])
    return out


@dataclass
class _Found:
    runs: dict[Path, Row] = field(default_factory=dict)
    evals: list[tuple[Path, dict]] = field(default_factory=list)
    benches: list[tuple[Path, list[dict]]] = field(default_factory=list)
    """(export dir or bench file, its bench lines)."""


def _classify(path: Path, found: _Found) -> None:
    """Sort one input into runs, evals and benches; an eval's or export's own run joins the runs, in input order."""
    n_evals, n_benches = len(found.evals), len(found.benches)
    _classify_one(path.resolve(), found)
    owners = [_owner_run(ev.get("model")) for _, ev in found.evals[n_evals:]]
    owners += [_bench_owner(source)[1] for source, _ in found.benches[n_benches:]]
    for owner in owners:
        if owner is not None and owner not in found.runs:
            found.runs[owner] = _run_row(owner)


def _classify_one(path: Path, found: _Found) -> None:
    if path.is_dir():
        if (path / "run.json").is_file():
            found.runs.setdefault(path.resolve(), _run_row(path))
        elif (path / "manifest.json").is_file():
            bench = path / "bench.jsonl"
            found.benches.append((path, _read_bench_lines(bench) if bench.is_file() else []))
        else:
            raise UsageError(f"{path}: neither a run directory (run.json) nor an export directory (manifest.json)")
        return
    if not path.is_file():
        raise UsageError(f"{path}: no such run directory or file")
    if path.name == "run.json":
        found.runs.setdefault(path.parent.resolve(), _run_row(path.parent))
    elif path.suffix == ".jsonl":
        found.benches.append((path, _read_bench_lines(path)))
    else:
        obj = _read_json(path)
        if _is_eval(obj):
            found.evals.append((path, obj))
        elif _is_bench_row(obj) or (isinstance(obj, dict) and isinstance(obj.get("results"), list)):
            found.benches.append((path, [obj] if _is_bench_row(obj) else obj["results"]))
        else:
            raise UsageError(f"{path}: not a run.json, an eval JSON (`distill eval --out`) or a bench JSON")


def _discover(run_dir: Path, found: _Found) -> None:
    """Eval JSONs and export directories in a run directory, or beside it with a manifest pointing into it."""
    for ev in sorted([*run_dir.glob("eval*.json"), *run_dir.glob("*/eval*.json")]):
        obj = _read_json(ev)
        if _is_eval(obj) and all(ev != p for p, _ in found.evals):
            found.evals.append((ev, obj))
    known = {_bench_owner(p)[0].resolve() for p, _ in found.benches}
    near = ("*/manifest.json", "*/*/manifest.json")
    candidates = [m for pattern in near for m in run_dir.glob(pattern)]
    # beside the run (runs/a + runs/a_export) or one level up (the demo: out/runs/student_kd + out/export)
    candidates += [*run_dir.parent.glob("*/manifest.json"), *run_dir.parent.parent.glob("*/manifest.json")]
    for manifest in sorted(set(candidates)):
        export_dir = manifest.parent
        bench = export_dir / "bench.jsonl"
        if export_dir.resolve() in known or not bench.is_file():
            continue
        checkpoint = ((_read_json(manifest) or {}).get("model") or {}).get("checkpoint")
        if _owner_run(checkpoint) == run_dir:
            found.benches.append((export_dir, _read_bench_lines(bench)))
            known.add(export_dir.resolve())


def _bench_owner(source: Path) -> tuple[Path, Path | None]:
    """(export directory, the run its manifest's checkpoint belongs to) of a bench source."""
    export_dir = source if source.is_dir() else source.parent
    manifest = export_dir / "manifest.json"
    checkpoint = None
    if manifest.is_file():
        checkpoint = ((_read_json(manifest) or {}).get("model") or {}).get("checkpoint")
    return export_dir, _owner_run(checkpoint)


def _unique_labels(rows: list[Row]) -> None:
    """Directory names as labels; where two rows share one, add parent directories until they differ."""
    depth = {id(r): 1 for r in rows}
    for _ in range(8):
        labels = {}
        for r in rows:
            parts = Path(r.path).parts
            r.label = "/".join(parts[-depth[id(r)] :]) if len(parts) >= depth[id(r)] else r.path
            labels.setdefault(r.label, []).append(r)
        clashes = [r for same in labels.values() if len(same) > 1 for r in same]
        if not clashes:
            return
        for r in clashes:
            depth[id(r)] += 1


def load_rows(paths: list[str], runtime: str = "executorch-xnnpack", precision: str = "fp32") -> list[Row]:
    """Read and link the inputs of `distill compare` (see the module docstring) into one row per run.

    Raises:
        UsageError: An input that does not exist or is none of the accepted kinds.
    """
    found = _Found()
    for p in paths:
        _classify(Path(p).expanduser(), found)
    for run_dir in list(found.runs):
        _discover(run_dir, found)
    rows = list(found.runs.values())
    from_eval: set[int] = set()
    for path, ev in found.evals:
        owner = _owner_run(ev.get("model"))
        row = found.runs.get(owner) if owner is not None else None
        if row is None:
            row = Row(label=path.stem, path=str(path.with_suffix("")), model=ev.get("model"))
            rows.append(row)
        if id(row) not in from_eval:  # an eval replaces the training-time validation numbers
            row.metrics, row.metrics_source = {}, None
            from_eval.add(id(row))
        row.metrics.update({k: float(ev[k]) for k in METRICS if ev.get(k) is not None})
        row.metrics_source = ", ".join(filter(None, [row.metrics_source, f"eval {path.name}"]))
    seen_exports: set[Path] = set()
    for source, lines in found.benches:
        export_dir, owner = _bench_owner(source)
        if export_dir.resolve() in seen_exports:
            continue
        seen_exports.add(export_dir.resolve())
        row = found.runs.get(owner) if owner is not None else None
        if row is None:
            model = next((r.get("student") for r in lines if r.get("student")), None)
            row = Row(label=export_dir.name, path=str(export_dir), model=model)
            rows.append(row)
        latency = _latency(lines, runtime, precision)
        if latency:
            row.latency_ms.update(latency)
            row.latency_source = f"{runtime} {precision} ({export_dir.name}/bench.jsonl)"
    _unique_labels(rows)
    return rows


def _wall(seconds: float | None) -> str:
    """`42.3` -> `42 s`, `245` -> `4m05s`, `7260` -> `2h01m`."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    hours, rem = divmod(s, 3600)
    return f"{hours}h{rem // 60:02d}m" if hours else f"{rem // 60}m{rem % 60:02d}s"


def _fmt(value: float | int | str | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _columns(rows: list[Row]) -> list[str]:
    return [m for m in METRICS if any(m in r.metrics for r in rows)]


def format_markdown(rows: list[Row], runtime: str = "executorch-xnnpack", precision: str = "fp32") -> str:
    """A markdown table: run, model, mode, teacher, steps, wall time, metrics (%), tower latencies (ms)."""
    metrics = _columns(rows)
    towers = [t for t in ("image", "text") if any(t in r.latency_ms for r in rows)]
    header = ["run", "model", "mode", "teacher", "steps", "wall", *metrics, *(f"{t} ms" for t in towers)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r.label, r.model, r.mode, r.teacher, r.steps, _wall(r.wall_seconds)]
        cells += [r.metrics.get(m) for m in metrics]
        cells += [r.latency_ms.get(t) for t in towers]
        lines.append("| " + " | ".join(_fmt(c, 2 if i >= 6 + len(metrics) else 1) for i, c in enumerate(cells)) + " |")
    notes = []
    if metrics:
        notes.append("Metrics in %: an eval JSON where one was given or found, else the run's last validation.")
    if towers:
        notes.append(f"Latency: median ms at batch 1, {runtime} {precision} (`distill bench`).")
    return "\n".join(lines + ([""] + notes if notes else []))


def _pick_metric(rows: list[Row], metric: str) -> str | None:
    if metric != "auto":
        return metric
    # The metric most rows have, ties broken by METRICS order (zero-shot top-1 first).
    counts = [(sum(m in r.metrics for r in rows), -i, m) for i, m in enumerate(METRICS)]
    best = max(counts)
    return best[2] if best[0] else None


def plot_rows(rows: list[Row], metric: str, path: Path) -> tuple[Path | None, list[tuple[str, float, float]]]:
    """Scatter `metric` against image+text latency (or, when no row has latencies, training wall time).

    Returns:
        The PNG path (None when no row has both values) and the plotted points `(label, x, y)`.
    """
    by_latency = any(r.total_latency_ms is not None for r in rows)
    points = []
    for r in rows:
        x = r.total_latency_ms if by_latency else (r.wall_seconds / 60 if r.wall_seconds is not None else None)
        if x is not None and metric in r.metrics:
            points.append((r.label, x, r.metrics[metric]))
    if not points:
        return None, []
    # NOTE: lazy: `distill --help` imports every subcommand module, and matplotlib costs ~0.5 s to import.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    for label, x, y in points:
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    xlabel = "image + text latency, median ms (batch 1)" if by_latency else "training wall time, min (no bench found)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{metric} vs {'latency' if by_latency else 'training time'}, by run", fontsize=10)
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, format="png")
    return path, points


def compare(
    runs: list[str],
    out: Path = Path("compare"),
    metric: str = "auto",
    runtime: str = "executorch-xnnpack",
    precision: str = "fp32",
) -> dict:
    """Compare training runs, eval results and benchmarks in one table and one accuracy-vs-latency plot.

    Args:
        runs: Run directories, eval JSONs (`distill eval --out`), export directories or bench files; positional on
            the command line: `distill compare runs/a runs/b eval_c.json`.
        out: Output stem: writes `<out>.md`, `<out>.json` and `<out>.png` (a `.md`/`.json` suffix is dropped).
        metric: The plot's accuracy axis (`zeroshot_top1`, `t2i_R@1`, ...); `auto`: the metric most rows have.
        runtime: Bench runtime whose latency is shown (`executorch-xnnpack`, `pytorch-eager`, ...).
        precision: Bench precision (`fp32`, `int8`, ...).

    Returns:
        `{"rows": [...], "markdown": path, "json": path, "plot": path | None}` (the CLI prints the table).
    """
    if not runs:
        raise UsageError("distill compare: name at least one run directory, eval JSON or bench file")
    if metric != "auto" and metric not in METRICS:
        raise UsageError(f"--metric {metric}: choose auto or one of {', '.join(METRICS)}")
    rows = load_rows(runs, runtime, precision)
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".md", ".json", ".png") else out
    table = format_markdown(rows, runtime, precision)
    chosen = _pick_metric(rows, metric)
    plot, points = plot_rows(rows, chosen, stem.with_name(stem.name + ".png")) if chosen else (None, [])
    unplotted = sorted({r.label for r in rows} - {p[0] for p in points})
    if unplotted:
        _logger.warning("not in the plot (no %s or no latency/time): %s", chosen, ", ".join(unplotted))
    md_path, json_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    atomic_write_text(md_path, table + "\n")
    result = {
        "rows": [asdict(r) | {"total_latency_ms": r.total_latency_ms} for r in rows],
        "metric": chosen,
        "runtime": runtime,
        "precision": precision,
        "markdown": str(md_path),
        "json": str(json_path),
        "plot": str(plot) if plot else None,
        "points": [{"label": lb, "x": x, "y": y} for lb, x, y in points],
    }
    atomic_write_json(json_path, round_floats(result))
    _logger.info("wrote %s, %s%s", md_path, json_path, f", {plot}" if plot else "")
    return result | {"_table": table}


_NO_VALUE = {"-h", "--help", "--print_config"}


def compare_positionals(args: list[str]) -> list[str]:
    """`distill compare a b --out x` -> `distill compare --out x --runs '["a", "b"]'` for jsonargparse.

    jsonargparse (as the CLI uses it) has no variadic positionals, so the paths after `compare` that are not option
    values are gathered into `--runs`. A command line without `compare`, or one that passes `--runs`, is returned
    unchanged.
    """
    if "compare" not in args or any(a == "--runs" or a.startswith(("--runs=", "--runs+")) for a in args):
        return list(args)
    start = args.index("compare") + 1
    head, rest, paths = list(args[:start]), [], []
    i = start
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            rest.append(arg)
            if arg not in _NO_VALUE and "=" not in arg and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        else:
            paths.append(arg)
        i += 1
    return head + rest + (["--runs", json.dumps(paths)] if paths else [])
