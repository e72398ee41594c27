"""The reinforced-shard schema: tar member keys, npz array names, dataset-root files and `SCHEMA_VERSION`.

The layout is a superset of Apple's DataCompDR (apple/ml-mobileclip `training/`, apple/ml-mobileclip-dr
`src/raygen/datasetio.py::TarWriter`): every member DataCompDR defines keeps its name and meaning, so Apple's loader
reads our shards and ours reads theirs; our extras live in new keys only (`teach.json`). This module is the single
source of truth for those names; the builder, the reader and `verify` import them from here.

Per sample (webdataset tar, `__key__` = uid)::

    jpg        original image bytes (any PIL format; omitted with --build.keep_images false)
    url.txt    source URL when known
    txt        the real caption
    json       {"uid", "sha256" (of the image bytes), ...input metadata}
    syn.json   {"syn_text[_<tag>]": [str x S], "alt_text": [str x A]}   always written (schema 2), see below
    paug.json  {"param_aug": [record x K]}             DataCompDR augmentation records (see `augment.py`)
    npz        float16: image_emb [K, sum(D)], text_emb [1, sum(D)], <syn.json key>_emb [S, sum(D)]
    teach.json teachers in slice order (name, source, dim, logit_scale, preprocessing)   (new in this toolkit)

`syn.json` keys: `syn_text[_<tag>]` synthetic captions, one key per captioner; `alt_text` the image's other real
(human) captions (schema 1 stored them as `syn_text_alt`, still read); `syn_text_gt` = `[the real caption]`, written
only when a sample has no synthetic caption (no captioner, or it produced none), with its `text_emb` row as
embedding. Apple's v2 loader (apple/ml-mobileclip 4144bb1f081a, `training/open_clip_v2.patch`, `preprocess_dr`)
reads `syn.json` unconditionally and draws one key matching `--dataset-reinforcement-syn-text-key-regex` (default
`^syn_text.*$`, which must match a non-empty list), then the row of `<key>_emb` (or, for v1 data where `text_emb`
has more rows than real captions, the rows after them): so every sample carries a matching key, human captions
live under a key that regex does not match, and the placeholder makes Apple's synthetic-caption term use the real
caption, the same fallback our reader applies (it never samples `syn_text_gt` itself).

Dataset root: `config.json` (DataCompDR schema), `teach.json` (same as the per-sample one), `manifest.jsonl`
(`{"shard": "00000000.tar", "num_samples", "sha256", "input"}` per shard; RayGen's `{"shard": "00000000",
"num_uids"}` lines, apple/ml-mobileclip-dr 418551d5a8ef `scripts/gen.py`, are read too), `progress.json` and
`_progress/<shard>.json` sidecars (resumable builds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mcd_common.errors import UsageError

__all__ = [
    "ALT_KEY",
    "APPLE_SYN_KEY_REGEX",
    "CONFIG_FILE",
    "GT_PLACEHOLDER_KEY",
    "LEGACY_ALT_KEY",
    "EMB_SUFFIX",
    "IMAGE_EMB",
    "l2_norms",
    "IMAGE_KEYS",
    "KEY_IMAGE",
    "KEY_JSON",
    "KEY_NPZ",
    "KEY_PAUG",
    "KEY_PTH",
    "KEY_SYN",
    "KEY_TEACH",
    "KEY_TXT",
    "KEY_URL",
    "MANIFEST_FILE",
    "PROGRESS_DIR",
    "PROGRESS_FILE",
    "SCHEMA_VERSION",
    "SYN_KEY",
    "SYN_TEXT_EMB",
    "TEACH_FILE",
    "TEXT_EMB",
    "check_teach",
    "split_embeddings",
    "syn_emb_name",
    "teacher_slices",
]

SCHEMA_VERSION = 2
"""Version of the layout written here (`teach.json["schema_version"]`); the reader rejects newer ones.
1: first release. 2: `syn.json` always written, other real captions under `alt_text` (was `syn_text_alt`),
`syn_text_gt` placeholder."""

# Tar member extensions (webdataset: `<uid>.<ext>`).
KEY_IMAGE = "jpg"
KEY_URL = "url.txt"
KEY_TXT = "txt"
KEY_JSON = "json"
KEY_SYN = "syn.json"
KEY_PAUG = "paug.json"
KEY_NPZ = "npz"
KEY_PTH = "pth.gz"
KEY_TEACH = "teach.json"
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image members accepted on input (we always write `jpg`, holding the original bytes whatever their format, as
DataCompDR does; PIL detects the format from the content)."""

