"""Shard bytes: the deterministic tar writer and the embedding members (`npz`, DataCompDR's `pth.gz`).

Shards are written with fixed tar headers (mtime 0, uid 0, no user names) and npz members with a fixed zip
timestamp, so rebuilding a shard from the same inputs gives the same bytes and resumed builds can be compared with
uninterrupted ones by checksum. Generic file helpers (atomic writes, checksums) live in `mcd_common.files`.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mcd_common.files import fsync_dir, temp_path
from mcd_common.weights import load_torch_bytes

__all__ = ["TarShardWriter", "decode_npz", "decode_pth_gz", "encode_npz"]


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise arrays as an uncompressed `.npz` (numpy's format, readable with `np.load(allow_pickle=False)`).

    Unlike `np.savez`, zip entries get a fixed timestamp, so equal arrays give equal bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype == object:
                raise TypeError(f"array {name!r} has dtype object; npz members must not need pickle")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def decode_npz(data: bytes) -> dict[str, np.ndarray]:
    """Load every array of an `.npz` blob, refusing pickled (object) arrays."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def decode_pth_gz(data: bytes, name: str = "pth.gz") -> dict[str, np.ndarray]:
    """Load a DataCompDR `pth.gz` member (gzip'd `torch.save` dict of bf16 tensors) as float32 arrays.

    Read with `mcd_common.weights.load_torch_bytes` (`weights_only=True`: tensors and plain containers only). It
    is still pickle underneath, so callers gate this behind an explicit `trust_pickle` option.
    """
    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as f:
        obj = load_torch_bytes(f.read(), name=name)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name} must hold a dict of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        out[str(k)] = t.float().numpy()
    return out


class TarShardWriter:
    """Stream samples into a temp file next to `path`; `close()` fsyncs and renames it to `path` (atomic shard).

    Args:
        path: Final shard path.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed by close() / abort()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Append one sample: `members` maps extensions (`jpg`, `npz`, ...) to bytes, written in the given order."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            # NOTE: fixed header fields keep shard bytes a pure function of the content.
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        """Finish the tar, flush it to disk and atomically move it into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the partial shard."""
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)
