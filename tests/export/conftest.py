"""Fixtures for the export tests: tiny students with non-trivial norm statistics, saved checkpoints, images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _perturb(student: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics, LayerNorm affines and layer scales, so folding and rewrites are really tested."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        for name, p in student.named_parameters():
            if "layer_scale" in name or name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
    return student.eval()


@pytest.fixture
def make_student() -> Callable[[str], torch.nn.Module]:
    """``make_student(name)``: a registered tiny student in eval mode with perturbed norm statistics."""
    import students

    def _make(name: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return _perturb(students.create_student(name))

    return _make


@pytest.fixture(scope="module")
def saved_mct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ``test_tiny_mct`` student directory (``students.save_student``)."""
    import students

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("student") / "test_tiny_mct"
    students.save_student(_perturb(students.create_student("test_tiny_mct")), out)
    return out


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six small RGB PNGs in a folder plus two JPEGs in a webdataset-style tar shard."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        arr = rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    with tarfile.open(folder / "shard-000000.tar", "w") as tf:
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"sample{i:04d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    return folder


@pytest.fixture
def student_embedding() -> Callable[[torch.nn.Module, str, torch.Tensor], torch.Tensor]:
    """The student's own L2-normalised embedding of a tower input (uint8/[0,1] pixels or int tokens): what an
    exported program is checked against, independently of the export wrappers."""

    def embed(student: torch.nn.Module, tower: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if tower == "image":
                return student.encode_image(student.normalize(x))
            return student.encode_text(x.long())

    return embed
