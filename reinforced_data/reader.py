"""Training samples: one stored sample -> one training dict, a map-style dataset over shards, and `collate`.

`reinforced_sample` turns one sample of a reinforced shard (ours or Apple's DataCompDR: the v2 layout with
`<syn key>_emb` arrays, the v1 layout with synthetic rows appended to `text_emb`, fp16/fp32 `npz` or, with
`trust_pickle`, bf16 `pth.gz`) into a training dict: it picks one stored augmentation and replays it at the
student's size (MobileCLIP's `preprocess_dr`, apple/ml-mobileclip `training/open_clip_v2.patch`), tokenises the
real caption and one synthetic caption, and returns the matching stored teacher embeddings split per teacher.
`image_text_sample` does the same for plain image-caption data, sampling the augmentation on the fly. The keys are
those of docs/DESIGN.md "Training samples".

`ReinforcedDataset` / `ImageTextDataset` are map-style datasets over the usable samples of a list of shards (tar
member offsets from `mcd_common.tars`, folder items). An item is addressed by `(index, epoch)`: the epoch reaches the
sample explicitly, and every random choice derives from `(seed, epoch, sample)`, so what a sample becomes depends
on neither the worker count nor the order samples are read in (exact resume: `distill/data.py`).

Bad samples are left out of the index, counted by reason (`stats()`), and never served: a key seen earlier (the
first one is kept, the rule of build-data and `--verify`), and whatever the index-time checks find. For reinforced
data those read only the small members (`paug.json`, `txt`, the embedding arrays; never the image): missing members,
records that do not decode, an empty caption, empty, unreadable, non-finite or wrong-width arrays (Apple's
generator wrote empty arrays for every sample past the first batch of a shard, apple/ml-mobileclip-dr#3). Because
the index holds only usable samples, the sampler's stream, and so a resumed run, is the same on every run. An
image that still fails to decode when a sample is loaded (images are not decoded at index time: that would cost an
epoch) is replaced by the next sample, counted in `stats()["replaced_at_load"]` and logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mcd_common.errors import UsageError
from mcd_common.images import center_view, decode_image, to_uint8_tensor
from mcd_common.tars import TarFileError, TarReader
from reinforced_data import schema
from reinforced_data._io import decode_npz, decode_npz_arrays, decode_pth_gz
from reinforced_data.augment import (
    DATACOMPDR_LAYOUT,
    AugmentCfg,
    RecordLayout,
    decode_param_aug,
    decode_record,
    replay,
    sample_record,
)
from reinforced_data.sources import (
    InputShard,
    RawSample,
    SampleRef,
    check_caption,
    index_shard,
    raw_from_members,
    read_sample,
    safe_relpath,
)

__all__ = [
    "CachedTokenizer",
    "ImageTextDataset",
    "ReinforcedDataError",
    "ReinforcedDataset",
    "ReinforcedOptions",
    "Tokenize",
    "check_reinforced_members",
    "collate",
    "stored_width",
    "image_text_sample",
    "reinforced_sample",
]

_logger = logging.getLogger(__name__)

_MAX_EXAMPLES = 20  # skipped samples named in `stats()`; the counts are always complete
_BAD_ARRAYS = (ValueError, OSError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile)  # what broken npz raise

Tokenize = Callable[[list[str]], torch.Tensor]
"""A student tokenizer: `list[str] -> LongTensor [N, L]`."""


class CachedTokenizer:
    """A tokenizer that remembers the rows of the captions it has tokenized (per process, bounded).

    Training sees every caption once per epoch; CLIP's BPE tokenizer (ftfy, regex, BPE merges) costs about as much
    per caption as decoding a small image, so after the first epoch the rows come from memory. The rows are the
    wrapped tokenizer's, stored as int32 (the vocabularies fit) and returned as new int64 tensors; the memory is not
    pickled into loader workers (each fills its own).

    Args:
        tokenize: The student's tokenizer.
        max_entries: Captions remembered at most (100,000 rows of 77 tokens: ~31 MB); later ones are tokenized
            each time.
    """

    def __init__(self, tokenize: Tokenize, max_entries: int = 100_000) -> None:
        self.tokenize, self.max_entries = tokenize, max_entries
        self._rows: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, object]:
        return {"tokenize": self.tokenize, "max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._rows = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._rows]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            fresh = dict(zip(missing, self.tokenize(missing).to(torch.int32), strict=True))
            if len(self._rows) + len(fresh) <= self.max_entries:
                self._rows.update((t, row.clone()) for t, row in fresh.items())  # own storage, not the batch's
        return torch.stack([self._rows[t] if t in self._rows else fresh[t] for t in texts]).long()


class ReinforcedDataError(UsageError):
    """A dataset that cannot be read as asked (unknown schema, missing teacher dims, pickle not allowed)."""


@dataclass(frozen=True)
class ReinforcedOptions:
    """How `reinforced_sample` reads a stored sample (the `--data.*` choices of a reinforced run)."""

    image_size: int
    """Student resolution the stored crop is replayed at."""
    interpolation: str = "bicubic"
    """Student's resize filter."""
    use_syn: bool = True
    """Add one synthetic caption per sample (`syn_text`, `syn_caption`, `teacher_syn_text_features`)."""
    p_syn_swap: float = 0.0
    """If > 0, instead replace the real caption by a synthetic one with this probability (Apple's
    `--dataset-reinforcement-mix-synthetic`)."""
    syn_key_regex: str = schema.APPLE_SYN_KEY_REGEX
    """Which `syn.json` keys to sample synthetic captions from (Apple's `--dataset-reinforcement-syn-text-key-regex`;
    the `syn_text_gt` placeholder is never sampled: it is the real caption, the fallback anyway)."""
    alt_captions: bool = True
    """Also sample the image's other real captions (`alt_text`, schema 1: `syn_text_alt`) as second captions."""
    record_layout: RecordLayout = DATACOMPDR_LAYOUT
    """Layout of the stored augmentation records (`RecordLayout.from_config` of the dataset's `config.json`)."""
    aug_sampling: Literal["random", "sequential"] = "random"
    """`random` augmentation/caption per sample, or `sequential` (`epoch % n`, Apple's
    `--dataset-reinforcement-sample-sequential`)."""
    trust_pickle: bool = False
    """Allow `pth.gz` members (pickle). Never for untrusted data."""
    teacher_dims: tuple[tuple[str, int], ...] | Mapping[str, int] | Sequence[int] = ()
    """Teacher widths for shards without `teach.json` (DataCompDR): `{name: dim}` or a list of dims (named
    `teacher0`, `teacher1`, ...); stored as `(name, dim)` pairs."""

    def __post_init__(self) -> None:
        dims = self.teacher_dims
        if dims and not (isinstance(dims, tuple) and all(isinstance(d, tuple) for d in dims)):
            pairs = tuple((name, s.stop - s.start) for name, s in schema.teacher_slices(dims).items())
            object.__setattr__(self, "teacher_dims", pairs)
        if not 0.0 <= self.p_syn_swap <= 1.0:
            raise UsageError(f"--data.p_syn_swap must be in [0, 1], got {self.p_syn_swap}")
        if self.aug_sampling not in ("random", "sequential"):
            raise UsageError(f"aug_sampling must be 'random' or 'sequential', got {self.aug_sampling!r}")
        try:
            re.compile(self.syn_key_regex)
        except re.error as err:
            raise UsageError(f"syn_key_regex {self.syn_key_regex!r} is not a regular expression ({err})") from None
        self.record_layout.check_replayable()


