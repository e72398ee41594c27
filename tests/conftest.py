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