# Arrays inside `npz` / `pth.gz`.
IMAGE_EMB = "image_emb"
TEXT_EMB = "text_emb"
EMB_SUFFIX = "_emb"
SYN_KEY = "syn_text"
SYN_TEXT_EMB = SYN_KEY + EMB_SUFFIX
ALT_KEY = "alt_text"
"""`syn.json` key of a sample's other real captions (not matched by Apple's `^syn_text.*$`)."""
LEGACY_ALT_KEY = "syn_text_alt"
"""Schema 1's key for the same (read, never written)."""
GT_PLACEHOLDER_KEY = "syn_text_gt"
"""`syn.json` key holding `[real caption]` for samples without synthetic captions (Apple's loader needs one)."""
APPLE_SYN_KEY_REGEX = r"^syn_text.*$"
"""Apple's default `--dataset-reinforcement-syn-text-key-regex` (and ours)."""

# Dataset-root files.
CONFIG_FILE = "config.json"
TEACH_FILE = "teach.json"
MANIFEST_FILE = "manifest.jsonl"
PROGRESS_FILE = "progress.json"
PROGRESS_DIR = "_progress"


def syn_emb_name(syn_key: str) -> str:
    """Array name holding the embeddings of the captions under `syn_key` (DataCompDR v2: `<key>_emb`)."""
    return syn_key + EMB_SUFFIX


def check_teach(teach: Mapping[str, object]) -> list[dict]:
    """Validate a `teach.json` object and return its teacher list.

    Raises:
        UsageError: On a missing/empty teacher list, a bad dim, or a schema version newer than this code.
    """
    version = int(teach.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"teach.json has schema_version {version}, newer than this reader ({SCHEMA_VERSION}); upgrade the toolkit"
        )
    teachers = teach.get("teachers")
    if not isinstance(teachers, list) or not teachers:
        raise UsageError("teach.json: 'teachers' must be a non-empty list")
    for t in teachers:
        if not isinstance(t, Mapping) or "name" not in t or int(t.get("dim", 0)) <= 0:
            raise UsageError(f"teach.json: bad teacher entry {t!r} (needs 'name' and a positive 'dim')")
    names = [t["name"] for t in teachers]
    if len(set(names)) != len(names):
        raise UsageError(f"teach.json: duplicate teacher names {names}")
    return [dict(t) for t in teachers]


def teacher_slices(teachers: Sequence[Mapping[str, object]] | Mapping[str, int] | Sequence[int]) -> dict[str, slice]:
    """Column slice of each teacher in a concatenated embedding, in slice order.

    Args:
        teachers: `teach.json["teachers"]` entries, a `{name: dim}` mapping, or a bare list of dims (DataCompDR
            shards carry no names: members become `teacher0`, `teacher1`, ...).
    """
    if isinstance(teachers, Mapping):
        pairs = [(str(k), int(v)) for k, v in teachers.items()]
    else:
        pairs = []
        for k, t in enumerate(teachers):
            if isinstance(t, Mapping):
                pairs.append((str(t["name"]), int(t["dim"])))
            else:
                pairs.append((f"teacher{k}", int(t)))
    out: dict[str, slice] = {}
    start = 0
    for name, dim in pairs:
        out[name] = slice(start, start + dim)
        start += dim
    return out


def split_embeddings(emb: np.ndarray, slices: Mapping[str, slice]) -> dict[str, np.ndarray]:
    """Split concatenated embeddings `[..., sum(D)]` into `{member: [..., D_k]}` views.

    Raises:
        ValueError: When the last dim differs from the sum of the slice widths.
    """
    total = max((s.stop for s in slices.values()), default=0)
    if emb.shape[-1] != total:
        raise ValueError(
            f"embedding width {emb.shape[-1]} != sum of teacher dims {total} "
            f"({ {k: s.stop - s.start for k, s in slices.items()} })"
        )
    return {name: emb[..., s] for name, s in slices.items()}


def l2_norms(emb: np.ndarray, slices: Mapping[str, slice]) -> dict[str, np.ndarray]:
    """Per-teacher L2 norms of each row of `emb` `[N, sum(D)]` (computed in float32)."""
    emb32 = np.asarray(emb, dtype=np.float32)
    return {name: np.linalg.norm(emb32[..., s], axis=-1) for name, s in slices.items()}
