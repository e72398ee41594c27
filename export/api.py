"""``distill export``: turn a trained student into CoreML / ExecuTorch / ONNX / Hugging Face models plus an app bundle.

`export` loads the student with ``students.load_student``, prepares its towers (`export.prepare`), runs one
exporter per requested format (the `FORMATS` table: a format is a function from an `ExportJob` to reports),
checks each artifact against PyTorch on fixed inputs, measures what int8 changes, and writes ``manifest.json``,
``export_report.json``, the student's tokenizer files and (optionally) class embeddings next to the models. It
returns a summary whose ``_table`` is what the CLI prints.

Calibration data for int8 (a folder of images, or webdataset ``.tar`` shards) is read with ``mcd_common.tars`` and
viewed with ``mcd_common.images.eval_view``, the evaluation view of training and ``distill eval``.

References: litgpt ``args.py`` (flag-named validation); apple/ml-mobileclip (CoreML packages + iOS app);
ExecuTorch XNNPACK delegate; ONNX Runtime (Mobile); transformers ``CLIPModel``.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from export import bundle
from export._report import ExportReport
from export.coreml import export_coreml
from export.executorch import PteRunner, available_executorch_backends, export_executorch
from export.onnx import OnnxRunner, export_onnx, quantize_onnx
from export.prepare import example_inputs, prepare_towers, student_meta, vocab_size
from export.quality import agreement_delta
from mcd_common import UsageError
from mcd_common.files import atomic_write_json, git_sha, sha256_path
from mcd_common.images import eval_view
from mcd_common.tars import MemberRef, TarReader, index_tar

_logger = logging.getLogger(__name__)

__all__ = [
    "DEPRECATED_FLAGS",
    "FORMATS",
    "ExportJob",
    "ExportOptions",
    "calibration_texts",
    "export",
    "load_calibration_images",
    "macs_and_params",
]

Format = Literal["coreml", "executorch", "onnx", "hf"]
APP_FORMATS: tuple[Format, ...] = ("executorch", "coreml", "onnx")
"""What ``--format all`` writes: the on-device runtimes. ``hf`` (a server/Python format) only on request."""
REPORT_NAME = "export_report.json"

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
_QUALITY_IMAGES = 32  # held-out images (after the calibration sample) for the int8 agreement delta


@dataclass(frozen=True)
class ExportOptions:
    """The validated options of one export (see `export` for what each means)."""

    precision: Literal["fp16", "fp32"]
    coreml_compression: Literal["none", "palettize2", "palettize4", "palettize6", "palettize8", "int8"]
    executorch_backends: tuple[str, ...]
    quantize: Literal["none", "int8", "int8_dynamic"]
    onnx_dynamic_batch: bool
    calibration_data: Path | None
    calibration_size: int
    class_names: tuple[str, ...]
    class_names_file: Path | None
    templates: tuple[str, ...]
    min_cosine: float
    seed: int

    def __post_init__(self) -> None:
        known = {"xnnpack", "coreml", "mps"}
        bad = [b for b in self.executorch_backends if b not in known]
        if bad:
            raise UsageError(f"--executorch_backends: unknown {bad}; choose from {sorted(known)}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"--min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.calibration_size < 1:
            raise UsageError(f"--calibration_size must be >= 1, got {self.calibration_size}")
        if self.quantize == "int8" and self.calibration_data is None:
            raise UsageError("--quantize int8 needs --calibration_data (a folder of images or .tar shards)")
        if self.calibration_data is not None and not Path(self.calibration_data).exists():
            raise UsageError(f"--calibration_data: {self.calibration_data} does not exist")
        if self.class_names_file is not None and not Path(self.class_names_file).is_file():
            raise UsageError(f"--class_names_file: {self.class_names_file} is not a file")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise UsageError("--templates: every template must contain '{}'")

    def all_class_names(self) -> list[str]:
        """``class_names`` followed by the lines of ``class_names_file`` (blank lines skipped)."""
        names = list(self.class_names)
        if self.class_names_file is not None:
            lines = Path(self.class_names_file).read_text(encoding="utf-8").splitlines()
            names += [ln.strip() for ln in lines if ln.strip()]
        return names

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (paths as strings, tuples as lists)."""
        out: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out


