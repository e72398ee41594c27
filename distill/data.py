"""Training and validation data for `distill train`: map-style datasets over tar shards with exact resume.

Samples are addressed by index (tar member offsets from `reinforced_data.sources.index_shard`), drawn by a seeded
per-epoch permutation and split across ranks like `DistributedSampler`. Every random choice of a sample
(augmentation record, synthetic caption) derives from `(seed, epoch, index)`, so the stream is a pure function of
the step: a run resumed from a checkpoint at step N sees exactly the batches an uninterrupted run would, whatever
the worker count (a streaming webdataset pipeline cannot promise that; `reinforced_data.reader` has one for
datasets too large to index).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.args import DataArgs, EvalArgs
from reinforced_data import schema
from reinforced_data.sources import InputShard, SampleRef, index_shard, read_sample, resolve_inputs

_logger = logging.getLogger(__name__)

__all__ = ["DataSpec", "DistillDataModule", "ResumableSampler", "collate", "default_corpus", "resolve_data"]


def default_corpus(corpus_dir: str = DataArgs.corpus_dir) -> Path:
    """Generate (once) and return the embedded shapes corpus root."""
    from reinforced_data.shapes import ensure_shapes_corpus

    root = Path(os.path.expanduser(corpus_dir))
    ensure_shapes_corpus(root)
    return root


def _read_members(shard: InputShard, ref: SampleRef, handles: dict[str, Any]) -> dict[str, bytes]:
    f = handles.get(shard.path)
    if f is None:
        f = handles[shard.path] = open(shard.path, "rb")  # noqa: SIM115 - kept open per worker, closed at exit
    out = {}
    for ext, offset, size in ref.members:
        f.seek(offset)
        out[ext] = f.read(size)
    return out


@dataclass
class DataSpec:
    """What `--data.path` points at: reinforced shards (with teacher metadata) or plain image-caption data."""

    reinforced: bool
    shards: list[InputShard]
    source: str
    teach: list[dict] = field(default_factory=list)
    corpus_root: Path | None = None
    schema_version: int = schema.SCHEMA_VERSION

    def describe(self) -> str:
        kind = "reinforced" if self.reinforced else "plain image-caption"
        return f"{self.source} ({kind}, {len(self.shards)} shard(s))"

    def teacher_dims(self) -> dict[str, int]:
        return {t["name"]: int(t["dim"]) for t in self.teach}

    def teacher_scales(self) -> dict[str, float]:
        # MobileCLIP v1 used 100 for every teacher; shards record each teacher's own choice.
        return {t["name"]: float(t.get("logit_scale") or 100.0) for t in self.teach}

    def check_teacher(self, name: str) -> None:
        """Raise if `--teacher` names a teacher other than the one the shards were built with."""
        stored = [t["name"] for t in self.teach]
        given = [n.strip() for n in name.split(",")]
        from teachers import get_teacher_cfg

        try:
            cfg = get_teacher_cfg(name)
            given = list(cfg.members) or [cfg.name]
        except KeyError:
            pass
        if given != stored:
            raise ValueError(
                f"--teacher {name} does not match the shards' teachers {stored} (from teach.json); "
                "drop --teacher to train on the stored embeddings"
            )

    def fingerprint(self) -> str:
        """sha256 over shard paths, sizes and mtimes (cheap; identifies the exact data a run saw)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.name.encode())
            if s.kind == "tar" and os.path.isfile(s.path):
                st = os.stat(s.path)
                h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
            else:
                h.update(str(len(s.items)).encode())
        return h.hexdigest()


def _load_teach(root: Path, first: dict[str, bytes] | None, teacher_dims: tuple[int, ...] | None) -> list[dict]:
    if (root / schema.TEACH_FILE).is_file():
        return schema.check_teach(json.loads((root / schema.TEACH_FILE).read_text()))
    if first and schema.KEY_TEACH in first:
        return schema.check_teach(json.loads(first[schema.KEY_TEACH]))
    if teacher_dims:
        return [{"name": f"teacher{k}", "dim": int(d), "logit_scale": 100.0} for k, d in enumerate(teacher_dims)]
    raise ValueError(
        "these shards carry no teach.json (DataCompDR layout): pass --data.teacher_dims, e.g. [768, 768] for "
        "DataCompDR's two ViT-L/14 teachers"
    )


