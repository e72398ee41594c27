"""Shared Hugging Face loading helpers: local/offline resolution and the errors a user can act on.

transformers reads weights itself (safetensors, or ``torch.load`` with ``weights_only=True`` passed explicitly,
transformers 5), so pickled code in a ``pytorch_model.bin`` is refused even with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``; `hf_load_error` turns that refusal into one line naming the directory.
"""

from __future__ import annotations

import os
import pickle

from mcd_common import UsageError
from mcd_common.weights import WeightSpec

__all__ = ["hf_load_error", "hf_location"]


def _hf_offline() -> bool:
    # transformers/huggingface_hub read these at import; read them again so a late setenv is honoured too.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def hf_location(kind: str, name: str, arch: str, weights: WeightSpec) -> tuple[str, bool]:
    """Resolve a Hugging Face source to ``(id_or_dir, local_files_only)``: ``weights.file`` (a directory) wins.

    Raises:
        UsageError: a URL source, or a ``weights.file`` that is not a directory.
    """
    if weights.url:
        raise UsageError(f"{kind} {name!r}: Hugging Face sources load from a directory or hub id, not a url")
    location = weights.file or weights.hf_hub or arch
    local = os.path.isdir(location)
    if weights.file and not local:
        raise UsageError(f"{kind} {name!r}: {location} is not a directory written by save_pretrained")
    return location, local or _hf_offline()


def hf_load_error(kind: str, name: str, location: str, err: Exception) -> Exception:
    """The error to raise when a Hugging Face model cannot be loaded.

    A refused unpickling is a `UsageError` naming the directory; anything else (usually: offline and not cached) a
    ``RuntimeError`` that names the local-directory option.
    """
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return UsageError(
            f"{kind} {name!r}: refusing to load {location}: its weights hold Python objects other than tensors; "
            "re-save the model with save_pretrained (safetensors)"
        )
    return RuntimeError(
        f"{kind} {name!r}: could not load Hugging Face model {location!r} ({type(err).__name__}: {err}). Without a "
        f"network, save it once with save_pretrained (model and processor) and pass the directory: "
        f"--{kind} hf:/path/to/dir, or --{kind}_weights /path/to/dir."
    )
