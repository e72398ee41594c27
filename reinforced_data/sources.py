"""Input samples for `build-data` and the online/scratch pipelines, grouped into input shards.

Three input kinds (docs/DESIGN.md, reinforced_data):

- webdataset tar shards as img2dataset writes them (image in `jpg`/`jpeg`/`png`/`webp`, caption in `txt` or in
  `json["caption"]`), given as local paths with brace patterns (`data/{00000..00009}.tar`), globs, a directory of
  tars, or several specs joined with `::` (webdataset's separator); one tar is one shard;
- an image folder plus a captions file: CSV with an `image,caption` header (several rows per image allowed) or
  JSONL (`{"image": ..., "caption": str | [str]}`), optionally restricted by a split file listing image names.
  A directory holding `images/` and `captions.csv` (flickr8k's layout) is recognised as such. Images are sorted by
  name and cut into virtual shards of `shard_size` images. Rows that cannot be used are counted by reason in
  `InputStats.rows_skipped`, never dropped silently: a row without a caption, an image path that is absolute or
  leaves the image folder (`..`), a JSONL line that is not an object; a UTF-8 byte-order mark is accepted;
- the embedded shapes corpus (`shapes.py`), the default when no input is given.

Tar members are grouped into samples by `mcd_common.tars` (webdataset's rule; duplicate keys are reported there,
never merged). Shards are indexed lazily (tar headers only, no pixel data), so memory stays bounded by what the
caller keeps.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple

import braceexpand

from mcd_common.errors import UsageError
from mcd_common.tars import IndexedSample, TarReader, TarStats, index_tar
from reinforced_data import schema
from reinforced_data.shapes import DEFAULT_CORPUS_DIR, ensure_shapes_corpus

__all__ = [
    "CheckedCaption",
    "InputShard",
    "InputStats",
    "RawSample",
    "SampleRef",
    "check_caption",
    "index_shard",
    "iter_samples",
    "load_captions",
    "manifest_shards",
    "raw_from_members",
    "read_sample",
    "resolve_inputs",
]

_logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "image_path", "path", "img")
_CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentence", "raw")
_UID_BAD = re.compile(r"[^A-Za-z0-9_\-/]+")
_MAX_EXAMPLES = 20  # skipped rows listed in InputStats; the counts are always complete


@dataclass(frozen=True)
class FolderItem:
    """One image of a folder input: its path relative to the folder and its captions (file order)."""

    image: str
    captions: tuple[str, ...]


@dataclass
class InputStats:
    """What resolving an input found besides samples (pass one to `resolve_inputs` / `load_captions` to collect it)."""

    rows_skipped: Counter[str] = field(default_factory=Counter)
    """Captions-file rows not used, by reason: `no_caption` (no or blank caption), `no_image_name`,
    `unsafe_path` (absolute, or leaving the image folder with `..`), `not_json` (a JSONL line that is not an
    object), `short_row` (a CSV row that ends before its image column)."""
    examples: list[str] = field(default_factory=list)
    """`file:line: reason` of the first skipped rows."""
    captions_file: str | None = None
    """The captions file an image folder was read with (found next to it when not given)."""

    def skip(self, where: str, reason: str) -> None:
        """Count one unused row."""
        self.rows_skipped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")


@dataclass(frozen=True)
class InputShard:
    """A unit of work: one tar, or a contiguous run of folder images."""

    index: int
    """Position in the ordered input list; the output shard is `{index:08d}.tar`."""
    name: str
    """Human-readable origin (tar path, or `<folder>#<k>`), recorded in the progress sidecar."""
    kind: Literal["tar", "folder"]
    path: str
    """The tar file, or the image folder."""
    items: tuple[FolderItem, ...] = ()
    """Folder shards: their images and captions."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: its tar members `(ext, offset, size)` (see `mcd_common.tars`), or a folder item."""

    key: str
    members: tuple[tuple[str, int, int], ...] = ()
    item: FolderItem | None = None

    @property
    def indexed(self) -> IndexedSample:
        """The tar sample this ref points at."""
        return IndexedSample(self.key, self.members)


@dataclass
class RawSample:
    """One input sample before decoding. Captions are kept as read (a `bytes` caption may be non-UTF-8)."""

    uid: str
    image: bytes | None
    caption: str | bytes | None
    captions: list[str] = field(default_factory=list)
    """All real captions when the input has several (the first is `caption`)."""
    url: str | None = None
    meta: dict[str, object] = field(default_factory=dict)
    """Input metadata (the tar's `json` member, or the folder item's path)."""
    error: str | None = None
    """Skip reason found while reading (e.g. `missing_image`)."""