# NOTE: the old spellings of `distill export` (a jsonargparse dataclass group named `args`), accepted with a
# deprecation message for one release by distill.cli
DEPRECATED_FLAGS: dict[str, str] = {f"--args.{f.name}": f"--{f.name}" for f in fields(ExportOptions)}


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
        raise UsageError(f"--calibration_data: no images ({', '.join(_IMAGE_EXTS)}) found in {path}")
    random.Random(seed).shuffle(items)
    out = []
    with TarReader() as reader:
        for _, where in items[:count]:
            data = reader.read(where) if isinstance(where, MemberRef) else where.read_bytes()
            out.append(eval_view(data, image_size, interpolation).unsqueeze(0).float() / 255.0)
    return out


def calibration_texts(student: nn.Module, class_names: Sequence[str], templates: Sequence[str]) -> list[torch.Tensor]:
    """Token rows `[1, L]` int32 for text-tower calibration: class prompts plus generic captions."""
    # class prompts alone can be as few as two rows: the generic captions keep the activation ranges realistic
    texts = [t.format(c) for c in class_names for t in templates] + list(_DEFAULT_CAPTIONS)
    tokens = student.tokenize(texts).to(torch.int32)
    return [row.unsqueeze(0) for row in tokens]


@torch.no_grad()
def macs_and_params(encoder: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Parameters (plus buffers the program carries) and MACs of one forward (``torch.utils.flop_counter``)."""
    counter = FlopCounterMode(display=False)
    with counter:
        encoder(*example)
    params = sum(p.numel() for p in encoder.parameters())
    buffers = sum(b.numel() for b in encoder.buffers())
    return {"params": int(params), "buffers": int(buffers), "macs": int(counter.get_total_flops() // 2)}


def _fixed_inputs(student: nn.Module, image_size: int, context_length: int, seed: int) -> dict[str, list]:
    """Parity inputs: random images in [0, 1] and token rows (synthetic + real sentences)."""
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
# One export: the shared state every format reads


@dataclass
class ExportJob:
    """What every format exporter needs: the student, where to write, fixed inputs, references, calibration.

    Attributes:
        student: The loaded student (eval mode; never modified).
        name: Its registry name (or the checkpoint's stem).
        checkpoint: Where it was loaded from.
        out: The output directory.
        meta: `export.prepare.student_meta`.
        options: The validated options.
        fixed: Parity inputs per tower, ``{"image": [(x,)], "text": [(tokens,)]}``.
        references: The student's own towers, folded and wrapped but not rewritten (what artifacts are compared to).
        skipped: Messages of what was not written, and why.
    """

    student: nn.Module
    name: str
    checkpoint: Path
    out: Path
    meta: dict[str, object]
    options: ExportOptions
    fixed: dict[str, list[tuple[torch.Tensor, ...]]]
    references: dict[str, nn.Module]
    skipped: list[str] = field(default_factory=list)

    @property
    def examples(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Batch-1 example inputs per tower (they fix the exported signatures)."""
        return {tower: inputs[0] for tower, inputs in self.fixed.items()}

    def towers(self, backend: str) -> dict[str, nn.Module]:
        """``{"image": enc, "text": enc}`` from `export.prepare.prepare_towers` for ``backend``."""
        return dict(zip(("image", "text"), prepare_towers(self.student, backend=backend), strict=True))

    def skip(self, message: str) -> None:
        """Record (and log) something that was not written."""
        _logger.warning(message)
        self.skipped.append(message)

    @functools.cached_property
    def images(self) -> list[torch.Tensor]:
        """The seeded calibration sample plus up to 32 held-out images (`[1, 3, S, S]` in [0, 1]); [] without data."""
        if self.options.calibration_data is None:
            return []
        count = self.options.calibration_size + _QUALITY_IMAGES
        interpolation = getattr(self.student, "interpolation", "bilinear")
        size = int(self.meta["image_size"])
        return load_calibration_images(self.options.calibration_data, size, count, self.options.seed, interpolation)

    @property
    def calibration_images(self) -> list[tuple[torch.Tensor, ...]]:
        """Image calibration inputs (the first ``calibration_size`` of `images`)."""
        return [(x,) for x in self.images[: self.options.calibration_size]]

    @property
    def held_out_images(self) -> list[torch.Tensor]:
        """Images not used for calibration (the calibration ones when there are no others)."""
        rest = self.images[self.options.calibration_size :]
        return rest or self.images

    @functools.cached_property
    def calibration_texts(self) -> list[tuple[torch.Tensor, ...]]:
        """Text calibration inputs: class prompts plus generic captions."""
        rows = calibration_texts(self.student, self.options.all_class_names(), self.options.templates)
        return [(t,) for t in rows]


def _open_job(checkpoint: Path, out: Path, options: ExportOptions) -> ExportJob:
    """Load the student and build the fixed inputs and references."""
    # NOTE: lazy: students imports open_clip, which imports transformers (heavy; ~1.4 s), kept out of
    # `distill export --help`
    import students

    out.mkdir(parents=True, exist_ok=True)
    student = students.load_student(checkpoint).eval()
    meta = student_meta(student)
    cfg = getattr(student, "cfg", None)
    fixed = _fixed_inputs(student, meta["image_size"], meta["context_length"], options.seed)
    # the reference is the student's own computation: wrapped, folded, NOT rewritten
    ref_image, ref_text = prepare_towers(student, backend="eager", rewrite=False)
    return ExportJob(
        student=student,
        name=getattr(cfg, "name", None) or checkpoint.stem,
        checkpoint=checkpoint,
        out=out,
        meta=meta,
        options=options,
        fixed=fixed,
        references={"image": ref_image, "text": ref_text},
    )


def _tower_stats(job: ExportJob) -> dict[str, dict[str, int]]:
    """Params/MACs of what is exported, and ``student_macs`` of the student's own forward, per tower."""
    # the rewrites skip work (the text tower's last block runs for one token only); FlopCounterMode misses fused
    # attention kernels in the student's own forward, hence both counts
    stats = {}
    for tower, enc in job.towers("eager").items():
        stats[tower] = macs_and_params(enc, job.examples[tower])
        stats[tower]["student_macs"] = macs_and_params(job.references[tower], job.examples[tower])["macs"]
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Formats: one function each, from the job to the reports of what it wrote


def _executorch(job: ExportJob) -> list[ExportReport]:
    opts, reports = job.options, []
    available = available_executorch_backends()
    for backend in opts.executorch_backends:
        if not available[backend]["lower"]:
            job.skip(f"executorch {backend}: skipped: {available[backend]['reason']}")
            continue
        prep = "coreml" if backend == "coreml" else "xnnpack"  # the CoreML delegate keeps fused layer_norm
        for tower, enc in job.towers(prep).items():
            modes = ["none"] + ([opts.quantize] if opts.quantize != "none" and backend == "xnnpack" else [])
            for mode in modes:
                precision = {"none": "fp16" if backend == "coreml" else "fp32"}.get(mode, mode)
                calibration = job.calibration_texts if tower == "text" else job.calibration_images
                reports.append(
                    export_executorch(
                        enc,
                        job.examples[tower],
                        job.out / f"{tower}_encoder_{backend}_{precision}.pte",
                        tower=tower,
                        backend=backend,
                        quantize=mode,
                        calibration=calibration if mode == "int8" else None,
                        reference=job.references[tower],
                        check_inputs=job.fixed[tower],
                        min_cosine=opts.min_cosine,
                    )
                )
    return reports


def _coreml(job: ExportJob) -> list[ExportReport]:
    opts, reports = job.options, []
    for tower, enc in job.towers("coreml").items():
        variants = ["none"] + ([opts.coreml_compression] if opts.coreml_compression != "none" else [])
        for comp in variants:
            suffix = opts.precision if comp == "none" else f"{opts.precision}_{comp}"
            reports.append(
                export_coreml(
                    enc,
                    job.examples[tower],
                    job.out / f"{tower}_encoder_{suffix}.mlpackage",
                    tower=tower,
                    precision=opts.precision,
                    compression=comp,
                    reference=job.references[tower],
                    check_inputs=job.fixed[tower],
                    min_cosine=opts.min_cosine,
                )
            )
    return reports


def _onnx(job: ExportJob) -> list[ExportReport]:
    opts, reports = job.options, []
    for tower, enc in job.towers("eager").items():
        fp32 = export_onnx(
            enc,
            job.examples[tower],
            job.out / f"{tower}_encoder.onnx",
            tower=tower,
            dynamic_batch=opts.onnx_dynamic_batch,
            reference=job.references[tower],
            check_inputs=job.fixed[tower],
            min_cosine=opts.min_cosine,
        )
        reports.append(fp32)
        if opts.quantize == "none":
            continue
        if tower == "image" and not job.calibration_images:
            job.skip("onnx image int8: skipped: static quantisation needs --calibration_data (real images)")
            continue
        precision = "int8_dynamic" if tower == "text" else "int8"
        reports.append(
            quantize_onnx(
                fp32.path,
                job.out / f"{tower}_encoder_{precision}.onnx",
                tower=tower,
                calibration=job.calibration_images if tower == "image" else None,
                reference=job.references[tower],
                check_inputs=job.fixed[tower],
            )
        )
    return reports


def _hf(job: ExportJob) -> list[ExportReport]:
    from export.hf import export_hf  # lazy: export.hf imports open_clip and transformers (heavy)

    return export_hf(
        job.student,
        job.out / "hf",
        meta=job.meta,
        check_inputs=job.fixed,
        source=str(job.checkpoint),
        min_cosine=job.options.min_cosine,
    )


FORMATS: dict[str, Callable[[ExportJob], list[ExportReport]]] = {
    "executorch": _executorch,
    "coreml": _coreml,
    "onnx": _onnx,
    "hf": _hf,
}
"""Format name -> exporter. A new format is one function here (and its module); `export` runs them in order."""


def _resolve_formats(format: Format | Literal["all"] | list[Format]) -> list[str]:  # noqa: A002 - the CLI flag
    names = list(APP_FORMATS) if format == "all" else [format] if isinstance(format, str) else list(format)
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise UsageError(f"--format: unknown {bad or names}; choose from {sorted(FORMATS)} or all")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------------------------
# int8 quality


def _embedder(report: ExportReport) -> Callable[[torch.Tensor], torch.Tensor]:
    if report.format == "onnx":
        return OnnxRunner(report.path)
    return PteRunner(report.path)


def _int8_quality(job: ExportJob, reports: list[ExportReport]) -> dict[str, dict[str, object]]:
    """Per format with int8 artifacts: how often int8 changes the FP32 towers' zero-shot / retrieval answers."""
    out: dict[str, dict[str, object]] = {}
    for fmt in ("executorch", "onnx"):
        int8 = {r.tower: r for r in reports if r.format == fmt and r.precision.startswith("int8") and r.cosine}
        if not int8:
            continue
        reference = dict(job.references)
        test = reference | {tower: _embedder(r) for tower, r in int8.items()}
        names = job.options.all_class_names() or list(_DEFAULT_CAPTIONS)
        prompts = [job.student.tokenize([t.format(c) for t in job.options.templates]).to(torch.int32) for c in names]
        captions = job.student.tokenize(list(_DEFAULT_CAPTIONS)).to(torch.int32)
        images = job.held_out_images or [x for (x,) in job.fixed["image"]]
        if len(job.images) > job.options.calibration_size:
            kind = "held-out"
        else:
            kind = "calibration" if job.images else "random (no --calibration_data)"
        delta = agreement_delta(reference, test, images, captions, prompts)
        entry = {"int8": sorted(r.path.name for r in int8.values()), "images": f"{len(images)} {kind}"} | delta
        for r in int8.values():
            r.quality = entry
        out[fmt] = entry
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def export(
    checkpoint: Path,
    out: Path,
    format: Format | Literal["all"] | list[Format] = "all",  # noqa: A002 - the CLI flag is --format
    precision: Literal["fp16", "fp32"] = "fp16",
    coreml_compression: Literal["none", "palettize2", "palettize4", "palettize6", "palettize8", "int8"] = "none",
    executorch_backends: list[str] | None = None,
    quantize: Literal["none", "int8", "int8_dynamic"] = "none",
    onnx_dynamic_batch: bool = False,
    calibration_data: Path | None = None,
    calibration_size: int = 64,
    class_names: list[str] | None = None,
    class_names_file: Path | None = None,
    templates: list[str] | None = None,
    min_cosine: float = 0.999,
    seed: int = 0,
) -> dict:
    """Export a trained student for apps and servers, with parity checks and an app bundle.

    Args:
        checkpoint: A student directory written by ``students.save_student`` (``<run>/student``) or a Lightning
            ``.ckpt`` from ``distill train``.
        out: Output directory (created); models, ``manifest.json``, ``export_report.json``, tokenizer files and
            class embeddings go here.
        format: ``executorch``, ``coreml``, ``onnx``, ``hf`` (a transformers CLIPModel directory; ViT + transformer
            students only), a list of them (``[onnx,hf]``), or ``all`` (executorch, coreml and onnx).
        precision: CoreML compute precision (ExecuTorch XNNPACK programs and ONNX files are FP32 unless quantised).
        coreml_compression: Also write weight-compressed CoreML packages (k-means palettisation with N bits, or
            int8 linear).
        executorch_backends: ExecuTorch delegates to lower to: xnnpack (runs here), coreml, mps (skipped where
            unsupported). Default: xnnpack.
        quantize: Also write int8 models. ExecuTorch: ``int8`` static PT2E (needs calibration_data) or
            ``int8_dynamic``. ONNX (either value): dynamic int8 text tower, static int8 image tower calibrated on
            calibration_data (skipped without it).
        onnx_dynamic_batch: ONNX inputs get a dynamic batch axis ``batch`` instead of batch 1.
        calibration_data: Images for int8 calibration: a folder of images or of webdataset .tar shards, or one
            .tar. Up to 32 further images measure what int8 changes.
        calibration_size: Number of calibration images (a seeded sample).
        class_names: Class names whose normalised text embeddings are precomputed into class_embeddings.json.
        class_names_file: A text file with one class name per line (added to class_names).
        templates: Prompt templates for the class embeddings; '{}' is replaced by the class name. Default:
            ``a photo of a {}.``.
        min_cosine: Parity threshold (cosine vs PyTorch) for FP32/FP16 artifacts; the export fails below it.
        seed: Seed of the fixed parity inputs and of the calibration sample.

    Returns:
        A summary: ``ok`` (False when an FP32/FP16 artifact misses ``min_cosine``; everything is still written, and
        the CLI exits with status 1), output paths, one report per artifact, skipped items, parity failures, and
        ``_table`` (the short table the CLI prints). The same summary, less the table, is ``export_report.json``.
    """
    t0 = time.perf_counter()
    options = ExportOptions(
        precision=precision,
        coreml_compression=coreml_compression,
        executorch_backends=tuple(executorch_backends or ["xnnpack"]),
        quantize=quantize,
        onnx_dynamic_batch=onnx_dynamic_batch,
        calibration_data=None if calibration_data is None else Path(calibration_data),
        calibration_size=calibration_size,
        class_names=tuple(class_names or ()),
        class_names_file=None if class_names_file is None else Path(class_names_file),
        templates=tuple(templates or bundle.DEFAULT_TEMPLATES),
        min_cosine=min_cosine,
        seed=seed,
    )
    formats = _resolve_formats(format)
    job = _open_job(Path(checkpoint), Path(out), options)
    if "hf" in formats:
        _check_hf(job)  # refuse before spending minutes on the other formats
    reports: list[ExportReport] = []
    for i, name in enumerate(formats, 1):
        _logger.info("[%d/%d] %s", i, len(formats), name)
        reports += FORMATS[name](job)
    quality = _int8_quality(job, reports)
    _write_manifest(job, reports, quality)
    return _summary(job, reports, quality, time.perf_counter() - t0)


def _write_manifest(job: ExportJob, reports: list[ExportReport], quality: dict[str, dict[str, object]]) -> None:
    """``manifest.json`` (and ``class_embeddings.json`` when class names were given) next to the models."""
    manifest = _manifest(job, _tower_stats(job), reports, quality)
    classes = job.options.all_class_names()
    if classes:
        emb = bundle.class_embeddings(job.student, classes, job.options.templates)
        manifest["class_embeddings"] = bundle.write_class_embeddings(job.out, classes, emb, job.options.templates)
    bundle.write_json(job.out / bundle.MANIFEST_NAME, manifest)


def _check_hf(job: ExportJob) -> None:
    from export.hf import require_hf_expressible  # lazy: export.hf imports open_clip and transformers (heavy)

    require_hf_expressible(job.student, str(job.checkpoint))


def _summary(
    job: ExportJob, reports: list[ExportReport], quality: dict[str, dict[str, object]], seconds: float
) -> dict:
    """The returned summary; also written to ``export_report.json``."""
    failures = [f"{r.path.name} ({r.tower}): cosine {r.cosine:.6f}" for r in reports if r.passed is False]
    summary = {
        "ok": not failures,
        "out": str(job.out),
        "manifest": str(job.out / bundle.MANIFEST_NAME),
        "report": str(job.out / REPORT_NAME),
        "student": job.name,
        "artifacts": [r.to_dict() for r in reports],
        "int8_quality": quality,
        "skipped": job.skipped,
        "parity_failures": failures,
        "seconds": round(seconds, 2),
    }
    atomic_write_json(job.out / REPORT_NAME, summary)
    if failures:
        _logger.error(
            "parity below --min_cosine %s: %s (artifacts kept in %s)", job.options.min_cosine, failures, job.out
        )
    return summary | {"_table": format_summary(summary)}


def format_summary(summary: dict) -> str:
    """The short table ``distill export`` prints: one row per artifact, then where everything was written."""
    header = ("artifact", "tower", "precision", "MB", "cosine", "max abs", "checked with")
    rows = []
    for a in summary["artifacts"]:
        cos, diff = a["cosine"], a["max_abs_diff"]
        checked = a["checked_with"] if len(a["checked_with"]) < 40 else a["checked_with"][:37] + "..."
        rows.append(
            (
                Path(a["path"]).name,
                a["tower"],
                a["precision"],
                f"{a['file_size'] / 1e6:.1f}",
                "" if cos is None else f"{cos:.6f}",
                "" if diff is None else f"{diff:.1e}",
                checked + ("" if a["passed"] is not False else "  FAILED"),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]
    for fmt, q in summary["int8_quality"].items():
        delta = q["delta"]
        lines.append(
            f"{fmt} int8 vs fp32 on {q['images']} images: zero-shot agreement {1 + delta.get('zeroshot_top1', 0):.3f}, "
            f"t2i R@1 agreement {1 + delta.get('t2i_R@1', 0):.3f}"
        )
    lines += [f"skipped: {s}" for s in summary["skipped"]]
    lines.append(
        f"{'ok' if summary['ok'] else 'PARITY FAILED'}: {summary['student']} -> {summary['out']} "
        f"(manifest.json, {REPORT_NAME}) in {summary['seconds']:.0f} s"
    )
    return "\n".join(lines)


def _artifact_entry(r: ExportReport, meta: dict[str, object], dynamic_batch: bool) -> dict[str, object]:
    """The manifest entry of one artifact: report, file, checksum, input/output contract."""
    entry = r.to_dict()
    entry["file"] = r.path.name
    del entry["path"]
    entry["sha256"] = sha256_path(r.path)
    size, ctx, dim = meta["image_size"], meta["context_length"], meta["embed_dim"]
    batch = "batch" if r.format == "onnx" and dynamic_batch else 1
    if r.format == "hf":
        entry["input"] = {"name": "pixel_values / input_ids", "type": "CLIPProcessor output (in the directory)"}
        entry["output"] = {"name": f"get_{r.tower}_features(...).pooler_output", "shape": ["batch", dim]}
        return entry
    if r.tower == "text":
        entry["input"] = {"name": "text", "shape": [batch, ctx], "type": "int32 token ids"}
    elif r.format == "coreml":
        entry["input"] = {"name": "image", "shape": [1, 3, size, size], "type": "ImageType RGB 0-255"}
    else:
        entry["input"] = {"name": "image", "shape": [batch, 3, size, size], "type": "float32 RGB in [0, 1], NCHW"}
    entry["output"] = {"name": "embedding", "shape": [batch, dim], "type": "float32, L2-normalised"}
    return entry


def _manifest(
    job: ExportJob,
    stats: dict[str, dict[str, int]],
    reports: list[ExportReport],
    quality: dict[str, dict[str, object]],
) -> dict[str, object]:
    meta, student = job.meta, job.student
    logit_scale = getattr(student, "logit_scale", None)
    return {
        "format_version": 1,
        "created": bundle.utc_now(),
        "git_sha": git_sha(),
        "versions": bundle.versions(),
        "model": {
            "name": job.name,
            "checkpoint": str(job.checkpoint.resolve()),
            "image_size": meta["image_size"],
            "mean": meta["mean"],
            "std": meta["std"],
            "interpolation": getattr(student, "interpolation", "bilinear"),
            "resize": "shortest side to image_size, then center crop",
            "context_length": meta["context_length"],
            "embed_dim": meta["embed_dim"],
            "logit_scale": float(logit_scale.exp().item()) if logit_scale is not None else None,
            "towers": stats,
            "caption_decoder": "PyTorch only (not exported)" if hasattr(student, "text_decoder") else None,
        },
        "tokenizer": bundle.write_student_tokenizer(job.out, student, meta["context_length"]),
        "artifacts": [_artifact_entry(r, meta, job.options.onnx_dynamic_batch) for r in reports],
        "int8_quality": quality,
        "skipped": job.skipped,
        "export_args": job.options.to_dict(),
    }
