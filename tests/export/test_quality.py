"""export.quality: retrieval / zero-shot metrics from embeddings and the int8-vs-FP32 delta."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from export.quality import agreement_delta, embedding_metrics, quantization_delta


def test_metrics_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    # two captions per image: a noisy copy of its image embedding
    t2i = torch.arange(20).repeat_interleave(2)
    text = F.normalize(image[t2i] + 0.9 * torch.randn(40, 8, generator=g), dim=-1)
    classes = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    labels = torch.randint(0, 4, (20,), generator=g)
    m = embedding_metrics(image, text, text_to_image=t2i, classes=classes, labels=labels, ks=(1, 5))
    sim = text @ image.T
    want_t2i_r1 = (sim.argmax(1) == t2i).float().mean().item()
    want_i2t_r1 = (t2i[sim.T.argmax(1)] == torch.arange(20)).float().mean().item()
    want_top1 = ((image @ classes.T).argmax(1) == labels).float().mean().item()
    assert m["t2i_R@1"] == pytest.approx(want_t2i_r1)
    assert m["i2t_R@1"] == pytest.approx(want_i2t_r1)
    assert m["zeroshot_top1"] == pytest.approx(want_top1)
    assert m["t2i_R@1"] <= m["t2i_R@5"] <= 1.0 and 0.0 < m["t2i_R@1"] < 1.0  # the noise makes it a real test


def test_quantization_delta() -> None:
    g = torch.Generator().manual_seed(1)
    ref = {"image": torch.randn(10, 6, generator=g), "classes": torch.randn(3, 6, generator=g)}
    # the reference is right on every image (cosine, like the metric)
    labels = (ref["image"] @ F.normalize(ref["classes"], dim=-1).T).argmax(1)
    same = quantization_delta(ref, {k: v.clone() for k, v in ref.items()}, labels=labels)
    assert same["reference"]["zeroshot_top1"] == 1.0 and same["delta"]["zeroshot_top1"] == 0.0
    assert abs(same["agreement"]["image_cosine_min"] - 1.0) < 1e-6
    noisy = {k: v + 3 * torch.randn(v.shape, generator=g) for k, v in ref.items()}
    moved = quantization_delta(ref, noisy, labels=labels)
    assert moved["delta"]["zeroshot_top1"] < 0 and moved["agreement"]["image_cosine_mean"] < 0.9


def test_agreement_delta_uses_the_reference_answers_as_labels() -> None:
    g = torch.Generator().manual_seed(2)
    image_w, text_w = torch.randn(12, 6, generator=g), torch.randn(50, 6, generator=g)
    reference = {"image": lambda x: x.flatten(1) @ image_w, "text": lambda t: F.one_hot(t, 50).float().mean(1) @ text_w}
    images = [torch.rand(1, 3, 2, 2, generator=g) for _ in range(8)]
    captions = torch.randint(0, 50, (6, 4), generator=g)
    prompts = [torch.randint(0, 50, (2, 4), generator=g) for _ in range(3)]
    same = agreement_delta(reference, dict(reference), images, captions, prompts)
    assert same["reference"]["zeroshot_top1"] == 1.0 and same["reference"]["t2i_R@1"] == 1.0
    assert all(v == 0.0 for v in same["delta"].values())
    noisy = dict(reference, image=lambda x: reference["image"](x) + 5 * torch.randn(x.shape[0], 6, generator=g))
    moved = agreement_delta(reference, noisy, images, captions, prompts)
    assert moved["delta"]["zeroshot_top1"] < 0 or moved["delta"]["t2i_R@1"] < 0
    assert moved["agreement"]["image_cosine_mean"] < same["agreement"]["image_cosine_mean"]
