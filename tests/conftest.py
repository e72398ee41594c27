"""Shared pytest fixtures: no network, fixed seeds, restored default dtype, CPU threads.

Helpers are shared through fixtures only (never ``from tests... import``), as in torchtune.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address, *args, **kwargs):  # noqa: ANN001
    # NOTE: only loopback is allowed (gloo/DDP tests, multiprocessing); anything else is a hidden download.
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise RuntimeError(f"network access is blocked in tests (tried to connect to {address!r})")
    return _real_connect(self, address, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(autouse=True)
def _seed_and_dtype() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models: one thread avoids thread-pool overhead and contention with DataLoader workers.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class _RunsCode:
    """Unpickling this runs `open(marker, "w")`: the marker file proves that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _write_malicious_checkpoint(path, marker, state: dict | None = None, style: str = "reduce"):  # noqa: ANN001, ANN202
    """A torch file that runs code when unpickled without `weights_only` (creating `marker`); returns `path`.

    `style="reduce"`: `state` (default `{}`) plus an object with a code-running `__reduce__`. `style="typeerror"`:
    a pickle that makes the `weights_only` unpickler raise `TypeError` before the code-running call, the case
    where open_clip's `load_state_dict` retries without `weights_only` (which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
    then turns into a full unpickle).
    """
    import io
    import zipfile

    if style == "reduce":
        torch.save({**(state or {}), "evil": _RunsCode(str(marker))}, path)
        return path
    buf = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buf)
    m = str(marker).encode()
    # BUILD an OrderedDict with a (None, slots) state: the weights_only unpickler's dict.update raises TypeError,
    # the full unpickler sets the slot; then GLOBAL builtins.open + REDUCE creates the marker.
    payload = (
        b"\x80\x02ccollections\nOrderedDict\n)RN}X\x01\x00\x00\x00xK\x01s\x86b0"
        b"cbuiltins\nopen\nX" + len(m).to_bytes(4, "little") + m + b"X\x01\x00\x00\x00w\x86R0}."
    )
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, payload if item.filename.endswith("data.pkl") else zin.read(item.filename))
    return path


@pytest.fixture
def malicious_checkpoint():  # noqa: ANN201
    """`malicious_checkpoint(path, marker, state=None, style="reduce")`: see `_write_malicious_checkpoint`."""
    return _write_malicious_checkpoint


# Words of the shapes corpus captions and CLIP's prompt templates, so the tiny WordPiece tokenizer below gives
# different tokens to different captions (anything else becomes [UNK] or word pieces of single letters).
_TINY_VOCAB_WORDS = (
    "a an the of on in to and with is are photo picture drawing image one two three left right above below under "
    "small large big red green blue yellow purple orange circle square triangle star cross dog cat there it"
).split()


@pytest.fixture(scope="session")
def tiny_hf_text_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A tiny random Hugging Face BERT encoder (hidden 32, 2 layers, 2 heads, 64 positions) and a WordPiece tokenizer
    (`BertTokenizerFast` from a small vocab file), written with `save_pretrained`, as a sentence-transformers model
    directory is. No network: built from a config with a fixed seed."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny_bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(specials + _TINY_VOCAB_WORDS + letters + ["##" + c for c in letters] + [".", ","]))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    return directory
