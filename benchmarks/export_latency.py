"""Full-size export latency: ExecuTorch XNNPACK (FP32, int8) vs eager PyTorch, per tower, same CPU and threads.

For each student (random weights: latency does not depend on them) this lowers the image and text towers
to ``.pte`` programs in several variants and times them next to eager PyTorch in one process:

* ``naive-fp32``: the towers wrapped as they are (no export rewrites), i.e. the state before this package;
* ``fp32``: `export.prepare` rewrites (one XNNPACK delegate per tower);
* ``int8``: static PT2E int8 (convs/linears), calibrated on real images (``--calib``) or noise;
* ``int8_dynamic``: dynamically quantised linears (text towers).

Eager baselines: ``pytorch-student`` (the student's own forward) and ``pytorch-eager`` (the folded, rewritten
wrapper that is exported). Every model is timed ``--rounds`` times, interleaved, ``--iters`` runs each after
``--warmup``; the JSON keeps the per-round medians so the spread on a shared machine is visible.

Run (results to benchmarks/out/export_latency_<student>_t<threads>.json):

    .venv/bin/python benchmarks/export_latency.py --students mobileclip_s0 mobileclip2_s0 --threads 2

NOTE: with other processes on the cores, OpenMP's default spin-waiting makes eager PyTorch with >1 thread
collapse (tens of ms lost per forward); ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads.
Report numbers from a quiet machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

_logger = logging.getLogger("export_latency")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="+", default=["mobileclip_s0", "mobileclip2_s0"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["naive-fp32", "fp32", "int8", "int8_dynamic"])
    p.add_argument("--towers", nargs="+", default=["image", "text"])
    p.add_argument("--calib", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/flickr8k/images")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/export_latency"), help="where .pte files are written")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--reuse", action="store_true", help="time existing .pte files in --work instead of re-exporting")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (shared machines)")
    return p.parse_args()


def main() -> None:
    args = _parse()
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # must precede the first torch import
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import statistics

    import torch

    import students
    from export import bundle
    from export.api import calibration_texts, load_calibration_images, macs_and_params
    from export.bench import _stats, cpu_label, time_fn
    from export.executorch import export_executorch, load_pte, set_executorch_threads
    from export.prepare import example_inputs, prepare_towers, student_meta, vocab_size

    # size both threadpools before anything runs (the export's parity check already executes the programs)
    torch.set_num_threads(args.threads)
    set_executorch_threads(args.threads)
    from executorch.extension.pybindings import portable_lib

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.students:
        student = students.create_student(name).eval()
        meta = student_meta(student)
        size, ctx = meta["image_size"], meta["context_length"]
        image, tokens = example_inputs(size, ctx, vocab_size(student.text))
        examples = {"image": (image,), "text": (tokens,)}
        naive = dict(zip(("image", "text"), prepare_towers(student, backend="eager", rewrite=False), strict=True))
        fast = dict(zip(("image", "text"), prepare_towers(student, backend="xnnpack"), strict=True))
        eager = dict(zip(("image", "text"), prepare_towers(student, backend="eager"), strict=True))
        calib_img = (
            [(x,) for x in load_calibration_images(args.calib, size, args.calib_size)]
            if args.calib.exists()
            else [(torch.rand(1, 3, size, size),) for _ in range(args.calib_size)]
        )
        calib = {"image": calib_img, "text": [(t,) for t in calibration_texts(student, [], [])]}
        work = args.work / name
        rows: list[dict] = []
        runners = []
        for tower in args.towers:
            stats = macs_and_params(eager[tower], examples[tower])
            for variant in args.variants:
                if variant == "int8_dynamic" and tower == "image":
                    continue  # dynamic quantisation covers linears only; the MCi towers are conv nets
                enc = naive[tower] if variant == "naive-fp32" else fast[tower]
                mode = {"naive-fp32": "none", "fp32": "none"}.get(variant, variant)
                t0 = time.perf_counter()
                pte = work / f"{tower}_{variant}.pte"
                if args.reuse and pte.is_file():
                    rows.append({"student": name, "tower": tower, "variant": variant, "reused": str(pte), **stats})
                    rows[-1] |= {"runtime": "executorch-xnnpack", "file_size": pte.stat().st_size}
                    method = load_pte(pte)
                    runners.append(lambda method=method, x=examples[tower]: method.execute(list(x)))
                    continue
                rep = export_executorch(
                    enc,
                    examples[tower],
                    pte,
                    tower=tower,
                    quantize=mode,
                    calibration=calib[tower],
                    reference=naive[tower],
                )
                row = {
                    "student": name,
                    "tower": tower,
                    "variant": variant,
                    "runtime": "executorch-xnnpack",
                    "file_size": rep.file_size,
                    "cosine_vs_pytorch": rep.cosine,
                    "delegation": rep.delegation,
                    "export_s": round(time.perf_counter() - t0, 1),
                    **stats,
                }
                rows.append(row)
                method = load_pte(rep.path)
                x = examples[tower]
                runners.append(lambda method=method, x=x: method.execute(list(x)))
            for runtime, fn in (
                ("pytorch-student", naive[tower]),
                ("pytorch-eager", eager[tower]),
            ):
                rows.append({"student": name, "tower": tower, "variant": "fp32", "runtime": runtime, **stats})
                runners.append(lambda fn=fn, x=examples[tower]: fn(*x))

        samples: list[list[float]] = [[] for _ in runners]
        per_round: list[list[float]] = [[] for _ in runners]
        with torch.inference_mode():
            for _ in range(args.rounds):
                for i, fn in enumerate(runners):
                    ms = time_fn(fn, args.iters, args.warmup)
                    samples[i] += ms
                    per_round[i].append(round(statistics.median(ms), 2))
        env = {
            "device": cpu_label(),
            "threads": args.threads,
            "iters": args.iters,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "executorch_threads": portable_lib._threadpool_get_thread_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_avg_1m": os.getloadavg()[0],
            "git_sha": bundle.git_sha(),
            **{k: v for k, v in bundle.versions().items() if k in ("torch", "executorch", "torchao")},
        }
        for row, ms, rounds in zip(rows, samples, per_round, strict=True):
            row.update(_stats(ms), round_medians_ms=rounds)
        for row in rows:
            _logger.info(
                "%-14s %-5s %-13s %-19s median %7.2f ms  p90 %7.2f  rounds %s",
                name,
                row["tower"],
                row["variant"],
                row["runtime"],
                row["median_ms"],
                row["p90_ms"],
                row["round_medians_ms"],
            )
        out = args.out / f"export_latency_{name}_t{args.threads}.json"
        bundle.write_json(out, {"env": env, "results": rows})
        _logger.info("wrote %s", out)


if __name__ == "__main__":
    sys.exit(main())
