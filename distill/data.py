"""Training and validation data for `distill train`: the LightningDataModule, exact-resume sampling, data detection.

The datasets themselves are `reinforced_data`'s map-style `ReinforcedDataset` / `ImageTextDataset`: samples are
addressed by index (tar member offsets from `mcd_common.tars`), and every random choice of a sample (augmentation
record, synthetic caption) derives from `(seed, epoch, sample)`. `ResumableSampler` draws a seeded per-epoch
permutation split across ranks like `DistributedSampler` and yields `(index, epoch)` keys, so the epoch reaches
the dataset explicitly and the stream is a pure function of the step: a run resumed from a checkpoint at step N
sees exactly the batches an uninterrupted run would, whatever the worker count.

`resolve_data` refuses what cannot be trained on as asked, before any model is built: data that looks reinforced
(embeddings, `teach.json`) without augmentation records, `teach.json` widths that do not match the stored arrays, a
damaged `teach.json` / `config.json`. Samples that cannot be used are left out of the index and counted
(`DistillDataModule.data_stats()`, for `run.json`). Loader workers exit when the training process dies.
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

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Sampler

from distill.args import DataArgs, EvalArgs
from distill.evaluate import CLIP_TEMPLATES, CaptionSet, ImageFolderSet, collate_captions, collate_images
from mcd_common.errors import UsageError
from mcd_common.tars import TarFileError, TarReader
from reinforced_data import schema
from reinforced_data.augment import DATACOMPDR_LAYOUT, AugmentCfg, RecordLayout
from reinforced_data.reader import (
    CachedTokenizer,
    ImageTextDataset,
    ReinforcedDataset,
    ReinforcedOptions,
    collate,
    stored_width,
)
from reinforced_data.shapes import default_corpus
from reinforced_data.sources import InputShard, index_shard, resolve_inputs
from reinforced_data.workers import exit_with_parent
from students import CLIPStudent
from teachers import get_teacher_cfg

_logger = logging.getLogger(__name__)

__all__ = ["DataSpec", "DistillDataModule", "ResumableSampler", "collate", "default_corpus", "resolve_data"]


@dataclass
class DataSpec:
    """What `--data.path` points at: reinforced shards (with teacher metadata) or plain image-caption data."""

    reinforced: bool
    shards: list[InputShard]
    source: str
    teach: list[dict] = field(default_factory=list)
    corpus_root: Path | None = None
    schema_version: int = schema.SCHEMA_VERSION
    record_layout: RecordLayout = DATACOMPDR_LAYOUT
    """Layout of the stored augmentation records (from the root's `config.json`; DataCompDR's without one)."""

    def describe(self) -> str:
        """One line for messages: the source, its kind and its shard count."""
        kind = "reinforced" if self.reinforced else "plain image-caption"
        return f"{self.source} ({kind}, {len(self.shards)} shard(s))"

    def teacher_dims(self) -> dict[str, int]:
        """`{teacher: embedding width}` in slice order."""
        return {t["name"]: int(t["dim"]) for t in self.teach}

    def teacher_scales(self) -> dict[str, float]:
        """`{teacher: KD logit scale}`: each teacher's recorded scale (MobileCLIP v1 used 100 for every teacher)."""
        return {t["name"]: float(t.get("logit_scale") or 100.0) for t in self.teach}

    def check_teacher(self, name: str) -> None:
        """Raise if `--teacher` names a teacher other than the one the shards were built with."""
        stored = [t["name"] for t in self.teach]
        given = [n.strip() for n in name.split(",")]
        try:
            cfg = get_teacher_cfg(name)
            given = list(cfg.members) or [cfg.name]
        except KeyError:
            pass
        if given != stored:
            raise UsageError(
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


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path}: not readable JSON ({exc}); the dataset is damaged: restore the file, or rebuild the dataset "
            "with `distill build-data --overwrite true`"
        ) from None


def _load_teach(root: Path, first: dict[str, bytes], teacher_dims: tuple[int, ...] | None) -> list[dict]:
    if (root / schema.TEACH_FILE).is_file():
        teach = _read_json(root / schema.TEACH_FILE)
        if not isinstance(teach, dict):
            raise UsageError(f"{root / schema.TEACH_FILE}: expected a JSON object with a 'teachers' list")
        return schema.check_teach(teach)
    if schema.KEY_TEACH in first:
        try:
            return schema.check_teach(json.loads(first[schema.KEY_TEACH]))
        except (ValueError, AttributeError):
            raise UsageError(f"{root}: the first sample's teach.json is not a JSON object with 'teachers'") from None
    if teacher_dims:
        return [{"name": f"teacher{k}", "dim": int(d), "logit_scale": 100.0} for k, d in enumerate(teacher_dims)]
    raise UsageError(
        "these shards carry no teach.json (DataCompDR layout): pass --data.teacher_dims, e.g. [768, 768] for "
        "DataCompDR's two ViT-L/14 teachers"
    )


