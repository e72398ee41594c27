"""Fixtures for reinforced_data tests: a tiny shapes corpus, hand-written tars, and one shared tiny build."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reinforced_data import BuildArgs, CorpusCfg, InputArgs, build_data, write_shapes_corpus

# The shared build: two tiny teachers of different resolutions (32 and 48 px), shards of 10 samples built in
# batches of 3, so every shard spans several batches (apple/ml-mobileclip-dr#3).
BUILD_KW = dict(num_augs=3, batch_size=3, num_workers=0, progress=False)
SHAPES_CFG = CorpusCfg(n_train=24, n_val=4, n_zeroshot_per_class=1, shard_size=10, image_size=48)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on shared CI cores: OpenMP spinning across 2 threads is 10-100x slower than 1 thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def build_kw() -> dict:
    """BuildArgs fields of the shared build (`built`), to rebuild it in other configurations."""
    return dict(BUILD_KW)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image shapes corpus in 3 train shards (10, 10, 4 samples)."""
    root = tmp_path_factory.mktemp("corpus")
    write_shapes_corpus(root, SHAPES_CFG)
    return root


@pytest.fixture(scope="session")
def corpus_spec(corpus: Path) -> str:
    return str(corpus / "train" / "shapes-train-{000000..000002}.tar")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, corpus_spec: str) -> tuple[Path, dict]:
    """`build_data` on the corpus with the tiny ensemble (no captioner): `(out dir, summary)`."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("built") / "ds"
    summary = build_data(
        out=out, data=InputArgs(path=corpus_spec), teacher="test_tiny_ensemble", build=BuildArgs(**BUILD_KW)
    )
    return out, summary


@pytest.fixture(scope="session")
def tiny_ensemble():
    """The same (deterministic random) tiny ensemble the build used, for direct teacher calls."""
    import teachers

    return teachers.as_ensemble(teachers.create_teacher("test_tiny_ensemble"))


@pytest.fixture
def write_tar() -> Callable[[Path, list[dict]], Path]:
    """Write a webdataset tar from sample dicts (`__key__` plus `ext -> bytes|str`), open_clip test_wds style."""

    def _write(path: Path, samples: list[dict]) -> Path:
        with tarfile.open(path, "w") as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext, value in sample.items():
                    if ext == "__key__":
                        continue
                    data = value.encode() if isinstance(value, str) else value
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    return _write


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """Encode a random image: `image_bytes(w, h, mode="RGB", fmt="JPEG", seed=0)`."""

    def _make(w: int = 40, h: int = 30, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
        rng = np.random.default_rng(seed)
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
        arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    return _make


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a tar as `(key, {ext: bytes})`, in order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(info).read()
    return out


@pytest.fixture
def shard_reader() -> Callable[[Path], list[tuple[str, dict[str, bytes]]]]:
    return read_shard


@pytest.fixture
def dataset_samples(shard_reader) -> Callable[[Path], dict[str, dict[str, bytes]]]:
    """`{uid: members}` over every shard of a dataset root, via its manifest."""

    def _all(root: Path) -> dict[str, dict[str, bytes]]:
        out = {}
        for line in (root / "manifest.jsonl").read_text().splitlines():
            for key, members in shard_reader(root / json.loads(line)["shard"]):
                out[key] = members
        return out

    return _all
