"""`distill build-data`: write a reinforced (DataCompDR-layout) dataset from images and captions.

For every input image the builder samples `num_augs` augmentation records, replays each at every teacher's
resolution, stores the teachers' image embeddings of those views, the embeddings of the real caption and of
`num_syn` synthetic captions per captioner, and writes one output tar per input shard (schema in `schema.py`).
This follows RayGen (apple/ml-mobileclip-dr `scripts/gen.py`, embedding + caption modes) and MobileCLIP's
DataCompDR (Vasu et al., CVPR'24), without Ray, and fixes its batching bug (apple/ml-mobileclip-dr#3: samples
past the first batch of a shard lost their embeddings): each sample's embeddings travel with the sample.

Design:
- one rank per process (torchrun/SLURM env); no coordinator. Every input is planned first (`_plan.py`: unreadable
  inputs, duplicate uids, input digests), then each process builds the shards it can lock, its own
  (`index % world == rank`) first, then any other still unbuilt (`_outdir.py`: locks, identity, sidecars). A
  finished shard is a renamed tar plus a sidecar `_progress/<shard>.json`, and `manifest.jsonl` is rebuilt
  idempotently from the sidecars by whichever process finishes;
- a dataset has one identity (`_identity`: inputs, split and captions files, teachers and captioners with the
  checksums of their weights, every option that changes the bytes written); a rerun with other arguments is
  refused with the differing keys, or rebuilds from scratch with `--overwrite`;
- one unreadable input shard fails alone: it is named in the summary, every other shard is built, the summary says
  `ok: false` (exit code 1), and a rerun retries only what failed;
- decoding and augmentation replay run in DataLoader workers, one task per batch of a shard, in order;
- teachers run batched under `torch.inference_mode()`, in bf16 autocast on CUDA (open_clip attention uses SDPA);
- records come from a per-view generator `(seed, uid, aug index)`, so outputs do not depend on worker count.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import teachers
from mcd_common.deprecation import renamed_kwargs
from mcd_common.errors import UsageError
from mcd_common.files import atomic_write_json, sha256_bytes, sha256_file
from mcd_common.images import ImageDecodeError, center_view, decode_image, to_uint8_tensor
from mcd_common.tars import TarReader
from reinforced_data import _outdir, schema
from reinforced_data._io import TarShardWriter, encode_npz
from reinforced_data._outdir import rebuild_manifest, shard_name
from reinforced_data._plan import ShardPlan, plan_inputs
from reinforced_data.augment import AugmentCfg, record_rng, replay, sample_record
from reinforced_data.shapes import DEFAULT_CORPUS_DIR
from reinforced_data.sources import (
    InputShard,
    InputStats,
    SampleRef,
    check_caption,
    index_shard,
    read_sample,
    resolve_inputs,
)
from reinforced_data.verify import verify_dataset
from reinforced_data.workers import init_worker

__all__ = ["DEPRECATED_FLAGS", "BuildArgs", "InputArgs", "build_data", "dist_env", "rebuild_manifest", "shard_name"]

_logger = logging.getLogger(__name__)

_MAX_LISTED_SKIPS = 100  # skipped uids listed per sidecar; the counts are always complete


@dataclass
class BuildArgs:
    """Options of `distill build-data` (the `--build.*` group)."""

    num_augs: int = 10
    """Augmentations per image: records in `paug.json` and rows of `image_emb` (DataCompDR-1B: 10, -12M: 30)."""
    num_syn: int = 5
    """Synthetic captions per image and captioner (DataCompDR: 5)."""
    batch_size: int = 256
    """Images per batch; teacher forwards run on chunks of this many views."""
    num_workers: int = 2
    """DataLoader worker processes decoding and replaying augmentations (0: in the main process)."""
    seed: int = 0
    """Root seed of the augmentation records (per view: (seed, uid, aug index)) and of caption sampling."""
    crop_size: int | None = None
    """Size the records are sampled for (sets RandAugment translate pixels and the config's crop size);
    null: the largest teacher resolution (224 for ViT-L/14 teachers, as DataCompDR)."""
    scale_min: float = 0.08
    """Smallest RandomResizedCrop area fraction."""
    scale_max: float = 1.0
    """Largest RandomResizedCrop area fraction."""
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    """Resize filter of the crop when replaying views for the teachers."""
    rand_augment: bool = True
    """Add RandAugment (2 ops, magnitude 9 of 31) to each record."""
    magnitude: int = 9
    """RandAugment magnitude bin (of 31)."""
    hflip: bool = False
    """Add a random horizontal flip to each record (DataCompDR does not flip)."""
    top_p: float = 0.9
    """Nucleus-sampling mass of the captioners."""
    keep_images: bool = True
    """Store the original image bytes (`jpg`); false keeps only `url.txt` (as the published DataCompDR)."""
    alt_captions: bool = True
    """When an image has several real captions (flickr8k, the shapes corpus), store the others under
    `syn.json["alt_text"]` with their embeddings. Our trainer samples them like synthetic captions
    (`--data.use_syn`); Apple's trainer ignores them (its default key regex `^syn_text.*$` does not match)."""
    teacher_views: Literal["replay", "resize"] = "replay"
    """How each teacher of a mixed-resolution ensemble sees a view. `replay`: the record is replayed at each
    teacher's own resolution, an exact crop per teacher (the pixels a student replaying the record at that size
    gets). `resize`: Apple's RayGen (apple/ml-mobileclip-dr `scripts/gen.py`): replayed once at `crop_size`, then
    bicubic-resized (`F.interpolate`, no antialias) for each teacher whose size differs, chained in ensemble
    order, for embeddings that match a dataset RayGen wrote (up to float rounding)."""
    shard_size: int = 1000
    """Images per shard when the input is an image folder (tar inputs keep their shards)."""
    max_pixels: int | None = 89_478_485
    """Skip images with more pixels than this (PIL's decompression-bomb limit); null disables the check."""
    max_shards: int | None = None
    """Only process the first N input shards (quick trials)."""
    device: str = "auto"
    """Torch device; auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Teacher/captioner compute precision; auto: bf16 autocast on CUDA, fp32 on CPU."""
    channels_last: bool = True
    """Convert the models to channels-last memory format on CUDA (faster convolutional stems)."""
    progress: bool = True
    """Show a progress bar (images/s and ETA)."""

    def __post_init__(self) -> None:
        if self.num_augs < 1:
            raise UsageError(f"--build.num_augs must be >= 1, got {self.num_augs}")
        if self.num_syn < 0:
            raise UsageError(f"--build.num_syn must be >= 0, got {self.num_syn}")
        if self.batch_size < 1:
            raise UsageError(f"--build.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UsageError(f"--build.num_workers must be >= 0, got {self.num_workers}")
        if self.crop_size is not None and self.crop_size < 8:
            raise UsageError(f"--build.crop_size must be >= 8 (or null), got {self.crop_size}")
        if not 0.0 < self.scale_min <= self.scale_max <= 1.0:
            raise UsageError(
                f"--build.scale_min/--build.scale_max must satisfy 0 < min <= max <= 1, "
                f"got {self.scale_min}, {self.scale_max}"
            )
        if not 0 <= self.magnitude < 31:
            raise UsageError(f"--build.magnitude must be in [0, 30], got {self.magnitude}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--build.top_p must be in (0, 1], got {self.top_p}")
        if self.shard_size < 1:
            raise UsageError(f"--build.shard_size must be >= 1, got {self.shard_size}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError(f"--build.max_pixels must be >= 1 (or null), got {self.max_pixels}")
        if self.max_shards is not None and self.max_shards < 1:
            raise UsageError(f"--build.max_shards must be >= 1 (or null), got {self.max_shards}")


@dataclass
class InputArgs:
    """The images and captions to reinforce (the `--data.*` group: the same names as `distill train`'s data)."""

    path: str | None = None
    """Webdataset tars (brace patterns, globs, `a::b` lists, or a directory of tars), an image folder (with
    `captions`), a directory holding `images/` + `captions.csv` (flickr8k), or null for the embedded shapes corpus
    (its train split)."""
    captions: str | None = None
    """Captions file of an image folder: CSV `image,caption` (several rows per image allowed) or JSONL."""
    split_file: str | None = None
    """Images to keep, one name per line (e.g. flickr8k splits/train.txt)."""
    corpus_dir: str = DEFAULT_CORPUS_DIR
    """Where the embedded shapes corpus is generated when `path` is null."""


# NOTE: the old spellings (top-level --input/--captions/--split_file, --build.corpus_dir), accepted for one release by
# distill.cli (flags and --config keys); `build_data(input=...)` and the others by `renamed_kwargs`.
DEPRECATED_FLAGS: dict[str, str] = {
    "--input": "--data.path",
    "--captions": "--data.captions",
    "--split_file": "--data.split_file",
    "--build.corpus_dir": "--data.corpus_dir",
}


def dist_env() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or SLURM
    (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) variables; `(0, 1, 0)` when neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"bad distributed environment: rank {rank}, world size {world}")
    return rank, world, local


# --------------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Task:
    """One batch of one shard, decoded and augmented by a DataLoader worker."""

    shard: int
    kind: Literal["tar", "folder"]
    path: str
    batch: int
    num_batches: int
    refs: tuple[SampleRef, ...]
    error: str | None = None
    """The shard cannot be built (its input changed or became unreadable after planning)."""


@dataclass
class _Sample:
    """One input sample that survived validation, with its augmentation records (what a shard stores)."""

    uid: str
    image: bytes
    caption: str
    alt: list[str]
    """The image's other real captions (distinct, normalised), when `alt_captions` is on."""
    url: str | None
    meta: dict[str, object]
    records: list[list]
    size: tuple[int, int]
    """`(width, height)` of the decoded image."""

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.image)


@dataclass
class _Batch:
    """A worker's output for one task: surviving samples, `(uid, reason)` skips and uint8 views.

    `views[size]` is `[n * K, 3, S, S]` (sample-major: all K views of sample 0 first); `cap_views[size]` is
    `[n, 3, S, S]`, the captioners' centre views.
    """

    task: _Task
    samples: list[_Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    views: dict[int, torch.Tensor] = field(default_factory=dict)
    cap_views: dict[int, torch.Tensor] = field(default_factory=dict)
    error: str | None = None
    """Reading the shard failed (its whole shard is then a failed input)."""


class _ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over `_Task`s: reads, validates and decodes samples, samples records, replays views."""

    def __init__(
        self,
        aug: AugmentCfg,
        num_augs: int,
        seed: int,
        view_sizes: tuple[int, ...],
        caption_sizes: tuple[int, ...],
        max_pixels: int | None,
        alt_captions: bool,
    ) -> None:
        self.aug = aug
        self.num_augs = num_augs
        self.seed = seed
        self.view_sizes = view_sizes
        self.caption_sizes = caption_sizes
        self.max_pixels = max_pixels
        self.alt_captions = alt_captions
        self.layout = aug.record_layout()
        self._reader = TarReader()  # one open tar per worker, reused across the batches of a shard

    def __len__(self) -> int:  # tasks come from the sampler; the length is unused
        return 0

    def close(self) -> None:
        """Close the cached tar handles (the in-process dataset of `num_workers=0`)."""
        self._reader.close()

    def __getitem__(self, task: _Task) -> _Batch:
        if task.error is not None:
            return _Batch(task, error=task.error)
        try:
            return self._views(task)
        except (OSError, tarfile.TarError) as exc:
            # NOTE: an input that fails mid-read fails alone (the main side drops its partial shard).
            return _Batch(task, error=f"{task.path}: {exc}")

    def _views(self, task: _Task) -> _Batch:
        shard = InputShard(index=task.shard, name="", kind=task.kind, path=task.path)
        batch = _Batch(task)
        views: dict[int, list[torch.Tensor]] = {s: [] for s in self.view_sizes}
        cap_views: dict[int, list[torch.Tensor]] = {s: [] for s in self.caption_sizes}
        for ref in task.refs:
            sample = self._prepare(shard, ref, batch.skipped)
            if sample is None:
                continue
            img = decode_image(sample.image, self.max_pixels)
            for size in self.view_sizes:
                views[size].extend(
                    to_uint8_tensor(replay(img, rec, size, self.aug.interpolation, self.layout))
                    for rec in sample.records
                )
            for size in self.caption_sizes:
                cap_views[size].append(to_uint8_tensor(center_view(img, size, "bicubic")))
            batch.samples.append(sample)
        batch.views = {s: torch.stack(v) for s, v in views.items() if v}
        batch.cap_views = {s: torch.stack(v) for s, v in cap_views.items() if v}
        return batch

    def _prepare(self, shard: InputShard, ref: SampleRef, skipped: list[tuple[str, str]]) -> _Sample | None:
        """Read and validate one sample and sample its records; a skip is appended to `skipped` (None returned)."""
        raw = read_sample(shard, ref, self._reader)
        reason, caption = check_caption(raw.caption)
        if raw.error is not None:
            reason = raw.error
        elif raw.image is None:
            reason = "no_image"
        if reason is not None:
            skipped.append((raw.uid, reason))
            return None
        try:
            img = decode_image(raw.image, self.max_pixels)
        except ImageDecodeError as exc:
            skipped.append((raw.uid, exc.reason))
            return None
        records = [
            sample_record(img.width, img.height, record_rng(self.seed, raw.uid, k), self.aug)
            for k in range(self.num_augs)
        ]
        alt: list[str] = []
        if self.alt_captions:
            for c in raw.captions:
                skip_reason, text = check_caption(c)
                if skip_reason is None and text != caption and text not in alt:
                    alt.append(text)
        return _Sample(raw.uid, raw.image, caption, alt, raw.url, raw.meta, records, (img.width, img.height))


def _as_is(x: _Batch) -> _Batch:
    return x


# ----------------------------------------------------------------------------------------------------- main side


def _weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict tensor's name, dtype, shape and bytes, in name order.

    What a teacher or captioner computes, wherever its weights came from (a `--teacher_weights` file, a hub cache,
    a `local-dir:` directory, an open_clip tag): hashing the loaded tensors costs about a second per GB, once per
    run, and also covers sources that are not one file.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, whatever the dtype (bf16 too)
    return h.hexdigest()


def _teach_meta(ens: teachers.TeacherEnsemble, aug: AugmentCfg) -> dict:
    members = []
    for name, t in ens.items():
        cfg = t.cfg
        members.append(
            {
                "name": name,
                "source": cfg.source,
                "arch": cfg.arch,
                "pretrained": cfg.pretrained,
                "weights": cfg.weights.file if cfg.weights is not None else None,
                "weights_sha256": _weights_sha256(t),
                "dim": int(t.embed_dim),
                "logit_scale": float(t.logit_scale),
                "learned_logit_scale": t.learned_logit_scale,
                "image_size": int(t.image_size),
                "mean": [float(v) for v in cfg.mean],
                "std": [float(v) for v in cfg.std],
                "interpolation": t.interpolation,
                "context_length": int(t.context_length),
                "normalized": True,
            }
        )
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "dr_version": 1,
        "ensemble": ens.name,
        "teachers": members,
        "aug_crop": aug.crop_size,
        "view_interpolation": aug.interpolation,
    }


def _dr_config(teach: dict, aug: AugmentCfg, args: BuildArgs, identity: dict) -> dict:
    """`config.json`: Apple's keys (`model_name`, `pretrained`, `num_samples`, `reinforce`) and our identity."""
    first = teach["teachers"][0]
    image_aug = aug.to_dr_config()
    # NOTE: Apple's loader deletes `normalize` and substitutes the student's; it must exist.
    image_aug["normalize"] = {"mean": first["mean"], "std": first["std"]}
    return {
        "model_name": ",".join(t["arch"] for t in teach["teachers"]),
        "pretrained": ",".join(t["pretrained"] or "N/A" for t in teach["teachers"]),
        "num_samples": args.num_augs,
        "reinforce": {"image_augmentation": image_aug},
        "build": identity,
    }


def _identity(
    teach: dict,
    args: BuildArgs,
    captioners: list[teachers.Captioner],
    shards: list[InputShard],
    input: str | None,
    inputs: InputStats,
    split_file: Path | None,
    precision: str,
) -> dict:
    """The `build` block of `config.json`: everything besides `num_samples` / `reinforce` that changes the bytes
    written. A rerun resumes only when it is equal (`_outdir.prepare_out`); each shard's input content is checked
    per shard (`_plan.py` digests). Worker count, device and channels-last are left out: they change no bytes
    beyond float rounding of the GPU kernels."""
    folder = any(s.kind == "folder" for s in shards)
    names = "\n".join(s.name for s in shards)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "teacher": teach["ensemble"],
        "teacher_dims": {t["name"]: t["dim"] for t in teach["teachers"]},
        "teacher_weights_sha256": {t["name"]: t["weights_sha256"] for t in teach["teachers"]},
        "captioners": [
            {"name": c.name, "syn_key": c.syn_key, "weights_sha256": _weights_sha256(c)} for c in captioners
        ],
        "num_syn": args.num_syn if captioners else 0,
        "top_p": args.top_p,
        "seed": args.seed,
        "keep_images": args.keep_images,
        "alt_captions": args.alt_captions,
        "teacher_views": args.teacher_views,
        "max_pixels": args.max_pixels,
        # NOTE: caption sampling is seeded per batch, and teacher forwards run per batch.
        "batch_size": args.batch_size,
        "precision": precision,
        "shard_size": args.shard_size if folder else None,
        "input": None if input is None else str(input),
        "num_input_shards": len(shards),
        "inputs_sha256": hashlib.sha256(names.encode()).hexdigest(),
        "captions_sha256": sha256_file(inputs.captions_file) if folder and inputs.captions_file else None,
        "split_file_sha256": sha256_file(split_file) if folder and split_file is not None else None,
    }


def _precision(spec: str, device: torch.device) -> Literal["bf16", "fp32"]:
    """`--build.precision` resolved: auto is bf16 autocast on CUDA, fp32 elsewhere."""
    return "bf16" if spec == "bf16" or (spec == "auto" and device.type == "cuda") else "fp32"


class _Encoder:
    """Batched teacher / captioner inference on one device, and the shard members of an encoded batch."""

    def __init__(
        self,
        ens: teachers.TeacherEnsemble,
        captioners: list[teachers.Captioner],
        device: torch.device,
        args: BuildArgs,
        teach_bytes: bytes,
    ) -> None:
        self.ens = ens
        self.captioners = captioners
        self.syn_keys = [c.syn_key for c in captioners]
        self.device = device
        self.chunk = args.batch_size
        self.args = args
        self.teach_bytes = teach_bytes
        bf16 = _precision(args.precision, device) == "bf16"
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        )

    def images(self, views: dict[int, torch.Tensor]) -> torch.Tensor:
        """`{size: uint8 [N, 3, S, S]}` -> `[N, sum(D)]` float32, each teacher slice re-normalised in fp32."""
        if self.args.teacher_views == "resize":
            return self._resized_images(views[max(views)])
        outs = []
        for _, member in self.ens.items():
            px = views[member.image_size]
            feats = []
            for start in range(0, px.shape[0], self.chunk):
                x = px[start : start + self.chunk].to(self.device, non_blocking=True)
                with self.autocast():
                    feats.append(member.encode_image(x).float())
            outs.append(torch.nn.functional.normalize(torch.cat(feats), dim=-1))
        return torch.cat(outs, dim=1).cpu()

    def _resized_images(self, px: torch.Tensor) -> torch.Tensor:
        """RayGen's ensemble views: one view at the crop size, bicubic-resized from teacher to teacher."""
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in self.ens.names}
        for start in range(0, px.shape[0], self.chunk):
            x = px[start : start + self.chunk].to(self.device, non_blocking=True).float() / 255.0
            for name, member in self.ens.items():
                size = member.image_size
                if x.shape[-1] != size:
                    # NOTE: chained as RayGen does: each resize starts from the previous teacher's view.
                    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic")
                with self.autocast():
                    feats[name].append(member.encode_image(x).float())
        outs = [torch.nn.functional.normalize(torch.cat(f), dim=-1) for f in feats.values()]
        return torch.cat(outs, dim=1).cpu()

    def texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> `[N, sum(D)]` float32."""
        outs = []
        for _, member in self.ens.items():
            feats = []
            for start in range(0, len(texts), self.chunk):
                with self.autocast():
                    feats.append(member.encode_texts(texts[start : start + self.chunk]).float())
            outs.append(torch.nn.functional.normalize(torch.cat(feats), dim=-1))
        return torch.cat(outs, dim=1).cpu()

    def captions(self, cap_views: dict[int, torch.Tensor], seed: int) -> list[list[list[str]]]:
        """Per captioner, per image, up to `num_syn` captions."""
        out = []
        for cap in self.captioners:
            px = cap_views[cap.image_size]
            per_image: list[list[str]] = []
            for start in range(0, px.shape[0], self.chunk):
                with self.autocast():
                    per_image.extend(
                        cap.generate(
                            px[start : start + self.chunk].to(self.device, non_blocking=True),
                            self.args.num_syn,
                            seed=seed + start,
                            top_p=self.args.top_p,
                        )
                    )
            out.append(per_image)
        return out

    def syn_docs(self, batch: _Batch) -> list[dict[str, list[str]]]:
        """Per sample, its `syn.json` dict (captioners, then the other real captions; see `schema`).

        A sample without synthetic captions gets the `syn_text_gt` placeholder (its real caption), the key Apple's
        loader needs to read the sample.
        """
        generated = self.captions(batch.cap_views, _batch_seed(self.args.seed, batch.task.shard, batch.task.batch))
        docs = []
        for i, s in enumerate(batch.samples):
            doc = {key: caps_i[i] for key, caps_i in zip(self.syn_keys, generated, strict=True) if caps_i[i]}
            if not doc:
                doc[schema.GT_PLACEHOLDER_KEY] = [s.caption]
            if s.alt:
                doc[schema.ALT_KEY] = s.alt
            docs.append(doc)
        return docs

    def encode(self, batch: _Batch) -> list[tuple[str, dict[str, bytes]]]:
        """`(uid, shard members)` of every sample of a batch, embeddings included."""
        samples = batch.samples
        n, k = len(samples), self.args.num_augs
        # [n * K, sum(D)] -> [n, K, sum(D)]: views are sample-major (all K views of sample 0 first)
        image_emb = self.images(batch.views).reshape(n, k, -1).numpy()
        syn_docs = self.syn_docs(batch)
        # One text forward for every caption of the batch: real captions first, then each sample's syn lists
        # (the placeholder reuses the real caption's row).
        encoded = [(k, caps) for doc in syn_docs for k, caps in doc.items() if k != schema.GT_PLACEHOLDER_KEY]
        texts = [s.caption for s in samples] + [c for _, caps in encoded for c in caps]
        text_emb = self.texts(texts).numpy()
        out = []
        offset = n
        for i, s in enumerate(samples):
            emb = {
                schema.IMAGE_EMB: image_emb[i].astype(np.float16),
                schema.TEXT_EMB: text_emb[i : i + 1].astype(np.float16),
            }
            for key, caps in syn_docs[i].items():
                if key == schema.GT_PLACEHOLDER_KEY:
                    emb[schema.syn_emb_name(key)] = emb[schema.TEXT_EMB]
                    continue
                emb[schema.syn_emb_name(key)] = text_emb[offset : offset + len(caps)].astype(np.float16)
                offset += len(caps)
            out.append((s.uid, _sample_members(s, syn_docs[i], emb, self.teach_bytes, self.args.keep_images)))
        return out


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/caption/{shard}/{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(spec)


def _sample_members(
    sample: _Sample, syn: dict[str, list[str]], emb: dict[str, np.ndarray], teach_bytes: bytes, keep_images: bool
) -> dict[str, bytes]:
    meta = {k: v for k, v in sample.meta.items() if k not in ("uid", "sha256", "captions")}
    doc: dict[str, object] = {
        "uid": sample.uid,
        "sha256": sample.sha256,
        "width": sample.size[0],
        "height": sample.size[1],
    }
    doc.update({k: v for k, v in meta.items() if k not in doc})
    if sample.alt:
        doc["captions"] = [sample.caption, *sample.alt]
    members: dict[str, bytes] = {}
    if keep_images:
        members[schema.KEY_IMAGE] = sample.image
    if sample.url:
        members[schema.KEY_URL] = sample.url.encode()
    members[schema.KEY_TXT] = sample.caption.encode()
    members[schema.KEY_JSON] = json.dumps(doc, ensure_ascii=False).encode()
    members[schema.KEY_SYN] = json.dumps(syn, ensure_ascii=False).encode()
    members[schema.KEY_PAUG] = json.dumps({"param_aug": sample.records}).encode()
    members[schema.KEY_NPZ] = encode_npz(emb)
    members[schema.KEY_TEACH] = teach_bytes
    return members


class _ShardOut:
    """One output shard being written: its tar, the uids it holds and what it skipped (its sidecar's content)."""

    def __init__(self, out: Path, plan: ShardPlan) -> None:
        self.out, self.plan, self.index = out, plan, plan.shard.index
        self.path = out / shard_name(self.index)
        self.writer = TarShardWriter(self.path)
        self.skips: Counter[str] = Counter()
        self.skipped_uids: list[list[str]] = []
        self.uids: set[str] = set()
        for uid in plan.duplicate_uids:
            self.skip(uid, "duplicate_uid")

    def skip(self, uid: str, reason: str) -> None:
        """Count a sample that is not written (every skip is counted; the first few uids are listed)."""
        self.skips[reason] += 1
        if len(self.skipped_uids) < _MAX_LISTED_SKIPS:
            self.skipped_uids.append([uid, reason])

    def add(self, uid: str, members: dict[str, bytes]) -> None:
        """Write a sample; a uid already in this shard is skipped as `duplicate_uid` (the first one stays)."""
        # NOTE: the plan already left out every repeated uid; this guards what sanitising keys could still merge.
        if uid in self.uids:
            self.skip(uid, "duplicate_uid")
            return
        self.uids.add(uid)
        self.writer.write(uid, members)

    def finish(self, rank: int, batch_size: int) -> tuple[int, Counter[str]]:
        """Close the tar, write its sidecar; returns `(samples written, skips)`."""
        self.writer.close()
        sidecar = {
            "shard": shard_name(self.index),
            "input": self.plan.shard.name,
            "input_digest": self.plan.digest,
            "num_samples": self.writer.count,
            "sha256": sha256_file(self.path),
            "bytes": self.path.stat().st_size,
            "skipped": dict(sorted(self.skips.items())),
            "skipped_uids": self.skipped_uids,
            "rank": rank,
            "batch_size": batch_size,
        }
        atomic_write_json(_outdir.sidecar_path(self.out, self.index), sidecar)
        _outdir.clear_failure(self.out, self.index)
        return self.writer.count, self.skips

    def abort(self) -> None:
        """Drop the partial tar (a killed or failed run rebuilds the shard from scratch)."""
        self.writer.abort()


@dataclass
class _Totals:
    """What this process did in this run."""

    written: int = 0
    shards_done: int = 0
    finished_elsewhere: int = 0
    """Shards another process finished between this one's planning and its turn."""
    skipped: Counter[str] = field(default_factory=Counter)
    failed: list[dict[str, str]] = field(default_factory=list)
    """`{shard, input, error}` of every input that could not be read."""

    def fail(self, out: Path, plan: ShardPlan, error: str, rank: int) -> None:
        """Count a failed input and leave its `_progress/<shard>.failed.json` (call holding the shard's lock)."""
        _logger.error("input shard %d (%s) failed, not built: %s", plan.shard.index, plan.shard.name, error)
        _outdir.record_failure(out, plan.shard.index, plan.shard.name, error, rank)
        self.failed.append({"shard": shard_name(plan.shard.index), "input": plan.shard.name, "error": error})


@renamed_kwargs({"input": "data.path", "captions": "data.captions", "split_file": "data.split_file"})
def build_data(
    out: Path | None = None,
    data: InputArgs = InputArgs(),  # noqa: B008 - jsonargparse/litgpt dataclass-group default, never mutated
    teacher: str | None = None,
    captioner: str | None = None,
    build: BuildArgs = BuildArgs(),  # noqa: B008 - jsonargparse/litgpt dataclass-group default, never mutated
    verify: Path | None = None,
    teacher_weights: Path | None = None,
    captioner_weights: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Build a reinforced dataset (DataCompDR layout), or check one with `--verify DIR`.

    Resumable: finished shards are kept, partial ones (a killed run) are rebuilt from scratch with the same
    records, so a restarted run gives the dataset an uninterrupted one would. A rerun with other arguments (or
    other teacher/captioner weights) is refused, naming what differs. Under torchrun or SLURM, and for several
    processes on one `--out`, each process builds the shards it can lock. An unreadable input shard fails alone
    (the summary's `ok` is false, exit code 1); a rerun retries it.

    Args:
        out: Output dataset directory.
        data: Input images and captions (`--data.path`, `--data.captions`, `--data.split_file`, as in `distill
            train`); with no `--data.path`, the embedded shapes corpus (train split).
        teacher: Teacher name (registered, `open_clip:ARCH@TAG_OR_FILE`, `local-dir:PATH`, `hf:ID_OR_DIR`) or a
            comma-separated ensemble; embeddings are stored in this slice order.
        captioner: Captioner name(s), comma-separated for several (one `syn_text_<tag>` key each); null writes
            no synthetic captions.
        build: Builder options.
        verify: Check an existing dataset directory instead of building (exits non-zero on any problem).
        teacher_weights: Local weights file for a registered (hub) teacher, e.g. a downloaded open_clip checkpoint.
        captioner_weights: Local weights file or directory for a registered (hub) captioner.
        overwrite: Delete the dataset already in `--out` (its shards, sidecars and root files; nothing else) and
            build from scratch, instead of refusing one built with other arguments.

    Returns:
        A summary: `ok`, counts (written, skipped by reason, shards done/resumed/busy/failed, failed inputs,
        captions-file rows not used), images/s, wall time; with --verify, the verification report.
    """
    if verify is not None:
        report = verify_dataset(verify)
        if not report["ok"]:
            for problem in report["problems"]:
                _logger.error("verify: %s", problem)
            raise SystemExit(f"verify {verify}: {len(report['problems'])} problem(s), first: {report['problems'][0]}")
        return report
    if out is None:
        raise UsageError("--out is required to build a dataset (or pass --verify DIR)")
    if teacher is None:
        raise UsageError("--teacher is required to build a dataset (e.g. --teacher vit_l14.openai)")
    out = Path(out).expanduser()
    _outdir.check_out_dir(out)  # before any input is generated or any model loaded
    return _build(out, data, teacher, captioner, build, teacher_weights, captioner_weights, overwrite)


# Over 80 lines on purpose: the one place that orders a build (inputs, plan, models, identity, lock, work order,
# shards, manifest, summary); every step is a call, and splitting it would thread a dozen locals between halves.
def _build(
    out: Path,
    data: InputArgs,
    teacher_name: str,
    captioner_names: str | None,
    args: BuildArgs,
    teacher_weights: Path | None = None,
    captioner_weights: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Set up (inputs, plan, models, identity), write the shards this process can lock, rebuild the manifest."""
    t_start = time.perf_counter()
    rank, world, local_rank = dist_env()
    device = _resolve_device(args.device, local_rank)
    inputs = InputStats()
    split_file = Path(data.split_file).expanduser() if data.split_file is not None else None
    captions = Path(data.captions).expanduser() if data.captions is not None else None
    shards = resolve_inputs(
        data.path,
        captions=captions,
        split_file=split_file,
        shard_size=args.shard_size,
        corpus_dir=data.corpus_dir,
        stats=inputs,
    )
    if args.max_shards is not None:
        shards = shards[: args.max_shards]
    _outdir.check_inputs_outside(out, [s.path for s in shards if s.kind == "tar"])
    plans = plan_inputs(shards)
    ens, caps = _load_models(teacher_name, captioner_names, args, device, teacher_weights, captioner_weights)
    aug = _augment_cfg(args, ens)
    teach = _teach_meta(ens, aug)
    # NOTE: the identity key is still `input`: a dataset built before the --data.path rename resumes
    identity = _identity(teach, args, caps, shards, data.path, inputs, split_file, _precision(args.precision, device))
    run_lock = _outdir.open_run(out, overwrite)
    claims = _outdir.Claims(out)
    totals = _Totals()
    try:
        _outdir.prepare_out(out, _dr_config(teach, aug, args, identity), teach)
        todo, resumed = _work_order(out, plans, rank, world, claims, totals)
        _logger.info(
            "build-data rank %d/%d on %s: %d input shards, %d to build, %d already done, %d unreadable, "
            "teachers %s (dims %s), %d augs, captioners %s",
            rank,
            world,
            device,
            len(shards),
            len(todo),
            resumed,
            len(totals.failed),
            ens.names,
            ens.embed_dims,
            args.num_augs,
            [c.name for c in caps],
        )
        t_loop = time.perf_counter()
        encoder = _Encoder(ens, caps, device, args, _compact_json(teach))
        _write_shards(out, todo, encoder, aug, rank, claims, totals)
        loop_time = time.perf_counter() - t_loop
        progress = rebuild_manifest(out)
    finally:
        claims.release_all()
        run_lock.release()
    processed = totals.written + sum(totals.skipped.values())
    summary = {
        "ok": not totals.failed,
        "out": str(out),
        "rank": rank,
        "world_size": world,
        "device": str(device),
        "teachers": ens.names,
        "written": totals.written,
        "skipped": dict(sorted(totals.skipped.items())),
        "caption_rows_skipped": dict(sorted(inputs.rows_skipped.items())),
        "shards_done": totals.shards_done,
        "shards_resumed": resumed + totals.finished_elsewhere,
        "shards_busy": len(claims.busy),
        "shards_failed": len(totals.failed),
        "failed_inputs": totals.failed,
        "shards_total": len(shards),
        "views_per_image": args.num_augs,
        "images_per_s": round(processed / loop_time, 2) if processed else None,
        "views_per_s": round(totals.written * args.num_augs / loop_time, 2) if processed else None,
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "dataset_complete": progress.get("complete", False),
        "dataset_samples": progress.get("num_samples"),
    }
    if totals.failed:
        _logger.error(
            "build-data: %d input shard(s) could not be read and were not built (e.g. %s); every other shard was. "
            "Fix or replace them and rerun: only what failed is retried",
            len(totals.failed),
            totals.failed[0]["error"],
        )
    _logger.info("build-data summary: %s", summary)
    return summary


def _work_order(
    out: Path, plans: list[ShardPlan], rank: int, world: int, claims: _outdir.Claims, totals: _Totals
) -> tuple[list[ShardPlan], int]:
    """Shards to build, this rank's own first (`index % world == rank`), then any other unbuilt one; unreadable
    inputs are recorded as failed. Returns `(to build, already done)`."""
    todo, done = [], 0
    for plan in plans:
        index = plan.shard.index
        if plan.error is not None:
            if _outdir.read_sidecar(out, index) is not None and (out / shard_name(index)).is_file():
                # The input is unreadable now, but its shard was built from it before: keep it.
                _logger.warning(
                    "input shard %d (%s) is unreadable now; its finished shard is kept", index, plan.shard.name
                )
                done += 1
            elif claims.claim(index):
                totals.fail(out, plan, plan.error, rank)
                claims.release(index)
            else:
                totals.failed.append({"shard": shard_name(index), "input": plan.shard.name, "error": plan.error})
        elif _outdir.shard_done(out, index, plan.digest):
            done += 1
        else:
            todo.append(plan)
    todo.sort(key=lambda p: (p.shard.index % world != rank, p.shard.index))
    return todo, done


def _compact_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load_models(
    teacher_name: str,
    captioner_names: str | None,
    args: BuildArgs,
    device: torch.device,
    teacher_weights: Path | None,
    captioner_weights: Path | None,
) -> tuple[teachers.TeacherEnsemble, list[teachers.Captioner]]:
    """The teacher ensemble and the captioners, on `device`."""
    t_weights = teachers.WeightSpec(file=str(teacher_weights)) if teacher_weights else None
    c_weights = teachers.WeightSpec(file=str(captioner_weights)) if captioner_weights else None
    ens = teachers.as_ensemble(teachers.create_teacher(teacher_name, weights=t_weights))
    caps = [
        teachers.create_captioner(n.strip(), weights=c_weights) for n in (captioner_names or "").split(",") if n.strip()
    ]
    if caps and args.num_syn == 0:
        _logger.warning("--build.num_syn is 0: the captioners are not run")
        caps = []
    syn_keys = [c.syn_key for c in caps]
    if len(set(syn_keys)) != len(syn_keys):
        raise UsageError(f"--captioner: captioners share a syn.json key ({syn_keys}); give them distinct tags")
    reserved = {schema.GT_PLACEHOLDER_KEY, schema.LEGACY_ALT_KEY} & set(syn_keys)
    if reserved:
        raise UsageError(f"--captioner: syn.json key {sorted(reserved)} is reserved; give the captioner another tag")
    ens.to(device)
    for c in caps:
        c.to(device)
    if device.type == "cuda" and args.channels_last:
        ens.to(memory_format=torch.channels_last)
    return ens, caps


def _augment_cfg(args: BuildArgs, ens: teachers.TeacherEnsemble) -> AugmentCfg:
    return AugmentCfg(
        crop_size=args.crop_size or max(t.image_size for t in ens.values()),
        scale=(args.scale_min, args.scale_max),
        interpolation=args.interpolation,
        rand_augment=args.rand_augment,
        magnitude=args.magnitude,
        hflip=args.hflip,
    )


def _write_shards(
    out: Path,
    todo: list[ShardPlan],
    encoder: _Encoder,
    aug: AugmentCfg,
    rank: int,
    claims: _outdir.Claims,
    totals: _Totals,
) -> None:
    """Encode and write every shard of `todo` this process can lock (workers decode and replay, this process runs
    the models); a shard whose input fails while it is read is dropped and recorded as failed."""
    args = encoder.args
    if args.teacher_views == "resize":
        view_sizes: tuple[int, ...] = (aug.crop_size,)
    else:
        view_sizes = tuple(sorted({t.image_size for t in encoder.ens.values()}))
    cap_sizes = tuple(sorted({c.image_size for c in encoder.captioners}))
    dataset = _ViewDataset(aug, args.num_augs, args.seed, view_sizes, cap_sizes, args.max_pixels, args.alt_captions)
    bar = _progress_bar(args.progress, rank)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=_tasks(out, todo, claims, totals, args.batch_size, bar),  # type: ignore[arg-type]  # any iterable
        num_workers=args.num_workers,
        collate_fn=_as_is,
        pin_memory=encoder.device.type == "cuda",
        # NOTE: workers get SIGKILL when this process dies (a kill -9 leaves no worker behind, workers.py).
        worker_init_fn=functools.partial(init_worker, os.getpid()) if args.num_workers > 0 else None,
        prefetch_factor=2 if args.num_workers > 0 else None,
    )
    plans = {p.shard.index: p for p in todo}
    failed: set[int] = set()
    shard: _ShardOut | None = None
    try:
        with torch.inference_mode():
            for batch in loader:
                task = batch.task
                if task.shard in failed:
                    continue  # batches of a shard that already failed
                if batch.error is not None:
                    if shard is not None:
                        shard.abort()
                        shard = None
                    totals.fail(out, plans[task.shard], batch.error, rank)
                    failed.add(task.shard)
                    claims.release(task.shard)
                    continue
                if shard is None:
                    shard = _ShardOut(out, plans[task.shard])
                for uid, reason in batch.skipped:
                    shard.skip(uid, reason)
                if batch.samples:
                    for uid, members in encoder.encode(batch):
                        shard.add(uid, members)
                bar.update(len(batch.samples) + len(batch.skipped))
                _logger.debug("shard %d: wrote batch %d/%d", task.shard, task.batch + 1, task.num_batches)
                if task.batch == task.num_batches - 1:
                    written, skips = shard.finish(rank, args.batch_size)
                    claims.release(task.shard)
                    totals.written += written
                    totals.shards_done += 1
                    totals.skipped.update(skips)
                    shard = None
    finally:
        if shard is not None:
            shard.abort()
        bar.close()
        dataset.close()


def _tasks(
    out: Path, todo: list[ShardPlan], claims: _outdir.Claims, totals: _Totals, batch_size: int, bar: tqdm
) -> Iterator[_Task]:
    """Batches of each shard this process can lock, in order; shards are indexed lazily (headers only) as the
    loader asks for work, so a shard another process is writing (locked) or has finished meanwhile is skipped."""
    seen = 0
    for n, plan in enumerate(todo):
        shard = plan.shard
        if not claims.claim(shard.index):
            _logger.info("shard %d is being written by another process; skipped", shard.index)
            continue
        if _outdir.shard_done(out, shard.index, plan.digest):
            claims.release(shard.index)
            totals.finished_elsewhere += 1
            continue
        try:
            refs = index_shard(shard)
            error = None
            if len(refs) != plan.num_refs:
                error = f"{shard.name}: changed while this run was building ({plan.num_refs} -> {len(refs)} samples)"
        except (OSError, tarfile.TarError) as exc:
            refs, error = [], str(exc)
        if error is not None:
            yield _Task(shard.index, shard.kind, shard.path, 0, 1, (), error)
            continue
        refs = plan.keep(refs)
        seen += len(refs)
        # ETA: extrapolate the average shard size to the shards not indexed yet.
        bar.total = seen + math.ceil(seen / (n + 1) * (len(todo) - n - 1))
        bar.refresh()
        num_batches = max(1, math.ceil(len(refs) / batch_size))
        for b in range(num_batches):
            chunk = tuple(refs[b * batch_size : (b + 1) * batch_size])
            yield _Task(shard.index, shard.kind, shard.path, b, num_batches, chunk)


def _progress_bar(enabled: bool, rank: int) -> tqdm:
    # NOTE: mininterval keeps non-interactive logs (SLURM) from filling up with bar redraws.
    return tqdm(total=0, unit="img", desc=f"build-data[{rank}]", disable=not enabled, dynamic_ncols=True, mininterval=2)
