"""Atomic file writes, checksums, advisory locks and the provenance of the running code (git SHA, versions).

Every output of the toolkit is written through `atomic_path` (or one of the `atomic_write_*` shortcuts): the data
goes to a temp file *in the destination directory* (so the final `os.replace` never crosses file systems, whatever
`TMPDIR` is), is fsynced, then renamed over the target. A killed writer leaves at most a `*.tmp-<pid>` file, which
`remove_stale_temps` cleans up; readers never see a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "FileLock",
    "LockedError",
    "atomic_path",
    "atomic_replace_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "git_sha",
    "is_temp_name",
    "package_versions",
    "remove_stale_temps",
    "sha256_bytes",
    "sha256_file",
    "sha256_path",
    "temp_path",
]

TMP_MARK = ".tmp-"
"""Temp files are named `<name>.tmp-<pid>` (or `<stem>.tmp-<pid><suffix>` for suffix-sensitive writers)."""


def temp_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """The temp name for `path` in the same directory, unique to this process.

    Args:
        path: Final destination.
        keep_suffix: Put the marker before the suffix (`x.tmp-12.mlpackage`), for writers that insist on a suffix.
    """
    path = Path(path)
    if keep_suffix and path.suffix:
        return path.with_name(f"{path.stem}{TMP_MARK}{os.getpid()}{path.suffix}")
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for a name `temp_path` produces."""
    return TMP_MARK in name


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is fsynced and renamed onto `path`, on error removed.

    Works for files and for directories written by third-party savers (`save_pretrained`, coremltools): a
    directory target replaces an existing one by swapping it aside first.

    Example:
        >>> with atomic_path(out / "model.safetensors") as tmp:
        ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix=keep_suffix)
    if tmp.exists():
        _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            atomic_replace_dir(tmp, path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = 1) -> None:
    """`atomic_write_bytes` of `obj` as UTF-8 JSON with a trailing newline (non-JSON values via `str`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode("utf-8"))


def atomic_replace_dir(tmp_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished directory onto `path`; an existing `path` is swapped aside first, then removed."""
    tmp_dir, path = Path(tmp_dir), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f"{path.name}.old{TMP_MARK}{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp_dir, path)
    if old is not None:
        _remove(old)


def remove_stale_temps(directory: str | os.PathLike, *, only_dead: bool = True) -> list[Path]:
    """Delete temp files left in `directory` by killed writers; returns what was removed.

    Args:
        directory: Where to look (not recursive).
        only_dead: Keep temps whose writer process (the pid in the name) is still alive, so a live writer in
            another process is never disturbed.
    """
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not is_temp_name(p.name):
            continue
        pid = _pid_of(p.name)
        if only_dead and pid is not None and pid != os.getpid() and _alive(pid):
            continue
        _remove(p)
        removed.append(p)
    return removed


def _pid_of(name: str) -> int | None:
    digits = name.rsplit(TMP_MARK, 1)[-1]
    digits = digits.split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory (relative paths and contents of its files, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """`git rev-parse HEAD` of the checkout holding `path` (default: this package), or None outside a checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else None


def package_versions(dists: Iterable[str], missing: str = "not installed") -> dict[str, str]:
    """``{"python": X.Y.Z, dist: version}`` of the installed distributions, ``missing`` for those not installed."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = missing
    return out


class LockedError(RuntimeError):
    """Another process holds the lock."""


class FileLock:
    """An advisory lock (`fcntl.flock`) on a lock file; released when closed or when the process dies.

    The kernel drops the lock of a killed process, so a stale lock file never blocks a rerun.

    Args:
        path: The lock file (created if missing; its content is the holder's pid, for messages).
        blocking: Wait for the lock instead of raising `LockedError`.
        shared: A shared lock (many holders at once, none while an exclusive one is held), e.g. "a build is
            running" against an exclusive "the dataset is being deleted".
    """

    def __init__(self, path: str | os.PathLike, *, blocking: bool = False, shared: bool = False) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self.shared = shared
        self._file: IO[str] | None = None

    def acquire(self) -> FileLock:
        """Take the lock or raise `LockedError` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
            fcntl.flock(f.fileno(), mode | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise LockedError(f"{self.path} is locked by process {holder}") from None
        if not self.shared:  # NOTE: shared holders leave the last exclusive holder's pid in place
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays; it is harmless)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
