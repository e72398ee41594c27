"""Fixtures for the students tests: perturbed tiny students and BatchNorm statistics that make folding non-trivial."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import students


def _perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Pretend training happened: random offsets on every parameter and non-trivial BatchNorm statistics."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


@pytest.fixture
def perturb() -> Callable[..., nn.Module]:
    """`perturb(model, scale=0.05)`: deterministic random offsets + BatchNorm running statistics."""
    return _perturb


@pytest.fixture
def tiny_student() -> students.CLIPStudent:
    """A `test_tiny` student with perturbed ("trained") weights, in eval mode."""
    return _perturb(students.create_student("test_tiny")).eval()


@pytest.fixture
def tiny_batch() -> Callable[[students.CLIPStudent], tuple[torch.Tensor, torch.Tensor]]:
    """`tiny_batch(student, n=3)`: normalised images `[n, 3, S, S]` and tokens of n (<= 3) captions."""

    def _make(student: students.CLIPStudent, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(7)
        pixels = torch.randint(0, 256, (n, 3, student.image_size, student.image_size), generator=gen, dtype=torch.uint8)
        tokens = student.tokenize(["a photo of a dog", "two red squares on a blue circle", "x"][:n])
        return student.normalize(pixels), tokens

    return _make