def resolve_data(args: DataArgs) -> DataSpec:
    """Find the training shards and tell reinforced data from plain image-caption data."""
    corpus_root = None
    if args.path is None:
        corpus_root = default_corpus(args.corpus_dir)
    shards = resolve_inputs(args.path, captions=args.captions, split_file=args.split_file, corpus_dir=args.corpus_dir)
    if not shards:
        raise FileNotFoundError(f"--data.path {args.path!r} holds no shard")
    source = args.path or str(corpus_root)
    first_refs = index_shard(shards[0])
    first = _read_members(shards[0], first_refs[0], {}) if shards[0].kind == "tar" and first_refs else {}
    is_reinforced = schema.KEY_PAUG in first and (schema.KEY_NPZ in first or schema.KEY_PTH in first)
    if not is_reinforced:
        return DataSpec(False, shards, source, corpus_root=corpus_root)
    if schema.KEY_NPZ not in first and not args.trust_pickle:
        raise ValueError(
            "these shards store embeddings as pth.gz (a pickle, which can run code): pass "
            "--data.trust_pickle true only if you trust where they came from"
        )
    root = Path(shards[0].path).parent
    teach = _load_teach(root, first, args.teacher_dims)
    return DataSpec(True, shards, source, teach=teach)


class ResumableSampler(Sampler):
    """Endless seeded per-epoch permutation, split across ranks, that can start at any sample position.

    Yields `(index, epoch)`. Rank `r` takes positions `r, r + W, ...` of each epoch's permutation, truncated so every
    rank gets `len // W` samples (DistributedSampler with drop_last).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < world:
            raise ValueError(f"{n} samples cannot be split across {world} ranks")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start
        self.per_rank = n // world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.per_rank)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            mine = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.per_rank].tolist()
            for i in mine[offset:]:
                yield i, epoch
            pos = (epoch + 1) * self.per_rank


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, 0x5EED])


class _ShardSet(Dataset):
    """Index of every sample of a list of shards; subclasses turn a sample's bytes into a training dict."""

    def __init__(self, shards: list[InputShard], seed: int) -> None:
        self.shards = shards
        self.refs: list[tuple[int, SampleRef]] = [(k, r) for k, s in enumerate(shards) for r in index_shard(s)]
        self.seed = seed
        self._handles: dict[str, Any] = {}
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        # NOTE: a corrupt sample is replaced by the next one (deterministically) and counted, never a crash.
        for attempt in range(len(self.refs)):
            i = (index + attempt) % len(self.refs)
            try:
                return self.load(i, _sample_rng(self.seed, epoch, i))
            except (OSError, ValueError, KeyError) as err:
                self.skipped += 1
                _logger.warning("skipping sample %s: %s", self.refs[i][1].key, err)
        raise RuntimeError("no readable sample in the dataset")

    def load(self, i: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError


class ReinforcedSet(_ShardSet):
    """Reinforced shards: one stored augmentation replayed at the student's size + the stored teacher targets."""

    def __init__(
        self, spec: DataSpec, args: DataArgs, image_size: int, interpolation: str, tokenizer: Any, seed: int
    ) -> None:
        super().__init__(spec.shards, seed)
        from reinforced_data.reader import reinforced_pipeline

        # The streaming pipeline's per-sample decoder (replay + stored targets + caption choice), fed here with
        # randomly accessed samples; its randomness is keyed by (seed, epoch, uid) like ours.
        self.decoder = reinforced_pipeline(
            [s.path for s in spec.shards],
            image_size=image_size,
            interpolation=interpolation,
            tokenize=tokenizer,
            seed=seed,
            shuffle=0,
            use_syn=args.use_syn,
            p_syn_swap=args.p_syn_swap,
            trust_pickle=args.trust_pickle,
            teacher_dims={t["name"]: int(t["dim"]) for t in spec.teach},
        )

    def __getitem__(self, key: tuple[int, int]) -> dict:
        self._epoch = key[1]
        return super().__getitem__(key)

    def load(self, i: int, rng: np.random.Generator) -> dict:
        shard_idx, ref = self.refs[i]
        members = _read_members(self.shards[shard_idx], ref, self._handles)
        return self.decoder._process({"__key__": ref.key, **members}, self._epoch)


class PlainSet(_ShardSet):
    """Plain image-caption data: a DR-style augmentation sampled on the fly (or a centre view), one random caption."""

    def __init__(
        self, spec: DataSpec, args: DataArgs, image_size: int, interpolation: str, tokenizer: Any, seed: int
    ) -> None:
        super().__init__(spec.shards, seed)
        from reinforced_data.augment import AugmentCfg

        self.aug = AugmentCfg(crop_size=image_size, scale=(args.rrc_scale_min, 1.0)) if args.augment else None
        self.image_size, self.interpolation, self.tokenizer = image_size, interpolation, tokenizer

    def load(self, i: int, rng: np.random.Generator) -> dict:
        from reinforced_data.augment import center_view, decode_image, replay, sample_record, to_uint8_tensor

        shard_idx, ref = self.refs[i]
        shard = self.shards[shard_idx]
        raw = (
            read_sample(shard, ref, self._handles.get(shard.path))
            if shard.kind == "folder"
            else read_sample(shard, ref, self._handle(shard))
        )
        if raw.image is None:
            raise ValueError(raw.error or "no image")
        captions = raw.captions or ([raw.caption] if isinstance(raw.caption, str) and raw.caption.strip() else [])
        if not captions:
            raise ValueError("no usable caption")
        img = decode_image(raw.image)
        if self.aug is not None:
            view = replay(img, sample_record(img.width, img.height, rng, self.aug), self.image_size, self.interpolation)
        else:
            view = center_view(img, self.image_size, self.interpolation)
        caption = captions[int(rng.integers(len(captions)))]
        return {"image": to_uint8_tensor(view), "caption": caption, "text": self.tokenizer([caption])[0]}

    def _handle(self, shard: InputShard) -> Any:
        f = self._handles.get(shard.path)
        if f is None:
            f = self._handles[shard.path] = open(shard.path, "rb")  # noqa: SIM115
        return f


def collate(batch: list[dict]) -> dict:
    """Stack tensors, stack dicts of tensors per key, keep strings (and None) as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b.get(key) for b in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, dict):
            out[key] = {k: torch.stack([v[k] for v in values]) for k in first}
        elif isinstance(first, (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    # Synthetic captions must be present for every sample of a batch, or for none.
    if "syn_text" in out and not isinstance(out["syn_text"], torch.Tensor):
        for k in ("syn_text", "syn_caption", "teacher_syn_text_features"):
            out.pop(k, None)
    return out


class DistillDataModule(pl.LightningDataModule):
    """Training loader (reinforced or plain) with exact resume, plus zero-shot/retrieval validation loaders."""

    def __init__(
        self, spec: DataSpec, args: DataArgs, student: Any, *, mode: str, seed: int, val: EvalArgs, accumulate: int = 1
    ) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.spec, self.args, self.mode, self.seed, self.val = spec, args, mode, seed, val
        self.image_size, self.interpolation = student.image_size, student.interpolation
        # NOTE: a standalone tokenizer (not the module) is what gets pickled into worker processes.
        self.tokenizer = SimpleTokenizer(context_length=student.context_length)
        self.samples_per_step = args.batch_size * accumulate
        self.start_step = 0
        self.zeroshot_set, self.retrieval_set = val.zeroshot, val.retrieval
        if self.zeroshot_set is None and self.retrieval_set is None and spec.corpus_root is not None:
            self.zeroshot_set = str(spec.corpus_root / "zeroshot")
            self.retrieval_set = str(spec.corpus_root / "val")
        self.zeroshot_classes: list[str] | None = None
        self.zeroshot_templates: list[str] | None = None
        if self.zeroshot_set is not None:
            from distill.evaluate import CLIP_TEMPLATES, ImageFolderSet

            zs = ImageFolderSet(self.zeroshot_set, self.image_size, self.interpolation, val.max_images)
            self.zeroshot_classes = zs.classes
            self.zeroshot_templates = list(val.templates or zs.templates or CLIP_TEMPLATES)
        self._train: _ShardSet | None = None

    def setup(self, stage: str) -> None:
        if self._train is None and stage == "fit":
            cls = ReinforcedSet if self.mode == "reinforced" else PlainSet
            self._train = cls(self.spec, self.args, self.image_size, self.interpolation, self.tokenizer, self.seed)
            if len(self._train) < self.args.batch_size:
                raise ValueError(
                    f"--data.batch_size {self.args.batch_size} is larger than the dataset ({len(self._train)} samples)"
                )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # NOTE: Lightning restores global_step before building loaders, so a resumed run continues at the exact
        # sample position: optimizer steps x batches per step x batch size.
        self.start_step = trainer.global_step if trainer is not None else 0
        sampler = ResumableSampler(
            len(self._train), self.seed, rank, world, start=self.start_step * self.samples_per_step
        )
        return DataLoader(
            self._train,
            batch_size=self.args.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.args.num_workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.args.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        from distill.evaluate import CaptionSet, ImageFolderSet, collate_captions

        loaders = []
        bs, workers = self.val.batch_size, min(self.args.num_workers, 2)
        if self.zeroshot_set is not None:
            zs = ImageFolderSet(self.zeroshot_set, self.image_size, self.interpolation, self.val.max_images)
            loaders.append(DataLoader(zs, batch_size=bs, num_workers=workers))
        if self.retrieval_set is not None:
            ret = CaptionSet(
                self.retrieval_set,
                self.image_size,
                self.interpolation,
                self.val.retrieval_captions,
                self.val.retrieval_split_file,
                self.val.max_images,
            )
            loaders.append(
                DataLoader(
                    ret,
                    batch_size=bs,
                    num_workers=workers,
                    collate_fn=functools.partial(collate_captions, tokenize=self.tokenizer),
                )
            )
        return loaders
