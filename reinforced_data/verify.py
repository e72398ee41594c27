"""`distill build-data --verify DIR`: check a reinforced dataset end to end.

Checks the root files (`config.json`, `teach.json`, `manifest.jsonl`, progress, inputs that failed), every shard's
checksum and sample count against the manifest, and every sample's members, shapes, dtypes, per-teacher norms,
augmentation records and image checksum (schema in `schema.py`). A uid that appears twice (in one shard or across
shards) is a problem: build-data keeps each uid's first sample only (`_plan.py`), and the training reader applies
the same keep-the-first rule to data it did not build. Nothing is unpickled: `pth.gz` members are reported, not
loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcd_common.files import is_temp_name, sha256_bytes, sha256_file
from mcd_common.tars import iter_tar_samples
from reinforced_data import schema
from reinforced_data._io import decode_npz
from reinforced_data.augment import DATACOMPDR_LAYOUT, RecordLayout, decode_param_aug, decode_record

__all__ = ["verify_dataset"]

_logger = logging.getLogger(__name__)

_MAX_LISTED = 200  # problems listed in the report; `num_problems` counts them all
_REQUIRED = (schema.KEY_TXT, schema.KEY_JSON, schema.KEY_PAUG, schema.KEY_TEACH)


class _Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.count = 0

    def add(self, msg: str) -> None:
        self.count += 1
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(msg)


def verify_dataset(root: str | os.PathLike, *, norm_tol: float = 1e-2) -> dict:
    """Check a dataset directory written by `build-data`.

    Args:
        root: Dataset root.
        norm_tol: Allowed deviation of each teacher slice's L2 norm from 1 (float16 storage gives ~1e-3).

    Returns:
        `{"ok", "root", "shards", "samples", "num_problems", "problems": [str, ...]}`; `ok` is False on any problem.
    """
    root = Path(root)
    rep = _Report()
    result = {"root": str(root), "shards": 0, "samples": 0}
    if not root.is_dir():
        rep.add(f"{root}: not a directory")
        return _finish(result, rep)
    expect = _read_root(root, norm_tol, rep)
    entries = _manifest_entries(root / schema.MANIFEST_FILE, rep)
    if expect.num_shards is not None and len(entries) != expect.num_shards:
        rep.add(f"incomplete dataset: {len(entries)} of {expect.num_shards} shards in the manifest")
    _check_root_listing(root, entries, rep)
    seen_uids: set[str] = set()
    for entry in entries:
        count = _check_shard(root, entry, expect, seen_uids, rep)
        if count is not None:
            result["shards"] += 1
            result["samples"] += count
    return _finish(result, rep)


@dataclass
class _Expected:
    """What the root files say every shard and sample must hold."""

    teach: dict | None  # the dataset's teach.json when it is valid (each sample's copy must equal it)
    slices: dict[str, slice]
    width: int | None
    version: int
    num_augs: int | None
    layout: RecordLayout
    num_shards: int | None
    norm_tol: float


def _read_root(root: Path, norm_tol: float, rep: _Report) -> _Expected:
    config = _load_json(root / schema.CONFIG_FILE, rep)
    teach = _load_json(root / schema.TEACH_FILE, rep)
    slices: dict[str, slice] = {}
    valid_teach: dict | None = None
    if teach is not None:
        try:
            slices = schema.teacher_slices(schema.check_teach(teach))
            valid_teach = teach
        except ValueError as exc:
            rep.add(f"{schema.TEACH_FILE}: {exc}")
    return _Expected(
        teach=valid_teach,
        slices=slices,
        width=max((s.stop for s in slices.values()), default=None),
        version=int((teach or {}).get("schema_version", 1)),
        num_augs=config.get("num_samples") if config else None,
        layout=_layout(config, rep),
        num_shards=(config or {}).get("build", {}).get("num_input_shards"),
        norm_tol=norm_tol,
    )


def _check_root_listing(root: Path, entries: list[dict], rep: _Report) -> None:
    """Inputs that failed (and were not built since), partial files, shards the manifest does not list."""
    for path in sorted((root / schema.PROGRESS_DIR).glob("*.tar.failed.json")):
        info = _load_json(path, rep) or {}
        if not (root / schema.PROGRESS_DIR / f"{info.get('shard')}.json").is_file():
            rep.add(
                f"{info.get('shard')}: input {info.get('input')} could not be read ({info.get('error')}); "
                "fix or replace it and rerun build-data"
            )
    listed = {e.get("shard") for e in entries}
    for path in sorted(root.iterdir()):
        if is_temp_name(path.name):
            rep.add(f"{path.name}: partial file left by an interrupted run (rerun build-data to finish)")
        elif path.suffix == ".tar" and path.name not in listed:
            rep.add(f"{path.name}: shard not listed in {schema.MANIFEST_FILE}")


def _check_shard(root: Path, entry: dict, expect: _Expected, seen_uids: set[str], rep: _Report) -> int | None:
    """One manifest entry: checksum, sample count, every sample; returns the samples read (None: no such file)."""
    name = entry.get("shard")
    path = root / str(name)
    if not path.is_file():
        rep.add(f"{name}: listed in the manifest but missing")
        return None
    if sha256_file(path) != entry.get("sha256"):
        rep.add(f"{name}: sha256 differs from the manifest (corrupted or modified shard)")
    count = 0
    try:
        for sample in iter_tar_samples(path):
            count += 1
            _check_sample(f"{name}:{sample.key}", sample.key, sample.members, expect, rep)
            if sample.key in seen_uids:
                rep.add(f"{name}:{sample.key}: duplicate uid")
            seen_uids.add(sample.key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        rep.add(f"{name}: unreadable tar ({exc})")
    if count != entry.get("num_samples"):
        rep.add(f"{name}: {count} samples, manifest says {entry.get('num_samples')}")
    return count


def _check_sample(where: str, key: str, members: dict[str, bytes], expect: _Expected, rep: _Report) -> None:
    _check_members(where, key, members, expect.teach, rep)
    syn = _json_member(where, members, schema.KEY_SYN, rep)
    if expect.version >= 2:
        _check_apple_reads(where, members, syn, rep)
    records = _check_records(where, members, expect.num_augs, expect.layout, rep)
    _check_embeddings(where, members, syn, records, expect, rep)


def _layout(config: dict | None, rep: _Report) -> RecordLayout:
    image_aug = (config or {}).get("reinforce", {}).get("image_augmentation")
    if not isinstance(image_aug, dict):
        return DATACOMPDR_LAYOUT
    try:
        return RecordLayout.from_config(image_aug)
    except ValueError as exc:
        rep.add(f"{schema.CONFIG_FILE}: reinforce.image_augmentation: {exc}")
        return DATACOMPDR_LAYOUT


def _manifest_entries(path: Path, rep: _Report) -> list[dict]:
    entries: list[dict] = []
    if not path.is_file():
        rep.add(f"{schema.MANIFEST_FILE} is missing")
        return entries
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            rep.add(f"{schema.MANIFEST_FILE}:{n}: not JSON")
    return entries


def _finish(result: dict, rep: _Report) -> dict:
    result.update(ok=rep.count == 0, num_problems=rep.count, problems=rep.problems)
    level = logging.INFO if rep.count == 0 else logging.WARNING
    _logger.log(
        level,
        "verify %s: %d shards, %d samples, %d problems",
        result["root"],
        result["shards"],
        result["samples"],
        rep.count,
    )
    return result


def _load_json(path: Path, rep: _Report) -> dict | None:
    if not path.is_file():
        rep.add(f"{path.name} is missing")
        return None
    try:
        obj = json.loads(path.read_text())
    except ValueError:
        rep.add(f"{path.name}: not valid JSON")
        return None
    if not isinstance(obj, dict):
        rep.add(f"{path.name}: expected a JSON object")
        return None
    return obj


def _check_members(where: str, key: str, sample: dict[str, bytes], teach: dict | None, rep: _Report) -> None:
    """Required members, the json metadata, the image checksum, the caption and the per-sample teach.json."""
    meta = _json_member(where, sample, schema.KEY_JSON, rep)
    if meta is not None and not isinstance(meta, dict):
        rep.add(f"{where}: json member is not an object")
    meta = meta if isinstance(meta, dict) else {}
    missing = [k for k in _REQUIRED if k not in sample]
    if schema.KEY_IMAGE not in sample and schema.KEY_URL not in sample and "image_path" not in meta:
        missing.append("jpg|url.txt")  # an image-less sample must say where its image is
    if schema.KEY_NPZ not in sample:
        missing.append(schema.KEY_NPZ if schema.KEY_PTH not in sample else "npz (pth.gz is not checked: pickle)")
    if missing:
        rep.add(f"{where}: missing members {missing}")
    if meta and meta.get("uid") != key:
        rep.add(f"{where}: json uid {meta.get('uid')!r} != key")
    if schema.KEY_IMAGE in sample and meta and meta.get("sha256") != sha256_bytes(sample[schema.KEY_IMAGE]):
        rep.add(f"{where}: image sha256 differs from json")
    if schema.KEY_TXT in sample:
        try:
            if not sample[schema.KEY_TXT].decode("utf-8").strip():
                rep.add(f"{where}: empty caption")
        except UnicodeDecodeError:
            rep.add(f"{where}: caption is not UTF-8")
    if teach is not None and schema.KEY_TEACH in sample:
        own = _json_member(where, sample, schema.KEY_TEACH, rep)
        if own is not None and own != teach:
            rep.add(f"{where}: teach.json differs from the dataset's")


def _json_member(where: str, sample: dict[str, bytes], key: str, rep: _Report) -> object | None:
    """The parsed JSON member ``key``; None when absent or not JSON (reported once, here)."""
    if key not in sample:
        return None
    try:
        return json.loads(sample[key])
    except ValueError:
        rep.add(f"{where}: {'json member' if key == schema.KEY_JSON else key} is not valid JSON")
        return None


def _check_apple_reads(where: str, sample: dict[str, bytes], syn: object | None, rep: _Report) -> None:
    """What Apple's v2 loader needs (`schema` docstring): a `syn.json` with a non-empty `^syn_text.*$` list."""
    if schema.KEY_SYN not in sample:
        rep.add(f"{where}: no syn.json (Apple's loader reads it unconditionally)")
        return
    if syn is None:
        return  # not JSON: reported by _json_member
    regex = re.compile(schema.APPLE_SYN_KEY_REGEX)
    if not isinstance(syn, dict) or not any(regex.match(k) and isinstance(v, list) and v for k, v in syn.items()):
        rep.add(f"{where}: syn.json has no non-empty {schema.APPLE_SYN_KEY_REGEX} list (Apple's loader needs one)")