class CheckedCaption(NamedTuple):
    """A caption after `check_caption`: why it must be skipped (None when usable) and its normalised text."""

    skip_reason: str | None
    """`no_caption`, `caption_not_utf8`, `empty_caption`, or None for a usable caption."""
    text: str
    """Whitespace-normalised caption ("" when skipped)."""


def check_caption(caption: str | bytes | None) -> CheckedCaption:
    """Validate a caption: `(skip reason or None, whitespace-normalised caption)`.

    Reasons: `no_caption`, `caption_not_utf8` (bytes, or lone surrogates from a captions file), `empty_caption`.
    """
    if caption is None:
        return CheckedCaption("no_caption", "")
    if isinstance(caption, bytes):
        return CheckedCaption("caption_not_utf8", "")
    try:
        caption.encode("utf-8")  # lone surrogates (undecodable bytes in a captions file) fail here
    except UnicodeEncodeError:
        return CheckedCaption("caption_not_utf8", "")
    text = " ".join(caption.split())
    if not text:
        return CheckedCaption("empty_caption", "")
    return CheckedCaption(None, text)


def safe_relpath(name: str) -> bool:
    """True when `name` is a relative path that stays inside its folder (no leading `/` or `~`, no `..` part)."""
    if not name or os.path.isabs(name) or name.startswith("~"):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def sanitize_uid(key: str) -> str:
    """A webdataset-safe key: no dots (webdataset splits keys at the first dot), only `[A-Za-z0-9_-/]`."""
    uid = _UID_BAD.sub("_", key).strip("/")
    return uid or "_"


# ----------------------------------------------------------------------------------------------------------- inputs


def expand_paths(spec: str) -> list[str]:
    """Paths of a spec: `::`-joined parts, each brace-expanded (`{000..009}`), globs sorted, `~` expanded."""
    out: list[str] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        for path in braceexpand.braceexpand(part):
            if any(c in path for c in "*?["):
                out.extend(sorted(glob.glob(path)))
            else:
                out.append(path)
    return out