# ---------------------------------------------------------------------------------------------- one stored sample


@functools.lru_cache(maxsize=16)
def _slices_of_teach(teach_bytes: bytes) -> dict[str, slice]:
    try:
        return schema.teacher_slices(schema.check_teach(json.loads(teach_bytes)))
    except ValueError as exc:
        raise ReinforcedDataError(str(exc)) from exc


def _slices(members: Mapping[str, bytes], opts: ReinforcedOptions, where: str) -> dict[str, slice]:
    if schema.KEY_TEACH in members:
        return _slices_of_teach(members[schema.KEY_TEACH])
    if not opts.teacher_dims:
        raise ReinforcedDataError(
            f"{where} has no teach.json (a DataCompDR shard?): pass teacher_dims "
            "(e.g. --data.teacher_dims [768,768] for DataCompDR's two ViT-L/14 teachers)"
        )
    return schema.teacher_slices(dict(opts.teacher_dims))


def _embeddings(members: Mapping[str, bytes], opts: ReinforcedOptions, where: str) -> dict[str, np.ndarray]:
    if schema.KEY_NPZ in members:
        return decode_npz(members[schema.KEY_NPZ])
    if schema.KEY_PTH in members:
        if not opts.trust_pickle:
            raise ReinforcedDataError(
                f"{where} stores embeddings as pth.gz, a pickle that can run code when loaded; pass "
                "trust_pickle=True (--data.trust_pickle true) only for data you trust"
            )
        return decode_pth_gz(members[schema.KEY_PTH], name=f"{where} pth.gz")
    raise ValueError("no npz or pth.gz member")


