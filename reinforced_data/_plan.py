"""Input planning for `build-data`: every input shard indexed once (tar headers only) before any shard is built.

The plan decides, for the whole input list and the same way on every rank and every rerun:

- which inputs cannot be read (0 bytes, not a tar, truncated): *failed inputs*, named and counted in the summary,
  never built, retried by the next run;
- which samples are *duplicates*. A uid (the sanitised sample key) belongs to its first sample in input order: the
  first input shard that holds it, the first sample with it inside that shard. Every later sample with that uid, in
  the same tar or in another, is left out and counted as `duplicate_uid`. A built dataset holds each uid once, which
  is what `--verify` checks and what the training reader expects (it applies the same keep-the-first rule to data
  it did not build);
- each shard's *input digest*: the tar's size and mtime (a folder shard: its images' names, captions, sizes and
  mtimes), plus the duplicates it leaves out. A finished shard whose digest changed (its input was replaced, or an
  earlier input that failed before is readable now and claims some of its uids) is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mcd_common.tars import TarFileError
from reinforced_data.sources import InputShard, SampleRef, index_shard, sanitize_uid

__all__ = ["ShardPlan", "plan_inputs"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    """How one input shard is built."""

    shard: InputShard
    num_refs: int = 0
    """Samples `index_shard` lists (duplicates included)."""
    duplicates: tuple[int, ...] = ()
    """Positions in `index_shard(shard)` left out as duplicate uids."""
    duplicate_uids: tuple[str, ...] = ()
    """Their uids, in order."""
    digest: str = ""
    """Identity of what the output shard is built from (see the module docstring)."""
    error: str | None = None
    """Why the input cannot be read (a failed input), or None."""

    def keep(self, refs: list[SampleRef]) -> list[SampleRef]:
        """`refs` (from `index_shard`) without the duplicates."""
        drop = set(self.duplicates)
        return [r for pos, r in enumerate(refs) if pos not in drop]


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _input_digest(shard: InputShard, num_refs: int, duplicate_uids: tuple[str, ...]) -> str:
    h = hashlib.sha256(f"{shard.kind}\0{shard.name}\0{num_refs}\0".encode())
    if shard.kind == "tar":
        h.update(_stat(shard.path).encode())
    else:
        for item in shard.items:
            h.update("\0".join((item.image, *item.captions, _stat(str(Path(shard.path) / item.image)))).encode())
            h.update(b"\1")
    h.update("\0".join(duplicate_uids).encode())
    return h.hexdigest()


def plan_inputs(shards: list[InputShard]) -> list[ShardPlan]:
    """Index every input shard (headers only) and plan failures, duplicates and digests (module docstring)."""
    seen: set[str] = set()
    plans: list[ShardPlan] = []
    for shard in shards:
        try:
            refs = index_shard(shard)
        except (TarFileError, OSError) as exc:
            _logger.error("input shard %d (%s) cannot be read: %s", shard.index, shard.name, exc)
            plans.append(ShardPlan(shard, error=str(exc)))
            continue
        positions, uids = [], []
        for pos, ref in enumerate(refs):
            uid = sanitize_uid(ref.key)
            if uid in seen:
                positions.append(pos)
                uids.append(uid)
            else:
                seen.add(uid)
        if uids:
            _logger.warning(
                "input shard %d (%s): %d sample(s) repeat a uid seen earlier (kept: the first), e.g. %r",
                shard.index,
                shard.name,
                len(uids),
                uids[0],
            )
        digest = _input_digest(shard, len(refs), tuple(uids))
        plans.append(ShardPlan(shard, len(refs), tuple(positions), tuple(uids), digest))
    return plans
