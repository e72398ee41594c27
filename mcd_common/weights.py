"""The one weight reader (never unpickling), the state-dict fit check, and `WeightSpec` (re-exported).

Every weight read of the toolkit (students, teachers, captioners, Lightning checkpoints, `.pth.gz` shard members)
goes through `read_weights` / `load_torch_bytes`: safetensors, or `torch.load(weights_only=True)` passed
explicitly (which `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot override), with no fallback that unpickles. A file that
is missing, empty, truncated or holds arbitrary Python objects gives one `UsageError` line naming the file;
`state_dict_mismatch` turns "these weights are for another architecture" into one line as well.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file

from mcd_common.errors import UsageError
from mcd_common.weight_spec import WeightSpec

__all__ = [
    "WeightSpec",
    "load_torch_bytes",
    "read_state_dict_file",
    "read_weights",
    "state_dict_mismatch",
]

_ZIP_MAGIC = b"PK"
_PICKLE_MAGIC = b"\x80"


def _torch_load(fileobj: io.IOBase | str, name: str) -> object:
    try:
        # NOTE: weights_only=True is passed explicitly: torch then ignores TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
        return torch.load(fileobj, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise UsageError(
            f"{name}: refusing to load: the file holds Python objects other than tensors and plain containers"
            f"{detail}; re-save it as a state dict (safetensors or torch.save(model.state_dict()))"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{name}: not a readable torch checkpoint ({first[:200]})") from None
    except (TypeError, KeyError, IndexError, AttributeError) as err:
        # NOTE: the weights-only unpickler raises these on malformed or crafted pickles (e.g. a BUILD it cannot
        # apply); callers that retry without weights_only on TypeError (open_clip) would then run the pickle.
        raise UsageError(
            f"{name}: refusing to load: the weights-only unpickler failed ({type(err).__name__}: {str(err)[:160]})"
        ) from None


def load_torch_bytes(data: bytes, *, name: str = "<bytes>") -> object:
    """`torch.load(weights_only=True)` of an in-memory file (e.g. a decompressed `.pth.gz` shard member)."""
    if not data:
        raise UsageError(f"{name}: empty")
    return _torch_load(io.BytesIO(data), name)


def read_weights(path: str | os.PathLike, *, what: str = "weights") -> object:
    """Read a weight file as it is stored (a state dict, or a checkpoint dict holding one), never unpickling.

    The format is detected from the content, not the suffix: a zip or pickle stream is a torch file, anything else
    must be safetensors.

    Args:
        path: The file.
        what: What the file is, for messages (`"--teacher_weights"`, `"student checkpoint"`).

    Raises:
        UsageError: missing, empty, unreadable or unsafe file (one line naming it).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{what}: no such file: {path}")
    if path.is_dir():
        raise UsageError(f"{what}: {path} is a directory; pass the weight file inside it")
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"{what}: {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return _torch_load(str(path), f"{what} {path}")
    try:
        return safetensors_load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(
            f"{what}: {path} is neither a torch checkpoint nor a safetensors file ({str(err)[:200]})"
        ) from None


def read_state_dict_file(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """`read_weights`, unwrapped to a flat `{name: tensor}` dict.

    Checkpoint wrappers are unwrapped in this order: `state_dict` (Lightning, open_clip training checkpoints),
    `model`, `module`. Non-tensor entries left after unwrapping are an error.
    """
    obj = read_weights(path, what=what)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise UsageError(f"{what}: {path} holds no state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UsageError(f"{what}: {path} is not a state dict of tensors (non-tensor entries: {bad[:5]})")
    return {str(k): v for k, v in obj.items()}


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, limit: int = 8
) -> str:
    """How `state` fails to fit a model whose own state dict is `expected`, in one line ("" when it fits).

    Lists missing keys, unexpected keys and shape mismatches (at most `limit` of each, then a count), so a
    wrong-architecture file gives an error a person can read instead of torch's multi-line `load_state_dict` report.
    """

    def _few(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"missing: {_few(missing)}" if missing else "",
        f"unexpected: {_few(unexpected)}" if unexpected else "",
        f"shape mismatch: {_few(mismatched)}" if mismatched else "",
    ]
    return "; ".join(p for p in parts if p)
