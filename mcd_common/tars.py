"""Tar shards -> samples: the one grouping rule of the toolkit, streamed or indexed by member offsets.

Every reader of webdataset tars (build-data inputs, the training reader, `--verify`, `distill eval`, export
calibration) groups members with the functions here, so they all agree on what a sample is.

The rule is webdataset's (1.0.2, `webdataset/tariterators.py`: `tar_file_iterator`, `base_plus_ext`,
`group_by_keys`, which `tarfile_to_samples` chains):

- only regular files count; top-level `__*__` entries and paths matching `__[^/]*__($|/)` are metadata, skipped;
- a member's key is its path up to the first dot of its basename, the rest is its extension, lower-cased
  (`a/b.c.JPG` -> key `a/b`, extension `c.jpg`); a basename without a dot has no key and is skipped;
- consecutive members with the same key form one sample; a tar's last sample ends with the tar.

Duplicates, where webdataset raises (a repeated extension inside one sample) or silently yields a second
sample with a key seen before (the key reappears later in the tar), follow ONE rule here: samples are never
merged. A repeated `key.ext` inside a run closes the current sample and starts a new one with the same key, and
every sample whose key already appeared earlier in the same tar is a *duplicate*: it is still yielded, and counted
in `TarStats.duplicates` (its key listed in `TarStats.duplicate_keys`) and passed to `on_duplicate`. What to do with
it is the caller's decision (build-data keeps the first and skips the rest as `duplicate_uid`; `--verify` reports
them).

Streaming (`iter_tar_samples`) holds one sample's bytes at a time and works on gzip'd tars too; random access
(`index_tar` + `TarReader`) reads headers only, then seeks to the members asked for (uncompressed tars).

A tar that cannot be read (0 bytes, not a tar, truncated) raises `TarFileError`, a `tarfile.ReadError` that names
the file: tarfile's own messages ("empty file", "unexpected end of data") do not say which of a thousand shards it
was.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TypeVar

__all__ = [
    "IndexedSample",
    "MemberRef",
    "TarFileError",
    "TarReader",
    "TarSample",
    "TarStats",
    "index_tar",
    "iter_tar_samples",
    "split_member_name",
]

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator(skip_meta=...)
_MAX_LISTED = 100  # duplicate keys listed in TarStats; the count is always complete

_T = TypeVar("_T")


def split_member_name(name: str) -> tuple[str, str] | None:
    """`(key, lower-cased extension)` of a tar member name, or None when it is not a sample member.

    Example:
        >>> split_member_name("shard/000123.syn.json")
        ('shard/000123', 'syn.json')
    """
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _SKIP_META.match(name):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


class TarFileError(tarfile.ReadError):
    """A tar that cannot be read: the message starts with its path."""


@dataclass
class TarStats:
    """What grouping one or more tars found besides samples (pass one in to collect it)."""

    samples: int = 0
    """Samples yielded (duplicates included)."""
    duplicates: int = 0
    """Samples whose key already appeared earlier in the same tar (see the module docstring)."""
    duplicate_keys: list[str] = field(default_factory=list)
    """The first keys counted in `duplicates`."""
    skipped_members: int = 0
    """Members that belong to no sample: not regular files, metadata entries, names without an extension."""


@dataclass(frozen=True)
class TarSample:
    """One sample with its bytes: `members` maps extensions to data, in tar order."""

    key: str
    members: dict[str, bytes]


@dataclass(frozen=True)
class IndexedSample:
    """One sample located in its tar: `(extension, data offset, size)` per member, in tar order."""

    key: str
    members: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class MemberRef:
    """Where one member's bytes are: a tar path, the data offset and the size."""

    path: str
    offset: int
    size: int


def _group(
    tar: tarfile.TarFile,
    take: Callable[[tarfile.TarFile, tarfile.TarInfo], _T],
    stats: TarStats | None,
    on_duplicate: Callable[[str], None] | None,
) -> Iterator[tuple[str, list[tuple[str, _T]]]]:
    """`(key, [(ext, take(member)), ...])` per sample of an open tar, by the module's rule."""
    stats = stats if stats is not None else TarStats()
    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, _T]] = []

    def close() -> Iterator[tuple[str, list[tuple[str, _T]]]]:
        assert key is not None
        stats.samples += 1
        if key in seen:
            stats.duplicates += 1
            if len(stats.duplicate_keys) < _MAX_LISTED:
                stats.duplicate_keys.append(key)
            if on_duplicate is not None:
                on_duplicate(key)
        seen.add(key)
        yield key, members

    for info in tar:
        parts = split_member_name(info.name) if info.isreg() else None
        if parts is None:
            stats.skipped_members += 1
            continue
        k, ext = parts
        if key is not None and (k != key or any(e == ext for e, _ in members)):
            yield from close()
            members = []
        key = k
        members.append((ext, take(tar, info)))
        # NOTE: drop the parsed headers as webdataset does, so a long tar does not grow a TarInfo list.
        tar.members = []
    if key is not None:
        yield from close()