def _is_v1(arrays: Mapping[str, np.ndarray]) -> bool:
    # DataCompDR v1: synthetic rows follow the real caption inside text_emb, no `<syn key>_emb` arrays.
    has_syn_arrays = any(
        k.endswith(schema.EMB_SUFFIX) and k.startswith((schema.SYN_KEY, schema.ALT_KEY)) for k in arrays
    )
    return not has_syn_arrays and arrays[schema.TEXT_EMB].shape[0] > 1


def check_reinforced_members(members: Mapping[str, bytes], opts: ReinforcedOptions, where: str) -> str | None:
    """Why a stored sample cannot be trained on, or None: the index-time check of its small members.

    Args:
        members: At least `paug.json`, `txt` and `npz` | `pth.gz` (and `teach.json` when the sample has one); the
            image is not needed.
        opts: Reading options (teacher widths for shards without `teach.json`, `trust_pickle`, record layout).
        where: Names the sample in messages.

    Returns:
        `bad_paug`, `no_records`, `bad_caption`, `empty_caption`, `unreadable_embeddings`, `empty_embeddings`,
        `wrong_width`, `nonfinite_embeddings`, or None for a usable sample.

    Raises:
        ReinforcedDataError: When the dataset cannot be read as asked (pickle not allowed, teacher widths unknown,
            a schema newer than this code): an error, not a skipped sample.
    """
    try:
        records = decode_param_aug(members[schema.KEY_PAUG])
        if records:
            # NOTE: the first record only: a layout mismatch shows there; decoding all K costs ~35 us each.
            decode_record(records[0], opts.record_layout)
    except (ValueError, KeyError, TypeError, IndexError):
        return "bad_paug"
    if not records:
        return "no_records"
    try:
        caption = members[schema.KEY_TXT].decode("utf-8").strip()
    except (UnicodeDecodeError, KeyError):
        return "bad_caption"
    if not caption:
        return "empty_caption"
    slices = _slices(members, opts, where)
    try:
        if schema.KEY_NPZ in members:
            arrays = decode_npz_arrays(members[schema.KEY_NPZ], (schema.IMAGE_EMB, schema.TEXT_EMB))
        else:
            arrays = _embeddings(members, opts, where)
    except ReinforcedDataError:
        raise
    except _BAD_ARRAYS:
        return "unreadable_embeddings"
    width = max(s.stop for s in slices.values())
    for name in (schema.IMAGE_EMB, schema.TEXT_EMB):
        arr = arrays.get(name)
        if arr is None or arr.ndim != 2 or 0 in arr.shape:
            return "empty_embeddings"
        if arr.shape[1] != width:
            return "wrong_width"
        if not np.isfinite(arr).all():
            return "nonfinite_embeddings"
    return None


def stored_width(members: Mapping[str, bytes], trust_pickle: bool = False) -> int | None:
    """The width of a stored sample's `image_emb` rows, or None when it has no readable, non-empty array (a
    `pth.gz` member counts only with `trust_pickle`)."""
    try:
        if schema.KEY_NPZ in members:
            arrays = decode_npz(members[schema.KEY_NPZ])
        elif schema.KEY_PTH in members and trust_pickle:
            arrays = decode_pth_gz(members[schema.KEY_PTH])
        else:
            return None
    except _BAD_ARRAYS:
        return None
    arr = arrays.get(schema.IMAGE_EMB)
    return None if arr is None or arr.ndim != 2 or 0 in arr.shape else int(arr.shape[1])


def _caption_keys(syn: Mapping[str, object], opts: ReinforcedOptions) -> list[str]:
    """`syn.json` keys a second caption is drawn from, in file order (see `ReinforcedOptions`)."""
    regex = re.compile(opts.syn_key_regex)
    alt = (schema.ALT_KEY, schema.LEGACY_ALT_KEY)
    keys = []
    for k, v in syn.items():
        if k == schema.GT_PLACEHOLDER_KEY or not (isinstance(v, list) and v):
            continue
        if k in alt and not opts.alt_captions:
            continue
        if regex.match(k) or (k in alt and opts.alt_captions):
            keys.append(k)
    return keys


