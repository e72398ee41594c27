"""Training-side pipelines: reinforced shards (offline KD) and plain image-caption data (online KD / scratch).

`reinforced_pipeline` reads shards written by `build-data` and Apple's DataCompDR shards alike (v2 layout with
`<syn key>_emb` arrays, v1 layout with synthetic rows appended to `text_emb`, fp16/fp32 `npz` or, with
`trust_pickle`, bf16 `pth.gz`). Per sample it picks one stored augmentation and replays it at the student's size
(MobileCLIP's `preprocess_dr`, apple/ml-mobileclip `training/open_clip_v2.patch`), tokenises the real caption and
one synthetic caption, and returns the matching stored teacher embeddings split per teacher (docs/DESIGN.md,
"Training samples"). `image_text_pipeline` samples the same augmentation family on the fly.

Both are webdataset-style `IterableDataset`s split by node (torch.distributed, when initialised) and by
DataLoader worker; their randomness derives from `(seed, epoch, uid)`, so what a sample becomes does not depend on
the number of workers or nodes. Call `set_epoch` between epochs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from reinforced_data import schema
from reinforced_data._io import decode_npz, decode_pth_gz
from reinforced_data.augment import (
    AugmentCfg,
    ImageDecodeError,
    center_view,
    decode_image,
    decode_param_aug,
    record_rng,
    replay,
    sample_record,
    to_uint8_tensor,
)

__all__ = [
    "ReinforcedDataError",
    "collate",
    "dataset_info",
    "image_text_pipeline",
    "reinforced_pipeline",
    "shard_urls",
]

_logger = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], torch.Tensor]


class ReinforcedDataError(ValueError):
    """A dataset that cannot be read as asked (unknown schema, missing teacher dims, pickle not allowed)."""


# ---------------------------------------------------------------------------------------------------------- shards


def shard_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Resolve shards: a dataset root (its `manifest.jsonl`, else its `*.tar`), brace patterns, `::` lists, globs.

    Raises:
        FileNotFoundError: When nothing matches.
    """
    if isinstance(urls, (list, tuple)):
        out = [str(u) for u in urls]
    else:
        spec = os.path.expanduser(str(urls))
        root = Path(spec)
        if root.is_dir():
            manifest = root / schema.MANIFEST_FILE
            if manifest.is_file():
                out = [
                    str(root / json.loads(line)["shard"]) for line in manifest.read_text().splitlines() if line.strip()
                ]
            else:
                out = sorted(str(p) for p in root.glob("*.tar"))
        else:
            from reinforced_data.sources import _expand

            out = _expand(spec)
    if not out:
        raise FileNotFoundError(f"no shards found for {urls!r}")
    return out


def _root_of(urls: Any) -> Path | None:
    if isinstance(urls, (str, os.PathLike)) and Path(os.path.expanduser(str(urls))).is_dir():
        return Path(os.path.expanduser(str(urls)))
    return None