def _first_members(shard: InputShard) -> dict[str, bytes]:
    """The members of a tar shard's first sample ({} for folders and empty shards)."""
    if shard.kind != "tar":
        return {}
    try:
        refs = index_shard(shard)
    except (TarFileError, OSError) as exc:
        raise UsageError(f"--data.path: shard {shard.name} cannot be read ({exc})") from None
    if not refs:
        return {}
    with TarReader() as reader:
        return reader.read_sample(shard.path, refs[0].indexed)


def _check_reinforced(first: dict[str, bytes], root: Path, source: str) -> None:
    """Refuse data that looks reinforced (embeddings, `teach.json`) but cannot be trained on as such."""
    marks = [k for k in (schema.KEY_NPZ, schema.KEY_PTH, schema.KEY_TEACH) if k in first]
    if (root / schema.TEACH_FILE).is_file():
        marks.append(str(root / schema.TEACH_FILE))
    if not marks:
        return
    missing = [k for k in (schema.KEY_PAUG,) if k not in first]
    if not (schema.KEY_NPZ in first or schema.KEY_PTH in first):
        missing.append("npz|pth.gz")
    if missing:
        raise UsageError(
            f"--data.path {source} looks like reinforced data ({', '.join(marks)}) but its samples have no "
            f"{' and no '.join(missing)} (augmentation records / stored embeddings), so it cannot be trained on as "
            "reinforced data; rebuild it with `distill build-data`, or pass the original images for online/scratch "
            "training"
        )


def _check_width(first: dict[str, bytes], teach: list[dict], trust_pickle: bool, where: str, given: bool) -> None:
    """The stored arrays must be as wide as the teachers' dims add up to (checked on the first sample)."""
    width = sum(int(t["dim"]) for t in teach)
    stored = stored_width(first, trust_pickle)
    if stored is None or stored == width:
        return  # a damaged first sample is left out of the index and counted there
    dims = {t["name"]: int(t["dim"]) for t in teach}
    if given:
        raise UsageError(
            f"--data.teacher_dims {list(dims.values())} add up to {width}, but the stored embeddings of {where} "
            f"are {stored} wide; pass the widths the shards were built with"
        )
    raise UsageError(
        f"{where}: the stored embeddings are {stored} wide, but teach.json's teachers {dims} add up to {width}; "
        "this teach.json does not describe these shards (rebuild the dataset, or restore its teach.json)"
    )


def resolve_data(args: DataArgs) -> DataSpec:
    """Find the training shards and tell reinforced data from plain image-caption data.

    Raises:
        UsageError: On data that looks reinforced without augmentation records or embeddings, `teach.json`
            widths that do not match the stored arrays, a damaged `teach.json` / `config.json`, an unreadable
            first shard.
    """
    corpus_root = None
    if args.path is None:
        corpus_root = default_corpus(args.corpus_dir)
    shards = resolve_inputs(args.path, captions=args.captions, split_file=args.split_file, corpus_dir=args.corpus_dir)
    if not shards:
        raise UsageError(f"--data.path {args.path!r} holds no shard")
    source = args.path or str(corpus_root)
    first = _first_members(shards[0])
    root = Path(shards[0].path).parent
    if shards[0].kind == "tar":
        _check_reinforced(first, root, source)
    is_reinforced = schema.KEY_PAUG in first and (schema.KEY_NPZ in first or schema.KEY_PTH in first)
    if not is_reinforced:
        return DataSpec(False, shards, source, corpus_root=corpus_root)
    if schema.KEY_NPZ not in first and not args.trust_pickle:
        raise UsageError(
            "these shards store embeddings as pth.gz (a pickle, which can run code): pass "
            "--data.trust_pickle true only if you trust where they came from"
        )
    teach = _load_teach(root, first, args.teacher_dims)
    given = not (root / schema.TEACH_FILE).is_file() and schema.KEY_TEACH not in first
    _check_width(first, teach, args.trust_pickle, f"{shards[0].path} (first sample)", given)
    layout = _record_layout(root)
    layout.check_replayable(str(root / schema.CONFIG_FILE))
    return DataSpec(True, shards, source, teach=teach, record_layout=layout)


def _record_layout(root: Path) -> RecordLayout:
    """The augmentation-record layout of a reinforced dataset root (`config.json`), DataCompDR's without one."""
    path = root / schema.CONFIG_FILE
    if not path.is_file():
        return DATACOMPDR_LAYOUT
    try:
        image_aug = json.loads(path.read_text())["reinforce"]["image_augmentation"]
        return RecordLayout.from_config(image_aug)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: no readable reinforce.image_augmentation block ({err})") from None


def _init_worker(parent_pid: int, rank: int, worker_id: int) -> None:
    """Loader workers exit with the training process (a kill -9 leaves none behind), seeded as Lightning would."""
    exit_with_parent(parent_pid)
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning adds itself when no worker_init_fn is set
        pl_worker_init_function(worker_id, rank)