def _features(row: np.ndarray, slices: Mapping[str, slice]) -> dict[str, torch.Tensor]:
    row = np.asarray(row, dtype=np.float32)
    return {
        name: torch.from_numpy(np.ascontiguousarray(part))
        for name, part in schema.split_embeddings(row, slices).items()
    }


def _pick(n: int, epoch: int, rng: np.random.Generator, opts: ReinforcedOptions) -> int:
    return epoch % n if opts.aug_sampling == "sequential" else int(rng.integers(n))


def _pick_syn(
    members: Mapping[str, bytes],
    arrays: Mapping[str, np.ndarray],
    epoch: int,
    rng: np.random.Generator,
    opts: ReinforcedOptions,
) -> tuple[str, np.ndarray] | None:
    """One synthetic caption and its stored embedding row, or None when the sample has none to offer."""
    if schema.KEY_SYN not in members:
        return None
    syn = json.loads(members[schema.KEY_SYN])
    if not isinstance(syn, dict):
        return None
    v1 = _is_v1(arrays)
    keys = _caption_keys(syn, opts)
    if v1:
        # v1 rows are [GT, syn_text...]: only the plain key has embeddings.
        keys = [k for k in keys if k == schema.SYN_KEY]
    else:
        keys = [k for k in keys if schema.syn_emb_name(k) in arrays]
    if not keys:
        return None
    key = keys[int(rng.integers(len(keys)))]
    texts = syn[key]
    if v1:
        idx = _pick(min(len(texts), arrays[schema.TEXT_EMB].shape[0] - 1), epoch, rng, opts)
        return str(texts[idx]), arrays[schema.TEXT_EMB][1 + idx]
    emb = arrays[schema.syn_emb_name(key)]
    idx = _pick(min(len(texts), emb.shape[0]), epoch, rng, opts)
    return str(texts[idx]), emb[idx]


PartnerImage = Callable[[str | int], Image.Image | None]
"""Looks up the original image of a mixing record's partner by its stored id (None when it is not available)."""


def _view(
    image_bytes: bytes,
    record: list,
    opts: ReinforcedOptions,
    partner_image: PartnerImage | None,
    where: str,
) -> Image.Image:
    rec = decode_record(record, opts.record_layout)
    partner = None
    if rec.needs_partner:
        if partner_image is not None and rec.partner is not None:
            partner = partner_image(rec.partner)
        if partner is None:
            kinds = [k for k in ("mixup", "cutmix") if getattr(rec, k) is not None]
            raise ReinforcedDataError(
                f"{where}: its augmentation record mixes ({', '.join(kinds)}) it with sample {rec.partner!r}, whose "
                "image is not in this dataset; add the partner's shards to --data.path (the stored embedding is of "
                "the mixed view, so the record cannot be replayed without it)"
            )
    return replay(decode_image(image_bytes), rec, opts.image_size, opts.interpolation, partner=partner)


