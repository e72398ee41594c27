"""Full-size export latency: ExecuTorch XNNPACK and ONNX Runtime (FP32, int8) vs eager PyTorch, per tower.

For each student (random weights: latency does not depend on them) this exports the image and text towers in
several variants and times them next to eager PyTorch in one process, at every ``--threads`` count in turn
(torch, the ExecuTorch threadpool and ONNX Runtime's intra-op pool all set to the same count):

* ``naive-fp32``: ``.pte`` of the towers wrapped as they are (no export rewrites);
* ``fp32``: ``.pte`` of the `export.prepare` rewrites (one XNNPACK delegate per tower);
* ``int8``: static PT2E int8 ``.pte`` (convs/linears), calibrated on real images (``--calib``) or noise;
* ``int8_dynamic``: ``.pte`` with dynamically quantised linears (text towers);
* ``onnx-fp32``: ``.onnx`` of the `export.prepare` towers (``torch.onnx.export(dynamo=True)``), ONNX Runtime CPU;
* ``onnx-int8``: ONNX Runtime quantisation: dynamic for text, static QDQ calibrated on images for the image tower.

Eager baselines: ``pytorch-student`` (the student's own forward) and ``pytorch-eager`` (the folded, rewritten
wrapper that is exported). Every model is timed ``--rounds`` times, interleaved, ``--iters`` runs each after
``--warmup``; the JSON keeps the per-round medians so the spread on a shared machine is visible.

Run (results to benchmarks/out/export_latency_<student>.json):

    .venv/bin/python benchmarks/export_latency.py --students mobileclip_s0 mobileclip2_s0 --threads 2 1

NOTE: with other processes on the cores, OpenMP's default spin-waiting makes eager PyTorch with >1 thread
collapse (tens of ms lost per forward); ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads.
Report numbers from a quiet machine, or say that it was shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

_logger = logging.getLogger("export_latency")

_VARIANTS = ["naive-fp32", "fp32", "int8", "int8_dynamic", "onnx-fp32", "onnx-int8"]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="+", default=["mobileclip_s0", "mobileclip2_s0"])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts, timed in turn")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=_VARIANTS, choices=_VARIANTS)
    p.add_argument("--towers", nargs="+", default=["image", "text"])
    p.add_argument("--calib", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/flickr8k/images")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/export_latency"), help="where model files are written")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--reuse", action="store_true", help="time existing files in --work instead of re-exporting")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (shared machines)")
    return p.parse_args()


def _export_variant(variant: str, tower: str, encoders: dict, examples: dict, calib: dict, work: Path, reuse: bool):
    """Write one model file; returns ``(runtime, path, report or None)``."""
    from export.executorch import export_executorch
    from export.onnx import export_onnx, quantize_onnx

    if variant.startswith("onnx"):
        fp32 = work / f"{tower}_onnx-fp32.onnx"
        path = work / f"{tower}_{variant}.onnx"
        if reuse and path.is_file():
            return "onnxruntime", path, None
        if variant == "onnx-fp32":
            rep = export_onnx(
                encoders["eager"][tower], examples[tower], path, tower=tower, reference=encoders["naive"][tower]
            )
        else:
            if not fp32.is_file():
                export_onnx(encoders["eager"][tower], examples[tower], fp32, tower=tower)
            rep = quantize_onnx(
                fp32, path, tower=tower, calibration=calib[tower] if tower == "image" else None,
                reference=encoders["naive"][tower], check_inputs=[examples[tower]],
            )  # fmt: skip
        return "onnxruntime", path, rep
    path = work / f"{tower}_{variant}.pte"
    if reuse and path.is_file():
        return "executorch-xnnpack", path, None
    enc = encoders["naive" if variant == "naive-fp32" else "fast"][tower]
    mode = {"naive-fp32": "none", "fp32": "none"}.get(variant, variant)
    ref = encoders["naive"][tower]
    rep = export_executorch(
        enc, examples[tower], path, tower=tower, quantize=mode, calibration=calib[tower], reference=ref
    )
    return "executorch-xnnpack", path, rep


def _runner(runtime: str, path: Path, x, threads: int) -> Callable[[], object]:
    if runtime == "onnxruntime":
        from export.onnx import OnnxRunner

        session = OnnxRunner(path, threads)
        return lambda: session(x)
    from export.executorch import load_pte

    method = load_pte(path)
    return lambda: method.execute([x])


def _models(name: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Export every variant of one student; returns the rows (without timings) and the eager encoders."""
    import torch

    import students
    from export.api import calibration_texts, load_calibration_images, macs_and_params
    from export.prepare import example_inputs, prepare_towers, student_meta, vocab_size

    student = students.create_student(name).eval()
    meta = student_meta(student)
    size, ctx = meta["image_size"], meta["context_length"]
    image, tokens = example_inputs(size, ctx, vocab_size(student.text))
    examples = {"image": (image,), "text": (tokens,)}
    encoders = {
        key: dict(zip(("image", "text"), prepare_towers(student, backend=backend, rewrite=rewrite), strict=True))
        for key, backend, rewrite in (("naive", "eager", False), ("fast", "xnnpack", True), ("eager", "eager", True))
    }
    calib_img = (
        [(x,) for x in load_calibration_images(args.calib, size, args.calib_size)]
        if args.calib.exists()
        else [(torch.rand(1, 3, size, size),) for _ in range(args.calib_size)]
    )
    calib = {"image": calib_img, "text": [(t,) for t in calibration_texts(student, [], [])]}
    rows = []
    for tower in args.towers:
        stats = macs_and_params(encoders["eager"][tower], examples[tower])
        for variant in args.variants:
            if variant == "int8_dynamic" and tower == "image":
                continue  # dynamic quantisation covers linears only; the MCi towers are conv nets
            t0 = time.perf_counter()
            runtime, path, rep = _export_variant(
                variant, tower, encoders, examples, calib, args.work / name, args.reuse
            )
            rows.append({
                "student": name, "tower": tower, "variant": variant, "runtime": runtime, "path": str(path),
                "file_size": path.stat().st_size, "export_s": round(time.perf_counter() - t0, 1),
                "cosine_vs_pytorch": None if rep is None else rep.cosine,
                "max_abs_vs_pytorch": None if rep is None else rep.max_abs_diff,
                "delegation": None if rep is None else rep.delegation, **stats,
            })  # fmt: skip
        for runtime, key in (("pytorch-student", "naive"), ("pytorch-eager", "eager")):
            rows.append({"student": name, "tower": tower, "variant": "fp32", "runtime": runtime, "eager": key, **stats})
    return rows, {"encoders": encoders, "examples": examples}