def dataset_info(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    teacher_dims: Sequence[int] | Mapping[str, int] | None = None,
) -> dict:
    """What a trainer needs to check before training on a reinforced dataset.

    Reads the root's `config.json`, `teach.json` and `manifest.jsonl` when present, and peeks at the first sample of
    the first shard (member keys, syn keys, embedding widths, layout).

    Args:
        urls: A dataset root or shard spec (see `shard_urls`).
        teacher_dims: Teacher widths for shards without `teach.json` (DataCompDR: `[768, 768]`).

    Returns:
        `{"shards", "num_samples" (None if unknown), "teachers" (name, dim, logit_scale, ...), "teacher_dims",
        "logit_scales", "num_augs", "syn_keys", "layout" ("v2" | "v1"), "has_images", "keys", "schema_version",
        "complete" (None if unknown), "config", "embed_width"}`; sample-derived fields are None when no shard has
        a sample.
    """
    shards = shard_urls(urls)
    root = _root_of(urls)
    config: dict = {}
    teach: dict | None = None
    num_samples = None
    complete = None
    if root is not None:
        if (root / schema.CONFIG_FILE).is_file():
            config = json.loads((root / schema.CONFIG_FILE).read_text())
        if (root / schema.TEACH_FILE).is_file():
            teach = json.loads((root / schema.TEACH_FILE).read_text())
        if (root / schema.MANIFEST_FILE).is_file():
            rows = [json.loads(line) for line in (root / schema.MANIFEST_FILE).read_text().splitlines() if line.strip()]
            num_samples = sum(int(r["num_samples"]) for r in rows)
        if (root / schema.PROGRESS_FILE).is_file():
            complete = bool(json.loads((root / schema.PROGRESS_FILE).read_text()).get("complete"))
    first = _first_sample(shards)
    if teach is None and schema.KEY_TEACH in first:
        teach = json.loads(first[schema.KEY_TEACH])
    if teach is not None:
        teachers = schema.check_teach(teach)
    elif teacher_dims is not None:
        teachers = [{"name": n, "dim": s.stop - s.start} for n, s in schema.teacher_slices(teacher_dims).items()]
    else:
        teachers = []
    info: dict[str, Any] = {
        "shards": shards,
        "num_samples": num_samples,
        "teachers": teachers,
        "teacher_dims": {t["name"]: int(t["dim"]) for t in teachers},
        "logit_scales": {t["name"]: t.get("logit_scale") for t in teachers},
        "schema_version": int(teach.get("schema_version", 1)) if teach else None,
        "complete": complete,
        "config": config,
        "keys": sorted(k for k in first if not k.startswith("__")),
        "has_images": any(k in first for k in schema.IMAGE_KEYS),
    }
    syn = json.loads(first[schema.KEY_SYN]) if schema.KEY_SYN in first else {}
    info["syn_keys"] = sorted(k for k, v in syn.items() if isinstance(v, list) and v)
    info["num_augs"] = len(decode_param_aug(first[schema.KEY_PAUG])) if schema.KEY_PAUG in first else None
    info["embed_width"] = None
    info["layout"] = None
    if schema.KEY_NPZ in first:
        arrays = decode_npz(first[schema.KEY_NPZ])
        info["embed_width"] = int(arrays[schema.IMAGE_EMB].shape[-1])
        info["layout"] = "v1" if _is_v1(arrays, syn) else "v2"
        if teachers and sum(info["teacher_dims"].values()) != info["embed_width"]:
            raise ReinforcedDataError(
                f"teacher dims {info['teacher_dims']} do not add up to the stored embedding width {info['embed_width']}"
            )
    return info


def _first_sample(shards: list[str], max_shards: int = 16) -> dict[str, bytes]:
    """Members of the first sample of the first non-empty shard (empty dict if none of the first few has one)."""
    import tarfile

    for shard in shards[:max_shards]:
        sample: dict[str, bytes] = {}
        key = None
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile() or "." not in os.path.basename(info.name):
                    continue
                k, ext = _split_name(info.name)
                if key is not None and k != key:
                    break
                key = k
                f = tar.extractfile(info)
                sample[ext] = f.read() if f is not None else b""
        if sample:
            return sample
    return {}


def _split_name(name: str) -> tuple[str, str]:
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2).lower()


def _is_v1(arrays: Mapping[str, np.ndarray], syn: Mapping[str, Any]) -> bool:
    # DataCompDR v1: synthetic rows follow the real caption inside text_emb, no `<syn key>_emb` arrays.
    has_syn_arrays = any(k.startswith(schema.SYN_KEY) and k.endswith(schema.EMB_SUFFIX) for k in arrays)
    return not has_syn_arrays and arrays[schema.TEXT_EMB].shape[0] > 1


# ----------------------------------------------------------------------------------------------------- pipeline glue


class _SharedEpoch:
    """Epoch counter shared with (persistent) DataLoader workers, as open_clip's `SharedEpoch`."""

    def __init__(self, epoch: int = 0) -> None:
        self.value = mp.Value("i", int(epoch))

    def set(self, epoch: int) -> None:
        self.value.value = int(epoch)

    def get(self) -> int:
        return int(self.value.value)