class ResumableSampler(Sampler):
    """Endless seeded per-epoch permutation, split across ranks, that can start at any sample position.

    Yields `(index, epoch)`. Rank `r` takes positions `r, r + W, ...` of each epoch's permutation, truncated so every
    rank gets `len // W` samples (DistributedSampler with drop_last).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < world:
            raise UsageError(f"{n} samples cannot be split across {world} ranks")
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


class DistillDataModule(pl.LightningDataModule):
    """Training loader (reinforced or plain) with exact resume, plus zero-shot/retrieval validation loaders."""

    def __init__(
        self,
        spec: DataSpec,
        args: DataArgs,
        student: CLIPStudent,
        *,
        mode: str,
        seed: int,
        val: EvalArgs,
        accumulate: int = 1,
    ) -> None:
        super().__init__()
        self.spec, self.args, self.mode, self.seed, self.val = spec, args, mode, seed, val
        self.image_size, self.interpolation = student.image_size, student.interpolation
        # NOTE: a standalone tokenizer (not the module) is what gets pickled into worker processes.
        # CLIP BPE, or a Hugging Face text tower's own tokenizer; rows of captions seen before come from memory
        self.tokenizer = CachedTokenizer(student.text_tokenizer())
        self.samples_per_step = args.batch_size * accumulate
        self.start_step = 0
        self.zeroshot_set, self.retrieval_set = val.zeroshot, val.retrieval
        if self.zeroshot_set is None and self.retrieval_set is None and spec.corpus_root is not None:
            self.zeroshot_set = str(spec.corpus_root / "zeroshot")
            self.retrieval_set = str(spec.corpus_root / "val")
        self.zeroshot_classes: list[str] | None = None
        self.zeroshot_templates: list[str] | None = None
        if self.zeroshot_set is not None:
            zs = ImageFolderSet(self.zeroshot_set, self.image_size, self.interpolation, val.max_images)
            self.zeroshot_classes = zs.classes
            self.zeroshot_templates = list(val.templates or zs.templates or CLIP_TEMPLATES)
        self._train: ReinforcedDataset | ImageTextDataset | None = None

    def _train_set(self) -> ReinforcedDataset | ImageTextDataset:
        args = self.args
        if self.mode == "reinforced":
            opts = ReinforcedOptions(
                image_size=self.image_size,
                interpolation=self.interpolation,
                use_syn=args.use_syn,
                p_syn_swap=args.p_syn_swap,
                trust_pickle=args.trust_pickle,
                teacher_dims=self.spec.teacher_dims(),
                record_layout=self.spec.record_layout,
            )
            return ReinforcedDataset(self.spec.shards, opts, self.tokenizer, self.seed)
        aug = AugmentCfg(crop_size=self.image_size, scale=(args.rrc_scale_min, 1.0)) if args.augment else None
        return ImageTextDataset(self.spec.shards, self.tokenizer, self.image_size, self.interpolation, aug, self.seed)

    def setup(self, stage: str) -> None:
        """Index the training shards (once) for `fit`: bad samples are left out and counted (`data_stats`)."""
        if self._train is None and stage == "fit":
            self._train = self._train_set()
            stats = self._train.stats()
            _logger.info(
                "training data: %d usable of %d samples%s",
                stats["samples_usable"],
                stats["samples_indexed"],
                f", left out {stats['skipped']}" if stats["skipped"] else "",
            )
            if len(self._train) < self.args.batch_size:
                raise UsageError(
                    f"--data.batch_size {self.args.batch_size} is larger than the dataset ({len(self._train)} samples)"
                )

    def data_stats(self) -> dict | None:
        """What indexing and loading the training data found, for `run.json` (None before `setup("fit")`).

        Returns:
            `samples_indexed`, `samples_usable`, `skipped` (`{reason: count}`: samples left out of the index, e.g.
            `empty_embeddings`, `duplicate_uid`, `no_paug`), `skipped_examples` (the first few, named), and
            `replaced_at_load` (images that failed to decode when read, each replaced by the next sample).
        """
        return None if self._train is None else self._train.stats()

    def _worker_init(self, rank: int) -> functools.partial | None:
        return functools.partial(_init_worker, os.getpid(), rank) if self.args.num_workers > 0 else None

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
            worker_init_fn=self._worker_init(rank),
        )

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        bs, workers = self.val.batch_size, min(self.args.num_workers, 2)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        init = self._worker_init(rank) if workers > 0 else None
        if self.zeroshot_set is not None:
            zs = ImageFolderSet(self.zeroshot_set, self.image_size, self.interpolation, self.val.max_images)
            loaders.append(
                DataLoader(zs, batch_size=bs, num_workers=workers, collate_fn=collate_images, worker_init_fn=init)
            )
        if self.retrieval_set is not None:
            ret = CaptionSet(
                self.retrieval_set,
                self.image_size,
                self.interpolation,
                self.val.captions,
                self.val.split_file,
                self.val.max_images,
            )
            loaders.append(
                DataLoader(
                    ret,
                    batch_size=bs,
                    num_workers=workers,
                    collate_fn=functools.partial(collate_captions, tokenize=self.tokenizer),
                    worker_init_fn=init,
                )
            )
        return loaders
