"""Benchmark: teacher image-embedding throughput inside `build-data` vs the plain loop a user would write.

Both run in the same process on the same machine, on the same images from the embedded shapes corpus (its default
generator and 64 px images, truncated to `num_images`), with the same open_clip teacher and weights:

- `build-data`: `reinforced_data.build_data` (DataLoader workers decode and replay the DR augmentations, the
  teacher embeds `batch_size`-view chunks under bf16 autocast on CUDA, shards are written to disk); it also embeds
  each real caption, so its figure is conservative;
- plain loop: `open_clip.create_model_and_transforms`, torchvision `RandomResizedCrop + RandAugment`, and
  `model.encode_image` on one augmentation at a time (`torch.autocast(bfloat16)` on CUDA, fp32 on CPU).

On CPU it defaults to a randomly initialised open_clip ViT-B-32; on CUDA to ViT-L-14 (the DataCompDR teacher
architecture) in bf16. Random weights are saved to a file first and loaded through the real loaders
(`open_clip:ARCH@FILE`), since there is no model hub here. Results go to `benchmarks/out/build_data-*.json` and a
table is printed. Timings on a shared machine are noisy: rerun before quoting them.

The GPU suite (`benchmarks/gpu_suite.py`) also uses this module's compute-only measurements: `matmul_peak`,
`image_gflop`, `embed_plain` (open_clip `encode_image` on in-device float tensors, the loop of `ENV.md`'s H100
figures) and `embed_teacher_path` (the calls `build-data` makes: uint8 views from pinned host memory through
`teachers`' `encode_image` under bf16 autocast, channels-last), and `write_jpeg_shards` for synthetic input data.

Usage: `python benchmarks/build_data.py [--arch ViT-B-32] [--num_images 64] [--num_augs 4] [--device auto]`
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script: the repo is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_logger = logging.getLogger("benchmarks.build_data")

OUT_DIR = Path(__file__).resolve().parent / "out"


def _git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_loop(arch: str, weights: Path, shard: str, num_augs: int, device: torch.device) -> dict:
    """What a user would write: open_clip + torchvision transforms, one augmentation per forward."""
    import io
    import tarfile

    import open_clip
    from PIL import Image
    from torchvision import transforms as T

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    model = model.to(device).eval()
    norm = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    augment = T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandAugment(num_ops=2, magnitude=9),
            T.ToTensor(),
            norm,
        ]
    )
    autocast = device.type == "cuda"
    with tarfile.open(shard) as tar:
        images = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    # warm-up (allocator, kernels) outside the timed region, as for build-data's first batch
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        model.encode_image(augment(Image.open(io.BytesIO(images[0])).convert("RGB"))[None].to(device))
    _sync(device)
    start = time.perf_counter()
    views = 0
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for _ in range(num_augs):
            x = augment(img)[None].to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                emb = model.encode_image(x)
                emb = emb / emb.norm(dim=-1, keepdim=True)
            views += 1
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "images": len(images),
        "views": views,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 2),
        "views_per_s": round(views / seconds, 2),
    }


# ------------------------------------------------------------------------------ compute-only measurements (suite)


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> dict:
    """Measured dense matmul rate (bf16 on CUDA, fp32 on CPU) on random data: the ceiling for `% of peak`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - t0) / iters
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / seconds / 1e12, 2)}