def _time_all(rows: list[dict], models: dict, threads: int, args: argparse.Namespace) -> list[dict]:
    """Time every row at one thread count (rounds interleaved); returns timed copies of the rows."""
    import torch

    from export.bench import _stats, time_fn
    from export.executorch import set_executorch_threads

    torch.set_num_threads(threads)
    set_executorch_threads(threads)
    runners = []
    for row in rows:
        x = models["examples"][row["tower"]][0]
        if "eager" in row:
            fn = models["encoders"][row["eager"]][row["tower"]]
            runners.append(lambda fn=fn, x=x: fn(x))
        else:
            runners.append(_runner(row["runtime"], Path(row["path"]), x, threads))
    samples: list[list[float]] = [[] for _ in runners]
    per_round: list[list[float]] = [[] for _ in runners]
    with torch.inference_mode():
        for _ in range(args.rounds):
            for i, fn in enumerate(runners):
                ms = time_fn(fn, args.iters, args.warmup)
                samples[i] += ms
                per_round[i].append(round(statistics.median(ms), 2))
    load = os.getloadavg()[0]
    return [
        {k: v for k, v in row.items() if k != "eager"}
        | {"threads": threads, "load_avg_1m": round(load, 2)}
        | _stats(ms)
        | {"round_medians_ms": r}
        for row, ms, r in zip(rows, samples, per_round, strict=True)
    ]


def main() -> None:
    args = _parse()
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # must precede the first torch import
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from export import bundle
    from export.bench import cpu_label
    from export.executorch import set_executorch_threads
    from mcd_common.files import git_sha

    # size the threadpools before anything runs (the exports' parity checks already execute the programs)
    torch.set_num_threads(args.threads[0])
    set_executorch_threads(args.threads[0])
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    versions = bundle.versions()
    for name in args.students:
        rows, models = _models(name, args)
        timed = [r for t in args.threads for r in _time_all(rows, models, t, args)]
        for row in timed:
            _logger.info(
                "%-14s t%d %-5s %-13s %-19s median %7.2f ms  p90 %7.2f  rounds %s",
                name, row["threads"], row["tower"], row["variant"], row["runtime"], row["median_ms"],
                row["p90_ms"], row["round_medians_ms"],
            )  # fmt: skip
        env = {
            "device": cpu_label(),
            "threads": args.threads,
            "iters": args.iters,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "git_sha": git_sha(),
            **{k: versions[k] for k in ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript")},
        }
        out = args.out / f"export_latency_{name}.json"
        bundle.write_json(out, {"env": env, "results": timed})
        _logger.info("wrote %s", out)


if __name__ == "__main__":
    sys.exit(main())