def _read_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


def iter_tar_samples(
    source: str | os.PathLike | IO[bytes],
    *,
    stats: TarStats | None = None,
    on_duplicate: Callable[[str], None] | None = None,
) -> Iterator[TarSample]:
    """Stream the samples of a tar (plain or compressed), one sample's bytes in memory at a time.

    Args:
        source: A tar path or an open binary stream (read sequentially; it need not be seekable).
        stats: Collects sample, duplicate and skipped-member counts.
        on_duplicate: Called with the key of every duplicate sample (see the module docstring).
    """
    own = not hasattr(source, "read")
    name = os.fspath(source) if own else getattr(source, "name", "<stream>")
    f = open(source, "rb") if own else source  # noqa: SIM115 - closed below, after the generator finishes
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for key, members in _group(tar, _read_data, stats, on_duplicate):
                yield TarSample(key, dict(members))
    except (tarfile.TarError, EOFError) as exc:
        if isinstance(exc, TarFileError):
            raise
        raise TarFileError(f"{name}: not a readable tar ({exc})") from exc
    finally:
        if own:
            f.close()


def index_tar(
    path: str | os.PathLike,
    *,
    stats: TarStats | None = None,
    on_duplicate: Callable[[str], None] | None = None,
) -> list[IndexedSample]:
    """Every sample of an uncompressed tar with its members' offsets (headers only: no member data is read).

    Args:
        path: The tar file.
        stats: Collects sample, duplicate and skipped-member counts.
        on_duplicate: Called with the key of every duplicate sample.

    Raises:
        TarFileError: On a file that is empty, not an uncompressed tar, or truncated (a member ends past the end
            of the file), naming the file.
    """
    try:
        with tarfile.open(path, mode="r:") as tar:
            groups = _group(tar, lambda _, info: (info.offset_data, info.size), stats, on_duplicate)
            samples = [
                IndexedSample(key, tuple((ext, off, size) for ext, (off, size) in members)) for key, members in groups
            ]
            end = tar.offset  # where the header after the last member starts
            tar.fileobj.seek(end)
            trailer = tar.fileobj.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError) as exc:
        raise TarFileError(f"{os.fspath(path)}: not a readable tar ({exc})") from exc
    # NOTE: tarfile stops quietly when a file ends inside or right before a header, so a tar cut there would lose
    # its last samples unnoticed: every writer (tarfile, GNU tar, webdataset) ends with zero blocks.
    if len(trailer) < tarfile.BLOCKSIZE or trailer.strip(b"\0"):
        raise TarFileError(
            f"{os.fspath(path)}: truncated (no end-of-archive block after byte {end}; "
            f"the file has {os.path.getsize(path)} bytes)"
        )
    return samples


class TarReader:
    """Reads members by offset, keeping one open handle per tar and process.

    Safe to hand to DataLoader workers: handles are never pickled, and a handle opened in another process (a
    forked worker inheriting its parent's) is reopened, so processes never share a file offset.
    """

    def __init__(self) -> None:
        self._handles: dict[str, IO[bytes]] = {}
        self._pid = os.getpid()

    def _handle(self, path: str) -> IO[bytes]:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb")  # noqa: SIM115 - kept open, closed by close()
        return f

    def read(self, ref: MemberRef) -> bytes:
        """The bytes of one member."""
        f = self._handle(ref.path)
        f.seek(ref.offset)
        return f.read(ref.size)

    def read_sample(
        self, path: str | os.PathLike, sample: IndexedSample, exts: Sequence[str] | None = None
    ) -> dict[str, bytes]:
        """`{ext: bytes}` of an indexed sample's members (only `exts`, when given)."""
        f = self._handle(os.fspath(path))
        out: dict[str, bytes] = {}
        for ext, offset, size in sample.members:
            if exts is None or ext in exts:
                f.seek(offset)
                out[ext] = f.read(size)
        return out

    def close(self) -> None:
        """Close every handle this process opened."""
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        return {"_handles": {}, "_pid": self._pid}

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