def reinforced_sample(
    members: Mapping[str, bytes],
    epoch: int,
    rng: np.random.Generator,
    opts: ReinforcedOptions,
    tokenize: Tokenize,
    where: str = "sample",
    partner_image: PartnerImage | None = None,
) -> dict:
    """Turn one stored reinforced sample into a training dict.

    Args:
        members: The sample's tar members, `{ext: bytes}` (`jpg`, `txt`, `paug.json`, `npz` | `pth.gz`, ...).
        epoch: Training epoch (`sequential` sampling takes record `epoch % K`).
        rng: The sample's generator for this epoch (augmentation and caption choices).
        opts: Reading options.
        tokenize: The student's tokenizer.
        where: Names the sample in messages.
        partner_image: Finds the partner image of a mixup / cutmix record (`ReinforcedDataset` looks it up among
            its samples).

    Returns:
        `image` uint8 `[3, S, S]`, `text` `[L]`, `caption`, `teacher_image_features` / `teacher_text_features`
        (`{teacher: float [D_k]}`), and with `use_syn` also `syn_text`, `syn_caption`, `teacher_syn_text_features`.

    Raises:
        ReinforcedDataError: When the dataset cannot be read as asked (pickle not allowed, teacher dims unknown,
            schema newer than this code, a mixing record whose partner is missing); other errors mean a corrupt
            sample.
    """
    image_bytes = next((members[k] for k in schema.IMAGE_KEYS if k in members), None)
    if image_bytes is None:
        raise ValueError("no image member (jpg/png/webp): join URL-only shards with their images first")
    records = decode_param_aug(members[schema.KEY_PAUG])
    arrays = _embeddings(members, opts, where)
    slices = _slices(members, opts, where)
    image_emb = arrays[schema.IMAGE_EMB]
    aug_idx = _pick(min(len(records), image_emb.shape[0]), epoch, rng, opts)
    view = _view(image_bytes, records[aug_idx], opts, partner_image, where)
    caption = members[schema.KEY_TXT].decode("utf-8").strip()
    text_emb = arrays[schema.TEXT_EMB]
    out = {
        "image": to_uint8_tensor(view),
        "text": tokenize([caption])[0],
        "caption": caption,
        "teacher_image_features": _features(image_emb[aug_idx], slices),
        "teacher_text_features": _features(text_emb[0], slices),
    }
    if not (opts.use_syn or opts.p_syn_swap > 0):
        return out
    # NOTE: a sample without synthetic captions repeats its real caption, so every sample has the same keys.
    syn_caption, syn_row = _pick_syn(members, arrays, epoch, rng, opts) or (caption, text_emb[0])
    if opts.p_syn_swap > 0:
        # Apple's --dataset-reinforcement-mix-synthetic: swap GT for synthetic, no second caption term.
        if rng.random() < opts.p_syn_swap:
            out["caption"] = syn_caption
            out["text"] = tokenize([syn_caption])[0]
            out["teacher_text_features"] = _features(syn_row, slices)
        return out
    out["syn_text"] = tokenize([syn_caption])[0]
    out["syn_caption"] = syn_caption
    out["teacher_syn_text_features"] = _features(syn_row, slices)
    return out


def image_text_sample(
    raw: RawSample,
    rng: np.random.Generator,
    image_size: int,
    interpolation: str,
    tokenize: Tokenize,
    augment: AugmentCfg | None,
) -> dict:
    """Turn one plain image-caption sample into a training dict `{image, text, caption}`.

    Args:
        raw: The input sample (`reinforced_data.sources.read_sample`).
        rng: The sample's generator for this epoch (augmentation record, caption choice).
        image_size: Output resolution.
        interpolation: Resize filter.
        tokenize: The student's tokenizer.
        augment: A DataCompDR-style augmentation sampled from `rng` (its `crop_size` sets the translate pixels),
            or None for open_clip's evaluation view (resize + centre crop).

    Raises:
        ValueError: When the sample has no image or no usable caption (`sources.check_caption`).
    """
    if raw.image is None:
        raise ValueError(raw.error or "no image")
    candidates = raw.captions or [raw.caption]
    captions = [text for reason, text in map(check_caption, candidates) if reason is None]
    if not captions:
        raise ValueError("no usable caption")
    img = decode_image(raw.image)
    if augment is not None:
        view = replay(img, sample_record(img.width, img.height, rng, augment), image_size, interpolation)
    else:
        view = center_view(img, image_size, interpolation)
    caption = captions[int(rng.integers(len(captions)))]
    return {"image": to_uint8_tensor(view), "caption": caption, "text": tokenize([caption])[0]}


