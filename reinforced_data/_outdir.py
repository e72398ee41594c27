"""The output directory of `build-data`: its identity (`config.json`), locks, per-shard sidecars, the manifest.

A dataset has one identity: `config.json` records everything that changes the bytes written (`build.py`
`_identity`), and a run whose arguments differ is refused with the differing keys, or, with `--overwrite`, the old
dataset's files are removed and it is rebuilt. A finished shard is a renamed tar plus a sidecar
`_progress/<shard>.json` that records the digest of its input; a shard whose input changed since is rebuilt. An input
that could not be read leaves `_progress/<shard>.failed.json` instead, removed once the shard is built.

Concurrency (several ranks, or two processes started on one `--out` by accident), all with `fcntl.flock` locks in
`_progress/locks/` (the kernel drops the locks of a killed process):

- every build process holds `build.lock` *shared* for its whole run; `--overwrite` needs it exclusively, so it never
  deletes files under a live writer;
- `config.lock` guards the identity check and the `config.json` / `teach.json` writes;
- `<shard>.lock` is held while a shard is written: a shard is built by whoever locks it first, the others skip it;
- `manifest.lock` guards the manifest rebuild.

Temp files are removed only by the holder of the lock that guards them, whatever pid their name carries: a temp of a
live writer on another node (whose pid means nothing here) is never touched, and one of a killed writer is removed
by the next process that takes the lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

from mcd_common.errors import UsageError
from mcd_common.files import TMP_MARK, FileLock, LockedError, atomic_write_bytes, atomic_write_json
from reinforced_data import schema

__all__ = [
    "Claims",
    "check_inputs_outside",
    "check_out_dir",
    "clear_failure",
    "diff_identity",
    "open_run",
    "prepare_out",
    "read_sidecar",
    "rebuild_manifest",
    "record_failure",
    "remove_dataset",
    "shard_done",
    "shard_name",
    "sidecar_path",
]

_logger = logging.getLogger(__name__)

LOCK_DIR = "locks"
_SHARD_RE = re.compile(r"\d{8}\.tar")
_ROOT_FILES = (schema.CONFIG_FILE, schema.TEACH_FILE, schema.MANIFEST_FILE, schema.PROGRESS_FILE)
_MAX_DIFFS = 12  # differing keys named in a refusal; the count is always complete


def shard_name(index: int) -> str:
    """Output shard file name of input shard `index` (DataCompDR's `%08d.tar`)."""
    return f"{index:08d}.tar"


def sidecar_path(root: Path, index: int) -> Path:
    """`_progress/<shard>.json`: a finished shard's record."""
    return root / schema.PROGRESS_DIR / f"{shard_name(index)}.json"


def _failed_path(root: Path, index: int) -> Path:
    return root / schema.PROGRESS_DIR / f"{shard_name(index)}.failed.json"


def _lock_path(root: Path, name: str) -> Path:
    return root / schema.PROGRESS_DIR / LOCK_DIR / name


def check_out_dir(out: Path) -> None:
    """Refuse an `--out` that is a file, or lies under one (checked before any model is loaded).

    Raises:
        UsageError: Naming `--out` and the fix.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory; pass a directory for the dataset")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a directory")
            break


def check_inputs_outside(out: Path, input_paths: list[str]) -> None:
    """Refuse an `--out` that holds input tars named like its own shards (the build would overwrite them).

    Raises:
        UsageError: Naming `--out` and the input.
    """
    root = out.resolve()
    for p in input_paths:
        path = Path(p).resolve()
        if path.parent == root and _SHARD_RE.fullmatch(path.name):
            raise UsageError(
                f"--out {str(out)!r} holds the input shard {path.name}, which the output would overwrite; "
                "pass another --out directory"
            )


def open_run(out: Path, overwrite: bool) -> FileLock:
    """Take the run lock (shared) for a build of `out`; with `overwrite`, first remove the old dataset's files.

    Raises:
        UsageError: With `overwrite`, when another build-data process is writing `out`.
    """
    try:
        (out / schema.PROGRESS_DIR / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r}: cannot create the directory ({exc.strerror or exc})") from None
    path = _lock_path(out, "build.lock")
    if overwrite:
        exclusive = FileLock(path)
        try:
            exclusive.acquire()
        except LockedError:
            raise UsageError(
                f"--overwrite: another build-data process is writing --out {str(out)!r}; "
                "wait for it to finish (or stop it) before overwriting"
            ) from None
        try:
            removed = remove_dataset(out)
            _logger.info("--overwrite: removed %d file(s) of the old dataset in %s", removed, out)
        finally:
            exclusive.release()
    return FileLock(path, shared=True, blocking=True).acquire()


def remove_dataset(out: Path) -> int:
    """Delete the files a build-data run writes in `out` (shards, sidecars, root JSON files, their temps).

    Only a directory that holds a build-data dataset (`config.json` or `_progress/`) is touched, and only those
    names; other files in it are kept, and so are the lock files.

    Returns:
        How many files were removed.
    """
    progress = out / schema.PROGRESS_DIR
    if not (out / schema.CONFIG_FILE).is_file() and not progress.is_dir():
        return 0
    removed = 0
    for path in out.iterdir():
        base = path.name.split(TMP_MARK, 1)[0]
        if path.is_file() and (base in _ROOT_FILES or _SHARD_RE.fullmatch(base)):
            path.unlink()
            removed += 1
    if progress.is_dir():
        for path in progress.iterdir():
            if path.is_file() and path.name.split(TMP_MARK, 1)[0].endswith(".json"):
                path.unlink()
                removed += 1
    return removed


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


def diff_identity(old: object, new: object, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key where two JSON objects differ (values shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_identity(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]


def prepare_out(out: Path, config: dict, teach: dict) -> None:
    """Check `out`'s identity against this run's `config` (or record it), then write `teach.json`.

    Raises:
        UsageError: When `out` holds a dataset built with other arguments (the message lists the differing keys,
            old -> new), a damaged `config.json`, or shards without a `config.json`.
    """
    (out / schema.PROGRESS_DIR).mkdir(exist_ok=True)
    with FileLock(_lock_path(out, "config.lock"), blocking=True):
        for name in (schema.CONFIG_FILE, schema.TEACH_FILE):
            for tmp in out.glob(f"{name}{TMP_MARK}*"):  # NOTE: only a killed writer leaves these (we hold the lock)
                tmp.unlink(missing_ok=True)
        cfg_path = out / schema.CONFIG_FILE
        config = json.loads(json.dumps(config))  # compare in JSON form (tuples -> lists)
        how = "use a new --out directory, or pass --overwrite true to delete this dataset and rebuild it"
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UsageError(f"--out {str(out)!r}: {schema.CONFIG_FILE} is not valid JSON ({exc}); {how}") from None
            diff = diff_identity(old, config)
            if diff:
                more = f" (and {len(diff) - _MAX_DIFFS} more)" if len(diff) > _MAX_DIFFS else ""
                raise UsageError(
                    f"--out {str(out)!r} holds a dataset built with other arguments: "
                    f"{'; '.join(diff[:_MAX_DIFFS])}{more}; {how}"
                )
        else:
            if any(_SHARD_RE.fullmatch(p.name) for p in out.iterdir()):
                raise UsageError(f"--out {str(out)!r} holds shards but no {schema.CONFIG_FILE}; {how}")
            atomic_write_json(cfg_path, config)
        atomic_write_json(out / schema.TEACH_FILE, teach)


class Claims:
    """The shard locks this process holds: a shard is built by whichever process locks it first.

    Args:
        out: The dataset root.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.held: dict[int, FileLock] = {}
        self.busy: list[int] = []
        """Shards another process was writing when this one wanted them."""

    def claim(self, index: int) -> bool:
        """Lock shard `index` (False when another process holds it) and remove its temps left by killed writers."""
        lock = FileLock(_lock_path(self.out, f"{shard_name(index)}.lock"))
        try:
            lock.acquire()
        except LockedError:
            self.busy.append(index)
            return False
        self.held[index] = lock
        name = shard_name(index)
        stale = [*self.out.glob(f"{name}{TMP_MARK}*"), *(self.out / schema.PROGRESS_DIR).glob(f"{name}.*{TMP_MARK}*")]
        for path in stale:
            _logger.info("removing %s, left by an interrupted run", path.name)
            path.unlink(missing_ok=True)
        return True

    def release(self, index: int) -> None:
        """Drop the lock of shard `index` (no-op when not held)."""
        lock = self.held.pop(index, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        """Drop every lock this process holds."""
        for index in list(self.held):
            self.release(index)


def read_sidecar(root: Path, index: int) -> dict | None:
    """A finished shard's sidecar, or None when missing or unreadable."""
    try:
        info = json.loads(sidecar_path(root, index).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def shard_done(root: Path, index: int, digest: str) -> bool:
    """True when shard `index` is finished: its tar and sidecar agree and the sidecar records input `digest`."""
    info = read_sidecar(root, index)
    tar = root / shard_name(index)
    if info is None or not tar.is_file():
        return False
    return int(info.get("bytes", -1)) == tar.stat().st_size and info.get("input_digest") == digest


def record_failure(root: Path, index: int, input_name: str, error: str, rank: int) -> None:
    """Write `_progress/<shard>.failed.json` for an input that could not be read."""
    atomic_write_json(
        _failed_path(root, index), {"shard": shard_name(index), "input": input_name, "error": error, "rank": rank}
    )


def clear_failure(root: Path, index: int) -> None:
    """Remove the failure record of a shard that is now built."""
    _failed_path(root, index).unlink(missing_ok=True)


def rebuild_manifest(root: str | os.PathLike) -> dict:
    """Rebuild `manifest.jsonl` and `progress.json` from the per-shard sidecars (idempotent, no coordinator).

    Ranks call this when they finish, one at a time (`manifest.lock`), so the last one reflects every finished
    shard.

    Returns:
        The `progress.json` contents: shards done, samples, skips by reason, failed inputs, `complete`.
    """
    root = Path(root)
    side_dir = root / schema.PROGRESS_DIR
    try:
        config = json.loads((root / schema.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    expected = config.get("build", {}).get("num_input_shards")
    side_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(root, "manifest.lock"), blocking=True):
        for name in (schema.MANIFEST_FILE, schema.PROGRESS_FILE):
            for tmp in root.glob(f"{name}{TMP_MARK}*"):
                tmp.unlink(missing_ok=True)
        lines, total, skipped = [], 0, Counter()
        names = sorted(p.name for p in side_dir.glob("*.tar.json"))
        for name in names:
            info = json.loads((side_dir / name).read_text(encoding="utf-8"))
            entry = {k: info.get(k) for k in ("shard", "num_samples", "sha256", "input")}
            lines.append(json.dumps(entry))
            total += int(info["num_samples"])
            skipped.update(info.get("skipped", {}))
        failed = []
        for path in sorted(side_dir.glob("*.tar.failed.json")):
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                entry = {"shard": info["shard"], "input": info["input"], "error": info["error"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if f"{entry['shard']}.json" not in names:  # a record of a failure since fixed is stale
                failed.append(entry)
        atomic_write_bytes(root / schema.MANIFEST_FILE, "".join(line + "\n" for line in lines).encode())
        progress = {
            "num_input_shards": expected,
            "shards_done": len(names),
            "num_samples": total,
            "skipped": dict(sorted(skipped.items())),
            "failed_inputs": failed,
            "complete": expected is not None and len(names) >= expected,
        }
        atomic_write_json(root / schema.PROGRESS_FILE, progress)
    return progress