def manifest_shards(root: str | os.PathLike) -> list[str]:
    """The shard paths a dataset root's `manifest.jsonl` lists, in its order.

    Reads our lines (`{"shard": "00000000.tar", "num_samples", ...}`) and RayGen's (`{"shard": "00000000",
    "num_uids"}`: no `.tar` suffix, apple/ml-mobileclip-dr `scripts/gen.py`). Tars in the root that the manifest
    does not list (a build killed before recording them) are left out, with a warning.

    Raises:
        UsageError: On a line that is not JSON or names no shard.
    """
    root = Path(os.path.expanduser(str(root)))
    out: list[str] = []
    for n, line in enumerate((root / schema.MANIFEST_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            shard = json.loads(line)["shard"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{root / schema.MANIFEST_FILE}:{n}: expected a JSON object with a 'shard' name") from None
        path = root / str(shard)
        if not path.is_file() and not str(shard).endswith(".tar"):
            path = root / f"{shard}.tar"  # RayGen writes the name without the suffix
        out.append(str(path))
    unlisted = sorted(set(str(p) for p in root.glob("*.tar")) - set(out))
    if unlisted:
        _logger.warning(
            "%d tar(s) in %s are not listed in %s and are ignored, e.g. %s",
            len(unlisted),
            root,
            schema.MANIFEST_FILE,
            unlisted[0],
        )
    return out


def resolve_inputs(
    input: str | os.PathLike | None = None,
    *,
    captions: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    shard_size: int = 1000,
    corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR,
    corpus_split: str = "train",
    stats: InputStats | None = None,
) -> list[InputShard]:
    """Resolve an input spec into ordered input shards.

    Args:
        input: Tar paths (brace patterns, globs, `::`-joined lists, or a directory of tars: a dataset root with a
            `manifest.jsonl` gives the shards it lists, see `manifest_shards`), an image folder, a directory with
            `images/` + `captions.csv|jsonl`, or None / "shapes" for the embedded corpus.
        captions: Captions file for an image folder.
        split_file: Image names to keep (one per line), e.g. flickr8k `splits/train.txt`.
        shard_size: Images per virtual shard of a folder input.
        corpus_dir: Where the embedded corpus lives when `input` is None (generated with the default config unless
            a complete corpus is already there).
        corpus_split: Corpus split to use ("train" or "val").
        stats: Collects the captions-file rows that were not used (image folders; see `InputStats`).

    Raises:
        UsageError: When the spec matches nothing, or on an inconsistent spec (e.g. a folder without captions).
    """
    if shard_size < 1:
        raise UsageError(f"--build.shard_size must be >= 1, got {shard_size}")
    spec = None if input is None else str(input)
    if spec is None or spec in ("shapes", "shapes:train", "shapes:val"):
        split = spec.split(":", 1)[1] if spec and ":" in spec else corpus_split
        root = Path(os.path.expanduser(str(corpus_dir)))
        meta = ensure_shapes_corpus(root)
        paths = [str(root / p) for p in meta["shards"][split]]
        return [InputShard(index=k, name=p, kind="tar", path=p) for k, p in enumerate(paths)]

    paths = expand_paths(spec)
    if not paths:
        raise UsageError(f"--data.path {spec!r} matches no file")
    if len(paths) == 1 and os.path.isdir(paths[0]) and (Path(paths[0]) / schema.MANIFEST_FILE).is_file():
        paths = manifest_shards(paths[0])
    elif len(paths) == 1 and os.path.isdir(paths[0]):
        folder = Path(paths[0])
        tars = sorted(str(p) for p in folder.glob("*.tar"))
        if tars and captions is None:
            paths = tars
        else:
            return _folder_shards(folder, captions, split_file, shard_size, stats)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"--data.path: {len(missing)} shard(s) not found, e.g. {missing[0]!r}")
    if split_file is not None:
        _logger.warning("--data.split_file applies to image folders only; ignored for tar shards")
    return [InputShard(index=k, name=p, kind="tar", path=p) for k, p in enumerate(paths)]


def _folder_shards(
    folder: Path,
    captions: str | os.PathLike | None,
    split_file: str | os.PathLike | None,
    shard_size: int,
    stats: InputStats | None,
) -> list[InputShard]:
    image_dir = folder
    if captions is None:
        # flickr8k-style root: images/ + captions.csv (or .jsonl)
        for name in ("captions.csv", "captions.jsonl", "captions.json"):
            if (folder / name).is_file():
                captions = folder / name
                break
        if captions is None:
            raise UsageError(
                f"--data.path {str(folder)!r} is an image folder: pass --data.captions FILE (CSV `image,caption` "
                "or JSONL)"
            )
    if (folder / "images").is_dir() and not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.iterdir()):
        image_dir = folder / "images"
    stats = stats if stats is not None else InputStats()
    stats.captions_file = str(captions)
    table = load_captions(captions, stats)
    if stats.rows_skipped:
        _logger.warning(
            "captions file %s: %d row(s) not used %s, e.g. %s",
            captions,
            sum(stats.rows_skipped.values()),
            dict(stats.rows_skipped),
            stats.examples[0],
        )
    if split_file is not None:
        if not Path(split_file).is_file():
            raise UsageError(f"--data.split_file {str(split_file)!r}: no such file")
        keep = {line.strip() for line in Path(split_file).read_text(encoding="utf-8-sig").splitlines() if line.strip()}
        table = {k: v for k, v in table.items() if k in keep or os.path.basename(k) in keep}
        if not table:
            raise UsageError(f"--data.split_file {str(split_file)!r} keeps none of the {len(keep)} listed images")
    names = sorted(table)
    shards = []
    for k, start in enumerate(range(0, len(names), shard_size)):
        items = tuple(FolderItem(n, tuple(table[n])) for n in names[start : start + shard_size])
        shards.append(InputShard(index=k, name=f"{image_dir}#{k}", kind="folder", path=str(image_dir), items=items))
    if not shards:
        raise UsageError(f"captions file {str(captions)!r} lists no image")
    return shards


def _pick_column(header: list[str], options: tuple[str, ...], what: str, path: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for opt in options:
        if opt in lowered:
            return lowered.index(opt)
    raise UsageError(f"captions file {path!r}: no {what} column (expected one of {options}, got {header})")


def load_captions(path: str | os.PathLike, stats: InputStats | None = None) -> dict[str, list[str]]:
    """Read a captions file into `{image name: [captions in file order]}`.

    CSV needs a header with an image column (`image`, `filename`, ...) and a caption column (`caption`, `text`,
    ...); several rows per image add captions. JSONL lines are objects with the same keys, the caption a string or a
    list. A UTF-8 byte-order mark is accepted. Bytes that are not UTF-8 are kept as lone surrogates, so the builder
    can count and skip such captions instead of failing on the whole file. Rows that cannot be used (no caption, an
    unsafe image path, a line that is not a JSON object) are left out and counted in `stats`.

    Raises:
        UsageError: When the file is missing, empty, or has no image/caption column.
    """
    path = str(path)
    stats = stats if stats is not None else InputStats()
    table: dict[str, list[str]] = {}
    if not os.path.isfile(path):
        raise UsageError(f"captions file {path!r}: no such file")
    # NOTE: utf-8-sig drops the byte-order mark spreadsheet exports put before the header.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        rows = _jsonl_rows(f, path, stats) if path.endswith((".jsonl", ".json")) else _csv_rows(f, path, stats)
        for where, image, caps in rows:
            if not image:
                stats.skip(where, "no_image_name")
                continue
            if not safe_relpath(image):
                stats.skip(where, "unsafe_path")
                continue
            usable = [c for c in caps if c is not None and str(c).strip()]
            if not usable:
                stats.skip(where, "no_caption")
                continue
            table.setdefault(image, []).extend(str(c) for c in usable)
    return table


_Row = tuple[str, str, list]  # (file:line, image name, captions as read)


def _jsonl_rows(f: Iterator[str], path: str, stats: InputStats) -> Iterator[_Row]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            stats.skip(f"{path}:{n}", "not_json")
            continue
        img_key = next((k for k in _IMAGE_COLUMNS if k in obj), None)
        cap_key = next((k for k in _CAPTION_COLUMNS if k in obj), None)
        caps = obj.get(cap_key) if cap_key is not None else None
        caps = caps if isinstance(caps, list) else [caps]
        yield f"{path}:{n}", str(obj[img_key]).strip() if img_key is not None else "", caps


def _csv_rows(f: Iterator[str], path: str, stats: InputStats) -> Iterator[_Row]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise UsageError(f"captions file {path!r} is empty")
    ci = _pick_column(header, _IMAGE_COLUMNS, "image", path)
    cc = _pick_column(header, _CAPTION_COLUMNS, "caption", path)
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row or not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) <= ci:
            stats.skip(where, "short_row")
            continue
        yield where, row[ci].strip(), [row[cc] if len(row) > cc else None]


# ----------------------------------------------------------------------------------------------------------- reading


def index_shard(shard: InputShard, stats: TarStats | None = None) -> list[SampleRef]:
    """List a shard's samples in order (tar headers only; no image data is read).

    Tar members are grouped by `mcd_common.tars` (webdataset's rule); a key that repeats is a separate sample,
    counted in `stats.duplicates`.
    """
    if shard.kind == "folder":
        return [SampleRef(key=sanitize_uid(os.path.splitext(it.image)[0]), item=it) for it in shard.items]
    return [SampleRef(key=s.key, members=s.members) for s in index_tar(shard.path, stats=stats)]


def _str_or_bytes(data: bytes) -> str | bytes:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def read_sample(shard: InputShard, ref: SampleRef, reader: TarReader | None = None) -> RawSample:
    """Read one sample's bytes.

    Args:
        shard: The shard `ref` comes from.
        ref: From `index_shard(shard)`.
        reader: Open tar handles to reuse (one per worker); a temporary one is used when None.
    """
    if ref.item is not None:
        return _read_folder_item(shard, ref)
    if reader is None:
        with TarReader() as own:
            return raw_from_members(ref.key, own.read_sample(shard.path, ref.indexed))
    return raw_from_members(ref.key, reader.read_sample(shard.path, ref.indexed))


def raw_from_members(key: str, data: dict[str, bytes]) -> RawSample:
    """A tar sample's `{ext: bytes}` as a `RawSample` (image, caption from `txt` or `json`, captions, url, meta)."""
    meta: dict[str, object] = {}
    if schema.KEY_JSON in data:
        try:
            parsed = json.loads(data[schema.KEY_JSON])
            meta = parsed if isinstance(parsed, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    image = next((data[k] for k in schema.IMAGE_KEYS if k in data), None)
    caption: str | bytes | None = None
    if schema.KEY_TXT in data:
        caption = _str_or_bytes(data[schema.KEY_TXT])
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    elif isinstance(meta.get("text"), str):
        caption = meta["text"]
    captions: list[str] = []
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c for c in listed if isinstance(c, str)]
    url = None
    if schema.KEY_URL in data:
        url = data[schema.KEY_URL].decode("utf-8", errors="replace").strip()
    elif isinstance(meta.get("url"), str):
        url = meta["url"]
    return RawSample(uid=sanitize_uid(key), image=image, caption=caption, captions=captions, url=url, meta=meta)


def _read_folder_item(shard: InputShard, ref: SampleRef) -> RawSample:
    item = ref.item
    assert item is not None
    path = Path(shard.path) / item.image
    caption = item.captions[0] if item.captions else None
    image: bytes | None = None
    if not safe_relpath(item.image):  # NOTE: load_captions refuses these; a hand-made item must not escape either
        error: str | None = "unsafe_path"
    else:
        try:
            image, error = path.read_bytes(), None
        except OSError:
            error = "missing_image"
    return RawSample(
        uid=ref.key,
        image=image,
        caption=caption,
        captions=list(item.captions),
        meta={"image_path": item.image},
        error=error,
    )


def iter_samples(shard: InputShard) -> Iterator[RawSample]:
    """Stream a shard's samples in order (one open file, one sample in memory at a time)."""
    refs = index_shard(shard)
    with TarReader() as reader:
        for ref in refs:
            yield read_sample(shard, ref, reader)