# ------------------------------------------------------------------------------------------------ map-style data


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class _ShardDataset(Dataset):
    """The usable samples of a list of shards, addressed by `(index, epoch)`; subclasses build the training dict.

    Indexing reads tar headers, leaves out a key seen earlier (the first one is kept) and every sample `check`
    rejects, and counts them by reason (module docstring).

    Raises:
        UsageError: When a shard cannot be read, or no sample is usable.
    """

    def __init__(self, shards: Sequence[InputShard], seed: int) -> None:
        self.shards = list(shards)
        self.seed = seed
        self._reader = TarReader()
        self.num_indexed = 0
        self.skipped: Counter[str] = Counter()
        """Samples left out of the index, by reason."""
        self.skipped_examples: list[str] = []
        self.refs: list[tuple[int, SampleRef]] = []
        seen: set[str] = set()
        for k, shard in enumerate(self.shards):
            try:
                refs = index_shard(shard)
            except (TarFileError, OSError) as exc:
                raise UsageError(
                    f"--data.path: shard {shard.name} cannot be read ({exc}); replace it or leave it out"
                ) from None
            for ref in refs:
                self.num_indexed += 1
                # NOTE: folder items are unique image paths; tar keys can repeat (in one tar or across tars).
                reason = "duplicate_uid" if ref.item is None and ref.key in seen else self.check(shard, ref)
                seen.add(ref.key)
                if reason is None:
                    self.refs.append((k, ref))
                    continue
                self.skipped[reason] += 1
                if len(self.skipped_examples) < _MAX_EXAMPLES:
                    self.skipped_examples.append(f"{shard.name}:{ref.key}: {reason}")
        self._replaced = multiprocessing.Value("q", 0)  # NOTE: shared memory, so worker processes count too
        if self.skipped:
            _logger.warning(
                "%d of %d samples are not usable and were left out %s, e.g. %s",
                sum(self.skipped.values()),
                self.num_indexed,
                dict(sorted(self.skipped.items())),
                self.skipped_examples[0],
            )
        if not self.refs:
            raise UsageError(
                f"--data.path: none of the {self.num_indexed} samples of {len(self.shards)} shard(s) is usable "
                f"({dict(sorted(self.skipped.items()))}, e.g. {self.skipped_examples[:1]}); check it with "
                "`distill build-data --verify DIR`"
            )

    def __len__(self) -> int:
        return len(self.refs)

    def check(self, shard: InputShard, ref: SampleRef) -> str | None:
        """Why sample `ref` of `shard` cannot be used (a skip reason), or None. Cheap: no image is decoded."""
        return None

    def stats(self) -> dict:
        """What indexing and loading found: `samples_indexed`, `samples_usable`, `skipped` (by reason),
        `skipped_examples` (the first few), `replaced_at_load` (images that failed to decode when loaded)."""
        return {
            "samples_indexed": self.num_indexed,
            "samples_usable": len(self.refs),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": list(self.skipped_examples),
            "replaced_at_load": int(self._replaced.value),
        }

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        # NOTE: every sample passed the index-time checks; what still fails here is an image that does not decode.
        # It is replaced by the next sample (deterministically) and counted; a dataset that cannot be read as
        # asked (ReinforcedDataError) is an error.
        for attempt in range(len(self.refs)):
            i = (index + attempt) % len(self.refs)
            try:
                return self.load(i, epoch)
            except ReinforcedDataError:
                raise
            except (OSError, ValueError, KeyError) as err:
                with self._replaced.get_lock():
                    self._replaced.value += 1
                _logger.warning(
                    "sample %s could not be loaded (%s); the next sample is served instead", self.refs[i][1].key, err
                )
        raise RuntimeError("no readable sample in the dataset")

    def load(self, i: int, epoch: int) -> dict:
        """The training dict of sample `i` at `epoch`."""
        raise NotImplementedError


class ReinforcedDataset(_ShardDataset):
    """Reinforced shards: one stored augmentation replayed at the student's size + the stored teacher targets.

    A sample's draws are keyed by `(seed, epoch, uid)`.

    Args:
        shards: Tar shards of a reinforced dataset.
        opts: Reading options.
        tokenize: The student's tokenizer.
        seed: Seed of every random choice.
    """

    def __init__(self, shards: Sequence[InputShard], opts: ReinforcedOptions, tokenize: Tokenize, seed: int) -> None:
        self.opts, self.tokenize = opts, tokenize
        self._keys: dict[str | int, int] | None = None
        super().__init__(shards, seed)

    def check(self, shard: InputShard, ref: SampleRef) -> str | None:
        """Members present and not empty (from the tar index), then `check_reinforced_members` on the small ones."""
        sizes = {ext: size for ext, _, size in ref.members}
        image = next((k for k in schema.IMAGE_KEYS if k in sizes), None)
        emb = schema.KEY_NPZ if schema.KEY_NPZ in sizes else (schema.KEY_PTH if schema.KEY_PTH in sizes else None)
        if image is None:
            return "no_image"
        if schema.KEY_PAUG not in sizes:
            return "no_paug"
        if schema.KEY_TXT not in sizes:
            return "no_caption"
        if emb is None:
            return "no_embeddings"
        if 0 in (sizes[image], sizes[schema.KEY_PAUG], sizes[emb]):
            return "empty_member"
        exts = (schema.KEY_PAUG, schema.KEY_TXT, emb, schema.KEY_TEACH)
        members = self._reader.read_sample(shard.path, ref.indexed, exts=exts)
        return check_reinforced_members(members, self.opts, f"{shard.path}:{ref.key}")

    def load(self, i: int, epoch: int) -> dict:
        shard_idx, ref = self.refs[i]
        shard = self.shards[shard_idx]
        members = self._reader.read_sample(shard.path, ref.indexed)
        rng = np.random.default_rng(_stable_int(self.seed, "sample", epoch, ref.key))
        partner = self.partner_image if self.opts.record_layout.mixing else None
        return reinforced_sample(members, epoch, rng, self.opts, self.tokenize, f"{shard.path}:{ref.key}", partner)

    def partner_image(self, partner: str | int) -> Image.Image | None:
        """The original image of the sample a mixing record names (by key; an integer id also matches a numeric
        key such as `000000042`), or None when the dataset does not hold it."""
        if self._keys is None:
            self._keys = {}
            for n, (_, ref) in enumerate(self.refs):
                self._keys.setdefault(ref.key, n)
                if ref.key.isdigit():
                    self._keys.setdefault(int(ref.key), n)
        n = self._keys.get(partner if isinstance(partner, int) else str(partner))
        if n is None:
            return None
        shard_idx, ref = self.refs[n]
        members = self._reader.read_sample(self.shards[shard_idx].path, ref.indexed, exts=schema.IMAGE_KEYS)
        data = next((members[k] for k in schema.IMAGE_KEYS if k in members), None)
        return decode_image(data) if data is not None else None