def image_gflop(model: torch.nn.Module, image_size: int, device: torch.device) -> float:
    """Forward GFLOP of `model.encode_image` on one image (matmuls and convs, as torch's FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_image(x)
    return counter.get_total_flops() / 1e9


def random_open_clip_weights(arch: str, path: Path, seed: int, device: torch.device) -> Path:
    """Save a randomly initialised open_clip `arch` as safetensors (there is no model hub here); reuse if present."""
    import open_clip
    from safetensors.torch import save_file

    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def embed_plain(
    arch: str, weights: Path, batch_size: int, steps: int, warmup: int, device: torch.device, bf16_weights: bool = False
) -> dict:
    """The plain loop: open_clip `encode_image` + L2 norm under `torch.autocast(bfloat16)` (CUDA) on in-device floats.

    Args:
        bf16_weights: Cast the model to bf16 instead of autocasting (a reference for the weight-cast gap).
    """
    import open_clip

    model = open_clip.create_model(arch, pretrained=str(weights), device=device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    gflop = image_gflop(model, size, device)
    x = torch.randn(batch_size, 3, size, size, device=device)
    if bf16_weights:
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not bf16_weights)

    def step() -> None:
        with torch.no_grad(), amp:
            torch.nn.functional.normalize(model.encode_image(x), dim=-1)

    seconds = _time_steps(step, steps, warmup, device)
    return {"images_per_s": round(batch_size * steps / seconds, 1), "gflop_per_image": round(gflop, 4)}


def embed_teacher_path(spec: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    """What `build-data` does per chunk of views, minus decoding: `teachers` API on pinned uint8 host views.

    Mirrors `reinforced_data.build`: the ensemble on `device` in channels-last (CUDA), `inference_mode`, bf16
    autocast on CUDA, `non_blocking` copies of uint8 views, fp32 L2 norm, result copied back to the host.
    """
    import teachers

    ens = teachers.as_ensemble(teachers.create_teacher(spec)).to(device)
    if device.type == "cuda":
        ens.to(memory_format=torch.channels_last)
    size = max(t.image_size for t in ens.values())
    views = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    views = views.pin_memory() if device.type == "cuda" else views
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        outs = []
        with torch.inference_mode():
            for _, member in ens.items():
                x = views.to(device, non_blocking=True)
                with amp:
                    outs.append(torch.nn.functional.normalize(member.encode_image(x).float(), dim=-1))
            torch.cat(outs, dim=1).cpu()

    seconds = _time_steps(step, steps, warmup, device)
    members = len(ens.names)
    return {"images_per_s": round(batch_size * steps * members / seconds, 1), "members": members}


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:  # noqa: ANN001 - a callable
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


_THINGS = ("circle", "square", "cat", "dog", "car", "tree", "house", "boat", "bird", "flower")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")


def _write_one_shard(job: tuple[str, int, int, tuple[int, int], int]) -> int:
    """One webdataset tar of smooth random JPEGs (`key.jpg` + `key.txt`); returns the bytes written."""
    from PIL import Image

    path, start, count, (w, h), seed = job
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            rng = np.random.default_rng([seed, i])
            # Low-frequency colour field + mild noise: JPEG sizes and decode times of ordinary photos, not of noise.
            small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            size = (w, h) if i % 3 else (h, w)  # landscape and portrait
            arr = np.asarray(small.resize(size, Image.BICUBIC), dtype=np.int16)
            arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            caption = f"a photo of a {_COLOURS[i % len(_COLOURS)]} {_THINGS[i % len(_THINGS)]} number {i}"
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def write_jpeg_shards(
    root: Path, num_images: int, per_shard: int, size: tuple[int, int], processes: int, seed: int = 0
) -> dict:
    """Write `num_images` synthetic captioned JPEGs as webdataset tars under `root`, one process per shard."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(root / f"in-{k:05d}.tar"), start, min(per_shard, num_images - start), size, seed)
        for k, start in enumerate(range(0, num_images, per_shard))
    ]
    t0 = time.perf_counter()
    # NOTE: fork (fast, no re-import of torch); the children only use numpy and PIL, never CUDA.
    with multiprocessing.get_context("fork").Pool(max(1, min(processes, len(jobs)))) as pool:
        sizes = pool.map(_write_one_shard, jobs)
    return {
        "images": num_images,
        "shards": len(jobs),
        "image_size": list(size),
        "shard_kb_per_image": round(sum(sizes) / num_images / 1024, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run(
    arch: str | None = None,
    num_images: int = 64,
    num_augs: int = 4,
    batch_size: int = 64,
    num_workers: int = 1,
    device: str = "auto",
    threads: int | None = None,
    out_dir: Path = OUT_DIR,
) -> dict:
    """Run both measurements and write the JSON record.

    Args:
        arch: open_clip architecture; None: ViT-L-14 on CUDA, ViT-B-32 on CPU.
        num_images: Images taken from the shapes corpus (one shard).
        num_augs: Augmentations (teacher views) per image.
        batch_size: build-data images per batch (and views per teacher forward).
        num_workers: build-data DataLoader workers.
        device: `auto`, `cpu` or `cuda[:N]`.
        threads: torch CPU threads (None: torch's default).
        out_dir: Where the JSON record is written.
    """
    import open_clip

    from reinforced_data import BuildArgs, CorpusCfg, build_data, write_shapes_corpus

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    arch = arch or ("ViT-L-14" if dev.type == "cuda" else "ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # The default corpus generator and image size, cut to one shard of num_images.
        meta = write_shapes_corpus(
            tmp_path / "corpus", CorpusCfg(n_train=num_images, n_val=1, n_zeroshot_per_class=1, shard_size=num_images)
        )
        shard = str(tmp_path / "corpus" / meta["shards"]["train"][0])
        torch.manual_seed(0)
        model = open_clip.create_model(arch)  # random init: no hub access here
        weights = tmp_path / f"{arch}.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model

        plain = _plain_loop(arch, weights, shard, num_augs, dev)
        summary = build_data(
            out=tmp_path / "ds",
            input=shard,
            teacher=f"open_clip:{arch}@{weights}",
            build=BuildArgs(
                num_augs=num_augs,
                batch_size=batch_size,
                num_workers=num_workers,
                alt_captions=False,
                device=str(dev),
                progress=False,
            ),
        )
    record = {
        "benchmark": "build_data",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "arch": arch,
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "num_images": num_images,
        "num_augs": num_augs,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "plain_loop": plain,
        "build_data": {
            "images": summary["written"],
            "views": summary["written"] * num_augs,
            "images_per_s": summary["images_per_s"],
            "views_per_s": summary["views_per_s"],
            "wall_time_s_incl_model_load": summary["wall_time_s"],
        },
    }
    record["speedup_views_per_s"] = round(record["build_data"]["views_per_s"] / plain["views_per_s"], 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"build_data-{dev.type}-{arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    tmp_file = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp_file.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_file, path)
    record["json"] = str(path)
    _print_table(record)
    return record


def _print_table(r: dict) -> None:
    rows = [("plain loop (1 view / forward)", r["plain_loop"]), ("build-data", r["build_data"])]
    print(
        f"\nteacher {r['arch']} ({r['precision']}) on {r['device_type']} ({r['device']}), "
        f"{r['num_images']} images x {r['num_augs']} augs, torch {r['torch']}, {r['threads']} threads"
    )
    print(f"{'method':32s} {'images/s':>10s} {'views/s':>10s}")
    for name, m in rows:
        print(f"{name:32s} {m['images_per_s']:>10.2f} {m['views_per_s']:>10.2f}")
    print(f"speed-up (views/s): {r['speedup_views_per_s']}x   -> {r['json']}\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    logging.basicConfig(level=logging.WARNING)
    CLI(run, as_positional=False)