def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _node_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _split_items(items: list, seed: int, epoch: int, shuffle: bool) -> list:
    """This node's and worker's share of `items` (shuffled identically everywhere by `(seed, epoch)` first)."""
    items = list(items)
    if shuffle:
        random.Random(_stable_int(seed, "shards", epoch)).shuffle(items)
    rank, world = _node_info()
    worker, workers = _worker_info()
    return items[rank * workers + worker :: world * workers]


def _shuffle(src: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Reservoir shuffle with an explicit generator (webdataset's `shuffle`, made reproducible)."""
    if bufsize <= 1:
        yield from src
        return
    buf: list = []
    for item in src:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


class _EpochDataset(torch.utils.data.IterableDataset):
    """An iterable dataset whose iteration depends on a shared epoch (`set_epoch`)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self._epoch = _SharedEpoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffle buffer, augmentation and caption choices)."""
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()


# ------------------------------------------------------------------------------------------------ reinforced samples


class _ReinforcedDataset(_EpochDataset):
    def __init__(self, urls: list[str], *, resampled: bool, shuffle: int, seed: int, epoch: int, **opts: Any) -> None:
        super().__init__(epoch)
        self.urls = urls
        self.resampled = resampled
        self.shuffle = shuffle
        self.seed = seed
        self.opts = opts
        self._teach_cache: tuple[bytes, dict[str, slice]] | None = None

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        epoch = self.epoch
        if self.resampled:
            # Infinite stream of shards drawn with replacement, seeded per node/worker/epoch.
            rank, _ = _node_info()
            worker, _ = _worker_info()
            rng = random.Random(_stable_int(self.seed, "resample", epoch, rank, worker))
            urls: Iterable[str] = (rng.choice(self.urls) for _ in iter(int, 1))
        else:
            urls = _split_items(self.urls, self.seed, epoch, shuffle=self.shuffle > 0)
        raw = wds.tarfile_to_samples(handler=wds.warn_and_continue)({"url": u} for u in urls)
        rank, _ = _node_info()
        worker, _ = _worker_info()
        rng = random.Random(_stable_int(self.seed, "buffer", epoch, rank, worker))
        for sample in _shuffle(raw, self.shuffle, rng):
            try:
                out = self._process(sample, epoch)
            except ReinforcedDataError:
                raise
            except Exception as exc:  # a corrupt sample is skipped, like open_clip's log_and_continue
                _logger.warning("skipping sample %s of %s: %r", sample.get("__key__"), sample.get("__url__"), exc)
                continue
            yield out

    def _slices(self, sample: dict) -> dict[str, slice]:
        teach_bytes = sample.get(schema.KEY_TEACH)
        if teach_bytes is not None:
            if self._teach_cache is None or self._teach_cache[0] != teach_bytes:
                try:
                    teachers = schema.check_teach(json.loads(teach_bytes))
                except ValueError as exc:
                    raise ReinforcedDataError(str(exc)) from exc
                self._teach_cache = (teach_bytes, schema.teacher_slices(teachers))
            return self._teach_cache[1]
        dims = self.opts["teacher_dims"]
        if dims is None:
            raise ReinforcedDataError(
                f"shard {sample.get('__url__')} has no teach.json (a DataCompDR shard?): pass teacher_dims "
                "(e.g. --data.teacher_dims [768,768] for DataCompDR's two ViT-L/14 teachers)"
            )
        return schema.teacher_slices(dims)

    def _embeddings(self, sample: dict) -> dict[str, np.ndarray]:
        if schema.KEY_NPZ in sample:
            return decode_npz(sample[schema.KEY_NPZ])
        if schema.KEY_PTH in sample:
            if not self.opts["trust_pickle"]:
                raise ReinforcedDataError(
                    f"shard {sample.get('__url__')} stores embeddings as pth.gz, a pickle that can run code when "
                    "loaded; pass trust_pickle=True (--data.trust_pickle true) only for data you trust"
                )
            return decode_pth_gz(sample[schema.KEY_PTH])
        raise ValueError("no npz or pth.gz member")

    def _process(self, sample: dict, epoch: int) -> dict:
        o = self.opts
        uid = sample["__key__"]
        rng = np.random.default_rng(_stable_int(self.seed, "sample", epoch, uid))
        image_bytes = next((sample[k] for k in schema.IMAGE_KEYS if k in sample), None)
        if image_bytes is None:
            raise ValueError("no image member (jpg/png/webp): join URL-only shards with their images first")
        records = decode_param_aug(sample[schema.KEY_PAUG])
        arrays = self._embeddings(sample)
        image_emb = arrays[schema.IMAGE_EMB]
        n_aug = min(len(records), image_emb.shape[0])
        aug_idx = epoch % n_aug if o["aug_sampling"] == "sequential" else int(rng.integers(n_aug))
        img = decode_image(image_bytes)
        view = replay(img, records[aug_idx], o["image_size"], o["interpolation"])
        slices = self._slices(sample)

        caption = sample[schema.KEY_TXT].decode("utf-8").strip()
        text_emb = arrays[schema.TEXT_EMB]
        out: dict[str, Any] = {
            "image": to_uint8_tensor(view),
            "text": o["tokenize"]([caption])[0],
            "caption": caption,
            "teacher_image_features": _features(image_emb[aug_idx], slices),
            "teacher_text_features": _features(text_emb[0], slices),
        }
        if not (o["use_syn"] or o["p_syn_swap"] > 0):
            return out
        syn_caption, syn_row = self._pick_syn(sample, arrays, rng, epoch)
        if syn_caption is None:
            # NOTE: keep every sample's keys identical (collation); a sample without synthetic captions repeats
            # its real caption.
            syn_caption, syn_row = caption, text_emb[0]
        if o["p_syn_swap"] > 0:
            # Apple's --dataset-reinforcement-mix-synthetic: swap GT for synthetic, no second caption term.
            if rng.random() < o["p_syn_swap"]:
                out["caption"] = syn_caption
                out["text"] = o["tokenize"]([syn_caption])[0]
                out["teacher_text_features"] = _features(syn_row, slices)
            return out
        out["syn_text"] = o["tokenize"]([syn_caption])[0]
        out["syn_caption"] = syn_caption
        out["teacher_syn_text_features"] = _features(syn_row, slices)
        return out

    def _pick_syn(
        self, sample: dict, arrays: Mapping[str, np.ndarray], rng: np.random.Generator, epoch: int
    ) -> tuple[str | None, np.ndarray | None]:
        if schema.KEY_SYN not in sample:
            return None, None
        syn = json.loads(sample[schema.KEY_SYN])
        if not isinstance(syn, dict):
            return None, None
        regex = re.compile(self.opts["syn_key_regex"])
        v1 = _is_v1(arrays, syn)
        keys = [k for k, v in syn.items() if regex.match(k) and isinstance(v, list) and v]
        if v1:
            # v1 rows are [GT, syn_text...]: only the plain key has embeddings.
            keys = [k for k in keys if k == schema.SYN_KEY]
        else:
            keys = [k for k in keys if schema.syn_emb_name(k) in arrays]
        if not keys:
            return None, None
        key = keys[int(rng.integers(len(keys)))]
        texts = syn[key]
        if v1:
            n = min(len(texts), arrays[schema.TEXT_EMB].shape[0] - 1)
            idx = epoch % n if self.opts["aug_sampling"] == "sequential" else int(rng.integers(n))
            return str(texts[idx]), arrays[schema.TEXT_EMB][1 + idx]
        emb = arrays[schema.syn_emb_name(key)]
        n = min(len(texts), emb.shape[0])
        idx = epoch % n if self.opts["aug_sampling"] == "sequential" else int(rng.integers(n))
        return str(texts[idx]), emb[idx]


def _features(row: np.ndarray, slices: Mapping[str, slice]) -> dict[str, torch.Tensor]:
    row = np.asarray(row, dtype=np.float32)
    return {
        name: torch.from_numpy(np.ascontiguousarray(part))
        for name, part in schema.split_embeddings(row, slices).items()
    }


def reinforced_pipeline(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int,
    interpolation: str = "bicubic",
    tokenize: Tokenize,
    seed: int = 0,
    shuffle: int = 1000,
    use_syn: bool = True,
    p_syn_swap: float = 0.0,
    syn_key_regex: str = "^syn_text.*$",
    aug_sampling: Literal["random", "sequential"] = "random",
    trust_pickle: bool = False,
    teacher_dims: Sequence[int] | Mapping[str, int] | None = None,
    resampled: bool = False,
    epoch: int = 0,
) -> torch.utils.data.IterableDataset:
    """Training samples from reinforced shards (ours or DataCompDR's).

    Args:
        urls: Dataset root (uses its manifest), shard paths, brace pattern or `::` list.
        image_size: Student resolution the stored crop is replayed at.
        interpolation: Student's resize filter.
        tokenize: The student's tokenizer, `list[str] -> LongTensor [N, L]`.
        seed: Seed of shard order, shuffle buffer, augmentation and caption choices.
        shuffle: Sample shuffle-buffer size (0 or 1: none; shard order is then kept too).
        use_syn: Add one synthetic caption per sample (`syn_text`, `syn_caption`, `teacher_syn_text_features`).
        p_syn_swap: If > 0, instead replace the real caption by a synthetic one with this probability.
        syn_key_regex: Which `syn.json` keys to sample from (Apple's `--dataset-reinforcement-syn-text-key-regex`).
        aug_sampling: `random` augmentation/caption per sample, or `sequential` (`epoch % n`, Apple's
            `--dataset-reinforcement-sample-sequential`).
        trust_pickle: Allow `pth.gz` members (pickle). Never for untrusted data.
        teacher_dims: Per-teacher widths (list, or `{name: dim}`) for shards without `teach.json`.
        resampled: Draw shards with replacement forever (webdataset's `ResampledShards`), for equal-length epochs
            across nodes.
        epoch: Initial epoch (see `set_epoch` on the returned dataset).

    Returns:
        An `IterableDataset` of dicts with the keys of docs/DESIGN.md "Training samples"; batch it with `collate`.
    """
    if not 0.0 <= p_syn_swap <= 1.0:
        raise ValueError(f"p_syn_swap must be in [0, 1], got {p_syn_swap}")
    if aug_sampling not in ("random", "sequential"):
        raise ValueError(f"aug_sampling must be 'random' or 'sequential', got {aug_sampling!r}")
    re.compile(syn_key_regex)
    return _ReinforcedDataset(
        shard_urls(urls),
        resampled=resampled,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        image_size=image_size,
        interpolation=interpolation,
        tokenize=tokenize,
        use_syn=use_syn,
        p_syn_swap=p_syn_swap,
        syn_key_regex=syn_key_regex,
        aug_sampling=aug_sampling,
        trust_pickle=trust_pickle,
        teacher_dims=teacher_dims,
    )


# ------------------------------------------------------------------------------------------------ image-text samples


class _ImageTextDataset(_EpochDataset):
    def __init__(self, shards: list, *, shuffle: int, seed: int, epoch: int, **opts: Any) -> None:
        super().__init__(epoch)
        self.shards = shards
        self.shuffle = shuffle
        self.seed = seed
        self.opts = opts

    def __iter__(self) -> Iterator[dict]:
        from reinforced_data.sources import check_caption, iter_samples

        epoch = self.epoch
        shards = _split_items(self.shards, self.seed, epoch, shuffle=self.shuffle > 0)
        rank, _ = _node_info()
        worker, _ = _worker_info()
        raw = (s for shard in shards for s in iter_samples(shard))
        rng = random.Random(_stable_int(self.seed, "buffer", epoch, rank, worker))
        o = self.opts
        for sample in _shuffle(raw, self.shuffle, rng):
            captions = [sample.caption, *[c for c in sample.captions if c != sample.caption]]
            valid = [text for reason, text in map(check_caption, captions) if reason is None]
            if sample.image is None or not valid:
                continue
            try:
                img = decode_image(sample.image, o["max_pixels"])
            except ImageDecodeError as exc:
                _logger.debug("skipping %s: %s", sample.uid, exc)
                continue
            aug: AugmentCfg | None = o["augment"]
            gen = record_rng(self.seed, sample.uid, epoch)
            if aug is None:
                view = center_view(img, o["image_size"], o["interpolation"])
                idx = 0
            else:
                view = replay(img, sample_record(img.width, img.height, gen, aug), o["image_size"], o["interpolation"])
                idx = int(gen.integers(len(valid)))
            out = {"image": to_uint8_tensor(view), "text": o["tokenize"]([valid[idx]])[0], "caption": valid[idx]}
            if o["alt_caption"]:
                # another real caption of the same image (the same one when it has only one)
                others = [c for k, c in enumerate(valid) if k != idx] or valid
                alt = others[int(gen.integers(len(others)))]
                out.update(syn_text=o["tokenize"]([alt])[0], syn_caption=alt)
            yield out


def image_text_pipeline(
    source: str | os.PathLike | None,
    *,
    image_size: int,
    interpolation: str = "bicubic",
    tokenize: Tokenize,
    augment: AugmentCfg | None = None,
    seed: int = 0,
    captions: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    corpus_dir: str | os.PathLike = "~/.cache/mobileclip-distill/shapes",
    shuffle: int = 1000,
    epoch: int = 0,
    max_pixels: int | None = 89_478_485,
    shard_size: int = 256,
    alt_caption: bool = False,
) -> torch.utils.data.IterableDataset:
    """Plain image-caption samples `{image, text, caption}` for online distillation or training from scratch.

    Args:
        source: Webdataset tars, an image folder (+ `captions`), a flickr8k-style root, or None for the shapes corpus.
        image_size: Output resolution.
        interpolation: Resize filter.
        tokenize: The student's tokenizer.
        augment: DataCompDR-style augmentation sampled per sample and epoch (its `crop_size` sets the translate
            pixels); None: open_clip's eval view (resize + center crop) and the first caption.
        seed: Seed of shard order, shuffle buffer, augmentations and caption choice (among a sample's captions).
        captions: Captions file for an image folder.
        split_file: Image names to keep (e.g. flickr8k splits/train.txt).
        corpus_dir: Where the shapes corpus is generated when `source` is None.
        shuffle: Shuffle-buffer size (0 or 1: none, shard order kept).
        epoch: Initial epoch (see `set_epoch`).
        max_pixels: Skip images larger than this.
        shard_size: Images per virtual shard of a folder input (the unit split across workers and nodes).
        alt_caption: Also return `syn_text` / `syn_caption`: another real caption of the image (flickr8k and the
            corpus have five), the online counterpart of stored synthetic captions.
    """
    from reinforced_data.sources import resolve_inputs

    shards = resolve_inputs(
        source, captions=captions, split_file=split_file, corpus_dir=corpus_dir, shard_size=shard_size
    )
    return _ImageTextDataset(
        shards,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        image_size=image_size,
        interpolation=interpolation,
        tokenize=tokenize,
        augment=augment,
        max_pixels=max_pixels,
        alt_caption=alt_caption,
    )


# ------------------------------------------------------------------------------------------------------- collation


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: tensors are stacked, dicts of tensors stacked per key, strings kept as lists.

    Raises:
        ValueError: When samples do not share the same keys.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys and set(s) != set(keys):
            raise ValueError(f"samples have different keys: {sorted(keys)} vs {sorted(s)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            out[key] = torch.as_tensor(np.stack(values))
        elif isinstance(first, Mapping):
            out[key] = collate(values)
        elif isinstance(first, (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = list(values)
    return out