class ImageTextDataset(_ShardDataset):
    """Plain image-caption data: a DR-style augmentation sampled on the fly (or a centre view), one random caption.

    A sample's draws are keyed by `(seed, epoch, index)`.

    Args:
        shards: Tar or folder shards (`reinforced_data.sources.resolve_inputs`).
        tokenize: The student's tokenizer.
        image_size: Output resolution.
        interpolation: Resize filter.
        augment: Augmentation sampled per sample and epoch, or None for the evaluation view.
        seed: Seed of every random choice.
    """

    def __init__(
        self,
        shards: Sequence[InputShard],
        tokenize: Tokenize,
        image_size: int,
        interpolation: str,
        augment: AugmentCfg | None,
        seed: int,
    ) -> None:
        self.tokenize, self.image_size, self.interpolation, self.augment = tokenize, image_size, interpolation, augment
        super().__init__(shards, seed)

    def check(self, shard: InputShard, ref: SampleRef) -> str | None:
        """An image member or file, and a usable caption (`check_caption`; tars: the `txt` / `json` members)."""
        if ref.item is not None:
            if not safe_relpath(ref.item.image):
                return "unsafe_path"
            if not os.path.isfile(os.path.join(shard.path, ref.item.image)):
                return "missing_image"
            captions: list[str | bytes | None] = list(ref.item.captions)
        else:
            exts = {ext for ext, _, _ in ref.members}
            if not any(k in exts for k in schema.IMAGE_KEYS):
                return "no_image"
            raw = raw_from_members(ref.key, self._reader.read_sample(shard.path, ref.indexed, exts=("txt", "json")))
            captions = [*raw.captions, raw.caption] if raw.captions else [raw.caption]
        reasons = [check_caption(c).skip_reason for c in captions]
        return None if None in reasons else reasons[0]

    def load(self, i: int, epoch: int) -> dict:
        shard_idx, ref = self.refs[i]
        raw = read_sample(self.shards[shard_idx], ref, self._reader)
        rng = np.random.default_rng([self.seed, epoch, i, 0x5EED])
        return image_text_sample(raw, rng, self.image_size, self.interpolation, self.tokenize, self.augment)


# ------------------------------------------------------------------------------------------------------- collation


def collate(samples: Sequence[Mapping[str, object]]) -> dict:
    """Batch sample dicts: tensors stacked, dicts of tensors stacked per key, numbers as tensors, the rest as lists.

    Raises:
        ValueError: When samples do not share the same keys (the message names the keys that differ).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = list(samples[0])
    for n, s in enumerate(samples[1:], 1):
        if set(s) != set(keys):
            missing, extra = sorted(set(keys) - set(s)), sorted(set(s) - set(keys))
            raise ValueError(
                f"samples have different keys: sample {n} lacks {missing} and adds {extra} compared to sample 0"
            )
    out: dict = {}
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
