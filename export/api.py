"""``distill export``: turn a trained student into CoreML / ExecuTorch models plus an app bundle.

``export(checkpoint, out, format, args)`` loads the student with ``students.load_student``, prepares its towers
(`export.prepare`), exports every requested format, checks each artifact against PyTorch on fixed inputs, and
writes ``manifest.json``, the CLIP tokenizer files and (optionally) class embeddings next to the models.

Calibration data for int8 (a folder of images, or webdataset ``.tar`` shards) is read with ``mcd_common.tars`` and
viewed with ``mcd_common.images.eval_view``, the evaluation view of training and ``distill eval``.

References: litgpt ``args.py`` (dataclass args with attribute docstrings, flag-named validation);
apple/ml-mobileclip (CoreML packages + iOS app); ExecuTorch XNNPACK delegate.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from export import bundle
from export._report import ExportReport, sha256_path
from mcd_common.errors import UsageError
from mcd_common.images import eval_view
from mcd_common.tars import MemberRef, TarReader, index_tar

_logger = logging.getLogger(__name__)

__all__ = ["ExportArgs", "export", "load_calibration_images", "macs_and_params", "calibration_texts"]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_DEFAULT_CAPTIONS = (
    "a photo of a dog.",
    "a cat sleeping on a sofa.",
    "a red car parked on the street.",
    "two people walking on the beach at sunset.",
    "a plate of food on a wooden table.",
    "a city skyline at night.",
    "a bird sitting on a branch.",
    "a child playing with a ball in the park.",
    "a close-up photo of a flower.",
    "a mountain landscape with snow.",
    "a group of friends smiling.",
    "an airplane flying in the blue sky.",
    "a bowl of fruit.",
    "a man riding a bicycle.",
    "a boat on a lake.",
    "a black and white photo of a building.",
)


@dataclass
class ExportArgs:
    """Options of ``distill export`` (flags ``--args.<name>``)."""

    precision: Literal["fp16", "fp32"] = "fp16"
    """CoreML compute precision (ExecuTorch XNNPACK programs are FP32 unless quantised)."""
    coreml_compression: Literal["none", "palettize2", "palettize4", "palettize6", "palettize8", "int8"] = "none"
    """Also write weight-compressed CoreML packages (k-means palettisation with N bits, or int8 linear)."""
    executorch_backends: list[str] = field(default_factory=lambda: ["xnnpack"])
    """ExecuTorch delegates to lower to: xnnpack (runs here), coreml, mps (skipped where unsupported)."""
    quantize: Literal["none", "int8", "int8_dynamic"] = "none"
    """Also write int8 XNNPACK programs: static PT2E (needs calibration_data) or dynamic (activations at run time)."""
    calibration_data: Path | None = None
    """Images for int8 calibration: a folder of images or of webdataset .tar shards, or one .tar."""
    calibration_size: int = 64
    """Number of calibration images (a seeded sample)."""
    class_names: list[str] | None = None
    """Class names whose normalised text embeddings are precomputed into class_embeddings.json."""
    class_names_file: Path | None = None
    """A text file with one class name per line (added to class_names)."""
    templates: list[str] = field(default_factory=lambda: list(bundle.DEFAULT_TEMPLATES))
    """Prompt templates for the class embeddings; '{}' is replaced by the class name."""
    min_cosine: float = 0.999
    """Parity threshold (cosine vs PyTorch) for FP32/FP16 artifacts; export fails below it."""
    seed: int = 0
    """Seed of the fixed parity inputs and of the calibration sample."""

    def __post_init__(self) -> None:
        known = {"xnnpack", "coreml", "mps"}
        bad = [b for b in self.executorch_backends if b not in known]
        if bad:
            raise ValueError(f"--args.executorch_backends: unknown {bad}; choose from {sorted(known)}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"--args.min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.calibration_size < 1:
            raise ValueError(f"--args.calibration_size must be >= 1, got {self.calibration_size}")
        if self.quantize == "int8" and self.calibration_data is None:
            raise ValueError("--args.quantize int8 needs --args.calibration_data (a folder of images or .tar shards)")
        if self.calibration_data is not None and not Path(self.calibration_data).exists():
            raise ValueError(f"--args.calibration_data: {self.calibration_data} does not exist")
        if self.class_names_file is not None and not Path(self.class_names_file).is_file():
            raise ValueError(f"--args.class_names_file: {self.class_names_file} is not a file")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("--args.templates: every template must contain '{}'")

    def all_class_names(self) -> list[str]:
        """``class_names`` followed by the lines of ``class_names_file`` (blank lines skipped)."""
        names = list(self.class_names or [])
        if self.class_names_file is not None:
            lines = Path(self.class_names_file).read_text(encoding="utf-8").splitlines()
            names += [ln.strip() for ln in lines if ln.strip()]
        return names


# ----------------------------------------------------------------------------------------------------------------------
# Calibration data (mcd_common's tar grouping and image view; reinforced_data is not importable from here)


def _image_sources(path: Path) -> list[tuple[str, Path | MemberRef]]:
    """``(name, where)`` for every image file under ``path`` and every image member of its ``.tar`` shards."""
    path = Path(path)
    if path.is_file():
        files, tars = [], [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_EXTS)
        tars = sorted(path.rglob("*.tar"))
    out: list[tuple[str, Path | MemberRef]] = [(str(f), f) for f in files]
    for t in tars:
        # Samples grouped by mcd_common.tars (headers only); images are read by offset once sampled.
        for sample in index_tar(t):
            for ext, offset, size in sample.members:
                if "." + ext.rsplit(".", 1)[-1] in _IMAGE_EXTS:
                    out.append((f"{t}:{sample.key}.{ext}", MemberRef(str(t), offset, size)))
    return out


def load_calibration_images(
    path: Path, image_size: int, count: int = 64, seed: int = 0, interpolation: str = "bilinear"
) -> list[torch.Tensor]:
    """Read a seeded sample of images as `[1, 3, S, S]` float tensors in [0, 1] (the evaluation view).

    Images are decoded and viewed by `mcd_common.images.eval_view`, exactly as training and evaluation see them.

    Args:
        path: A folder of images (searched recursively), a folder of webdataset ``.tar`` shards, or one ``.tar``.
        image_size: Output size S.
        count: How many images to return (fewer if there are fewer).
        seed: Sampling seed.
        interpolation: ``bilinear`` or ``bicubic`` (the student's resize interpolation).
    """
    items = _image_sources(path)  # names only: files are read for the sampled images alone
    if not items:
        raise UsageError(f"--args.calibration_data: no images ({', '.join(_IMAGE_EXTS)}) found in {path}")
    random.Random(seed).shuffle(items)
    out = []
    with TarReader() as reader:
        for _, where in items[:count]:
            data = reader.read(where) if isinstance(where, MemberRef) else where.read_bytes()
            out.append(eval_view(data, image_size, interpolation).unsqueeze(0).float() / 255.0)
    return out


def calibration_texts(student: Any, class_names: Sequence[str], templates: Sequence[str]) -> list[torch.Tensor]:
    """Token rows `[1, L]` int32 for text-tower calibration: class prompts plus generic captions."""
    # class prompts alone can be as few as two rows: the generic captions keep the activation ranges realistic
    texts = [t.format(c) for c in class_names for t in templates] + list(_DEFAULT_CAPTIONS)
    tokens = student.tokenize(texts).to(torch.int32)
    return [row.unsqueeze(0) for row in tokens]


# ----------------------------------------------------------------------------------------------------------------------
# Model statistics


@torch.no_grad()
def macs_and_params(encoder: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Parameters (plus buffers the program carries) and MACs of one forward (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        encoder(*example)
    params = sum(p.numel() for p in encoder.parameters())
    buffers = sum(b.numel() for b in encoder.buffers())
    return {"params": int(params), "buffers": int(buffers), "macs": int(counter.get_total_flops() // 2)}


def _fixed_inputs(student: Any, image_size: int, context_length: int, seed: int) -> dict[str, list]:
    """Parity inputs: random images in [0, 1] and token rows (synthetic + real sentences)."""
    from export.prepare import example_inputs, vocab_size

    vocab = vocab_size(student.text)
    images, texts = [], []
    for s in range(2):
        img, tok = example_inputs(image_size, context_length, vocab, seed=seed + s)
        images.append((img,))
        texts.append((tok,))
    real = student.tokenize(["a photo of a dog.", "two red apples on a wooden table"]).to(torch.int32)
    texts += [(row.unsqueeze(0),) for row in real]
    return {"image": images, "text": texts}


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def export(
    checkpoint: Path,
    out: Path,
    format: Literal["coreml", "executorch", "all"] = "all",  # noqa: A002 - the CLI flag is --format
    args: ExportArgs = ExportArgs(),  # noqa: B008 - jsonargparse needs the instance to build --args.* flags
) -> dict:
    """Export a trained student for apps: CoreML packages and/or ExecuTorch programs plus an app bundle.

    Args:
        checkpoint: A student directory written by ``students.save_student`` (``<run>/student``) or a Lightning
            ``.ckpt`` from ``distill train``.
        out: Output directory (created); models, ``manifest.json``, tokenizer files and class embeddings go here.
        format: ``coreml``, ``executorch`` or ``all``.
        args: Export options (`ExportArgs`).

    Returns:
        A summary: ``ok`` (False when an FP32/FP16 artifact misses ``args.min_cosine``; everything is still
        written, and the CLI exits with status 1), output paths, one report per artifact, skipped backends,
        parity failures.
    """
    import students
    from export.coreml import export_coreml
    from export.executorch import available_executorch_backends, export_executorch
    from export.prepare import prepare_towers, student_meta

    if format not in ("coreml", "executorch", "all"):
        raise ValueError(f"--format must be coreml, executorch or all, got {format!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint)
    student = students.load_student(checkpoint).eval()
    meta = student_meta(student)
    cfg = getattr(student, "cfg", None)
    name = getattr(cfg, "name", None) or checkpoint.stem
    size, ctx = meta["image_size"], meta["context_length"]
    fixed = _fixed_inputs(student, size, ctx, args.seed)
    examples = {"image": fixed["image"][0], "text": fixed["text"][0]}
    # the reference is the student's own computation: wrapped, folded, NOT rewritten
    ref_image, ref_text = prepare_towers(student, backend="eager", rewrite=False)
    references = {"image": ref_image, "text": ref_text}
    # MACs of what is exported (the rewrites skip work: the text tower's last block runs for one token only);
    # student_macs counts the student's own forward, where FlopCounterMode misses fused attention kernels
    stats = {}
    for tower, enc in zip(("image", "text"), prepare_towers(student, backend="eager"), strict=True):
        stats[tower] = macs_and_params(enc, examples[tower])
        stats[tower]["student_macs"] = macs_and_params(references[tower], examples[tower])["macs"]

    reports: list[ExportReport] = []
    skipped: list[str] = []
    if format in ("executorch", "all"):
        available = available_executorch_backends()
        calib: dict[str, list] = {}
        if args.quantize != "none":
            calib["text"] = [(t,) for t in calibration_texts(student, args.all_class_names(), args.templates)]
            if args.calibration_data is not None:
                images = load_calibration_images(
                    args.calibration_data,
                    size,
                    args.calibration_size,
                    args.seed,
                    getattr(student, "interpolation", "bilinear"),
                )
                calib["image"] = [(x,) for x in images]
        for backend in args.executorch_backends:
            if not available[backend]["lower"]:
                msg = f"executorch {backend}: skipped: {available[backend]['reason']}"
                _logger.warning(msg)
                skipped.append(msg)
                continue
            prep = "coreml" if backend == "coreml" else "xnnpack"  # the CoreML delegate keeps fused layer_norm
            towers = dict(zip(("image", "text"), prepare_towers(student, backend=prep), strict=True))
            for tower, enc in towers.items():
                modes = ["none"] + ([args.quantize] if args.quantize != "none" and backend == "xnnpack" else [])
                for mode in modes:
                    precision = {"none": "fp16" if backend == "coreml" else "fp32"}.get(mode, mode)
                    reports.append(
                        export_executorch(
                            enc,
                            examples[tower],
                            out / f"{tower}_encoder_{backend}_{precision}.pte",
                            tower=tower,
                            backend=backend,  # type: ignore[arg-type]
                            quantize=mode,  # type: ignore[arg-type]
                            calibration=calib.get(tower),
                            reference=references[tower],
                            check_inputs=fixed[tower],
                            min_cosine=args.min_cosine,
                        )
                    )
    if format in ("coreml", "all"):
        towers = dict(zip(("image", "text"), prepare_towers(student, backend="coreml"), strict=True))
        for tower, enc in towers.items():
            variants = ["none"] + ([args.coreml_compression] if args.coreml_compression != "none" else [])
            for comp in variants:
                suffix = args.precision if comp == "none" else f"{args.precision}_{comp}"
                reports.append(
                    export_coreml(
                        enc,
                        examples[tower],
                        out / f"{tower}_encoder_{suffix}.mlpackage",
                        tower=tower,  # type: ignore[arg-type]
                        precision=args.precision,
                        compression=comp,  # type: ignore[arg-type]
                        reference=references[tower],
                        check_inputs=fixed[tower],
                        min_cosine=args.min_cosine,
                    )
                )

    manifest = _manifest(student, name, checkpoint, meta, stats, reports, skipped, out, args)
    classes = args.all_class_names()
    if classes:
        emb = bundle.class_embeddings(student, classes, args.templates)
        manifest["class_embeddings"] = bundle.write_class_embeddings(out, classes, emb, args.templates)
    bundle.write_json(out / bundle.MANIFEST_NAME, manifest)

    failures = [f"{r.path.name}: cosine {r.cosine:.6f}" for r in reports if r.passed is False]
    summary = {
        "ok": not failures,
        "out": str(out),
        "manifest": str(out / bundle.MANIFEST_NAME),
        "student": name,
        "artifacts": [r.to_dict() for r in reports],
        "skipped": skipped,
        "parity_failures": failures,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if failures:
        _logger.error("parity below --args.min_cosine %s: %s (artifacts kept in %s)", args.min_cosine, failures, out)
    return summary


def _manifest(
    student: Any,
    name: str,
    checkpoint: Path,
    meta: dict[str, Any],
    stats: dict[str, dict[str, int]],
    reports: list[ExportReport],
    skipped: list[str],
    out: Path,
    args: ExportArgs,
) -> dict[str, Any]:
    logit_scale = getattr(student, "logit_scale", None)
    artifacts = []
    for r in reports:
        entry = r.to_dict()
        entry["file"] = r.path.name
        del entry["path"]
        entry["sha256"] = sha256_path(r.path)
        size, ctx = meta["image_size"], meta["context_length"]
        if r.tower == "text":
            entry["input"] = {"name": "text", "shape": [1, ctx], "type": "int32 token ids"}
        elif r.format == "coreml":
            entry["input"] = {"name": "image", "shape": [1, 3, size, size], "type": "ImageType RGB 0-255"}
        else:
            entry["input"] = {"name": "image", "shape": [1, 3, size, size], "type": "float32 RGB in [0, 1], NCHW"}
        entry["output"] = {"name": "embedding", "shape": [1, meta["embed_dim"]], "type": "float32, L2-normalised"}
        artifacts.append(entry)
    return {
        "format_version": 1,
        "created": bundle.utc_now(),
        "git_sha": bundle.git_sha(),
        "versions": bundle.versions(),
        "model": {
            "name": name,
            "checkpoint": str(checkpoint.resolve()),
            "image_size": meta["image_size"],
            "mean": meta["mean"],
            "std": meta["std"],
            "interpolation": getattr(student, "interpolation", "bilinear"),
            "resize": "shortest side to image_size, then center crop",
            "context_length": meta["context_length"],
            "embed_dim": meta["embed_dim"],
            "logit_scale": float(logit_scale.exp().item()) if logit_scale is not None else None,
            "towers": stats,
        },
        "tokenizer": bundle.write_tokenizer_files(out) | {"context_length": meta["context_length"]},
        "artifacts": artifacts,
        "skipped": skipped,
        "export_args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")
        },
    }