def _check_records(
    where: str, sample: dict[str, bytes], num_augs: int | None, layout: RecordLayout, rep: _Report
) -> list:
    """The augmentation records (decoded by the config's layout, counted against it); [] when unreadable."""
    records: list = []
    if schema.KEY_PAUG in sample:
        try:
            records = decode_param_aug(sample[schema.KEY_PAUG])
            for rec in records:
                decode_record(rec, layout)
        except ValueError as exc:
            rep.add(f"{where}: bad paug.json ({exc})")
        if num_augs is not None and len(records) != num_augs:
            rep.add(f"{where}: {len(records)} augmentation records, config says {num_augs}")
    return records


def _check_embeddings(
    where: str, sample: dict[str, bytes], syn: object | None, records: list, expect: _Expected, rep: _Report
) -> None:
    """npz arrays: one per caption list, float16, `[rows, width]`, finite, unit norm per teacher slice."""
    slices, width, norm_tol = expect.slices, expect.width, expect.norm_tol
    if syn is not None and not isinstance(syn, dict):
        rep.add(f"{where}: syn.json is not an object")
    syn = syn if isinstance(syn, dict) else {}
    if schema.KEY_NPZ not in sample:
        return
    try:
        arrays = decode_npz(sample[schema.KEY_NPZ])
    except Exception as exc:  # numpy raises ValueError/OSError/BadZipFile for broken members
        rep.add(f"{where}: unreadable npz ({exc})")
        return
    expected = {schema.IMAGE_EMB: len(records) or None, schema.TEXT_EMB: 1}
    for name, values in syn.items():
        if isinstance(values, list):
            expected[schema.syn_emb_name(name)] = len(values)
    for name in arrays:
        if name not in expected:
            rep.add(f"{where}: npz array {name!r} has no matching captions")
    for name, rows in expected.items():
        arr = arrays.get(name)
        if arr is None:
            rep.add(f"{where}: npz lacks {name!r}")
            continue
        if arr.dtype != np.float16:
            rep.add(f"{where}: {name} has dtype {arr.dtype}, expected float16")
        if arr.ndim != 2 or (rows is not None and arr.shape[0] != rows) or (width and arr.shape[1] != width):
            rep.add(f"{where}: {name} has shape {arr.shape}, expected [{rows}, {width}]")
            continue
        if not np.isfinite(arr).all():
            rep.add(f"{where}: {name} has non-finite values")
            continue
        if slices and arr.shape[0]:
            for member, norms in schema.l2_norms(arr, slices).items():
                if np.abs(norms - 1.0).max() > norm_tol:
                    rep.add(
                        f"{where}: {name}[{member}] rows are not unit norm (max |n-1| = {np.abs(norms - 1).max():.3g})"
                    )
