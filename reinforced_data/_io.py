"""Shard bytes: the deterministic tar writer and the embedding members (`npz`, DataCompDR's `pth.gz`).

Shards are written with fixed tar headers (mtime 0, uid 0, no user names) and npz members with a fixed zip
timestamp, so rebuilding a shard from the same inputs gives the same bytes and resumed builds can be compared with
uninterrupted ones by checksum. Generic file helpers (atomic writes, checksums) live in `mcd_common.files`.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mcd_common.files import fsync_dir, temp_path
from mcd_common.weights import load_torch_bytes

__all__ = ["TarShardWriter", "decode_npz", "decode_npz_arrays", "decode_pth_gz", "encode_npz"]

# The header dict numpy writes (`np.lib.format.write_array`), e.g. {'descr': '<f2', 'fortran_order': False,
# 'shape': (10, 1536), }
_NPY_HEADER = re.compile(
    r"\{'descr':\s*'([^']+)',\s*'fortran_order':\s*(True|False),\s*'shape':\s*\(([0-9,\s]*)\),?\s*\}"
)
_NPY_MAGIC = b"\x93NUMPY"


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
    """Load every array of an `.npz` blob (writable arrays, keys as `np.load` names them), refusing pickled ones.

    The training reader calls this for every sample: the header numpy writes is matched directly (`_parse_npy`;
    numpy's own header parser, `ast.literal_eval`, is most of the cost of a small array), anything else goes
    through numpy's reader.
    """
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for member in zf.namelist():
            arr = _read_npy(zf.read(member))
            out[member.removesuffix(".npy")] = arr if arr.flags.writeable else arr.copy()
    return out


def _parse_npy(raw: bytes) -> np.ndarray | None:
    """A `.npy` blob as an array (a view of `raw`), or None when it is not the plain form numpy writes."""
    if len(raw) < 12 or not raw.startswith(_NPY_MAGIC):
        return None
    if raw[6] == 1:
        start, hlen = 10, struct.unpack("<H", raw[8:10])[0]
    elif raw[6] in (2, 3):
        start, hlen = 12, struct.unpack("<I", raw[8:12])[0]
    else:
        return None
    match = _NPY_HEADER.match(raw[start : start + hlen].decode("latin1").strip())
    if match is None or match.group(2) == "True":
        return None
    try:
        dtype = np.dtype(match.group(1))
    except TypeError:
        return None
    shape = tuple(int(x) for x in match.group(3).split(",") if x.strip())
    count = math.prod(shape)
    if dtype.hasobject or len(raw) - start - hlen != count * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype, count=count, offset=start + hlen).reshape(shape)


def _read_npy(raw: bytes) -> np.ndarray:
    """A `.npy` blob: the direct header parse (`_parse_npy`, a read-only view) or numpy's reader (no pickles)."""
    arr = _parse_npy(raw)
    return arr if arr is not None else np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)


def decode_npz_arrays(data: bytes, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of an `.npz` blob (names it lacks are left out), refusing pickled (object) arrays.

    What the reader's index-time checks use: numpy's header parser (`ast.literal_eval`) is most of the cost of
    loading a small array, so the header numpy writes is matched directly (about 4x faster than `np.load`);
    anything else (Fortran order, other header forms, a size that does not match) goes through numpy's reader.
    """
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        entries = set(zf.namelist())
        for name in names:
            if f"{name}.npy" not in entries:
                continue
            out[name] = _read_npy(zf.read(f"{name}.npy"))
    return out


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
