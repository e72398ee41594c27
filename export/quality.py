"""How much a quantised (or otherwise changed) export moves retrieval and zero-shot results.

The evaluation itself lives in ``distill`` (datasets, prompts); these helpers take embeddings, so the lead can
call them with the outputs of the FP32 and the int8 programs on the same data:

    ref = {"image": fp32_image_emb, "text": fp32_text_emb, "classes": fp32_class_emb}
    test = {"image": int8_image_emb, "text": int8_text_emb, "classes": int8_class_emb}
    quantization_delta(ref, test, text_to_image=caption_image_ids, labels=image_labels)

`embed_with_pte` runs a ``.pte`` over a batch one sample at a time (the programs have batch 1).
`agreement_delta` is what ``distill export`` records for every int8 artifact when no labelled data is at hand:
the FP32 towers' own zero-shot predictions and text-to-image matches on held-out images are the labels, so the
delta is how often int8 changes an answer (reference metrics are 1.0 by construction).

References: CLIP zero-shot protocol (Radford et al., 2021); Flickr/COCO retrieval R@K.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from export.executorch import PteRunner

__all__ = ["Embedder", "agreement_delta", "embed_with_pte", "embedding_metrics", "quantization_delta"]

Embedder = Callable[[torch.Tensor], torch.Tensor]
"""Inputs `[B, ...]` -> embeddings `[B, D]` (an eager tower, a ``.pte``, an ONNX Runtime session)."""


def embed_with_pte(path: Path, inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Embeddings `[N, D]` of ``inputs`` (each `[1, ...]` or a batch `[B, ...]`, split into rows) from a ``.pte``."""
    runner = PteRunner(Path(path))
    return torch.cat([runner(x) for x in inputs])


def _recall(sim: torch.Tensor, positives: list[set[int]], ks: tuple[int, ...]) -> dict[int, float]:
    top = sim.topk(max(ks), dim=1).indices
    return {
        k: sum(bool(set(top[i, :k].tolist()) & positives[i]) for i in range(len(positives))) / len(positives)
        for k in ks
    }


@torch.no_grad()
def embedding_metrics(
    image: torch.Tensor,
    text: torch.Tensor | None = None,
    *,
    text_to_image: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval recall@K and zero-shot top-1 from embeddings.

    Args:
        image: Image embeddings `[N, D]`.
        text: Caption embeddings `[M, D]` (retrieval).
        text_to_image: For each caption, the index of its image `[M]` (retrieval).
        classes: Class embeddings `[C, D]` (zero-shot).
        labels: Class index of each image `[N]` (zero-shot).
        ks: Recall cut-offs (clipped to the gallery size).
    """
    image = F.normalize(image.float(), dim=-1)
    out: dict[str, float] = {}
    if text is not None and text_to_image is not None:
        text = F.normalize(text.float(), dim=-1)
        t2i = text_to_image.long().tolist()
        sim = text @ image.T  # [M, N]
        kt = tuple(k for k in ks if k <= image.shape[0]) or (1,)
        for k, v in _recall(sim, [{j} for j in t2i], kt).items():
            out[f"t2i_R@{k}"] = v
        captions_of: list[set[int]] = [set() for _ in range(image.shape[0])]
        for c, j in enumerate(t2i):
            captions_of[j].add(c)
        ki = tuple(k for k in ks if k <= text.shape[0]) or (1,)
        for k, v in _recall(sim.T, captions_of, ki).items():
            out[f"i2t_R@{k}"] = v
    if classes is not None and labels is not None:
        pred = (image @ F.normalize(classes.float(), dim=-1).T).argmax(dim=-1)
        out["zeroshot_top1"] = (pred == labels.long()).float().mean().item()
    return out


@torch.no_grad()
def quantization_delta(
    reference: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    *,
    text_to_image: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the reference and test embeddings, their difference, and how far the embeddings moved.

    Args:
        reference: ``{"image": [N, D], "text": [M, D] (optional), "classes": [C, D] (optional)}`` (e.g. FP32).
        test: The same keys from the quantised programs.
        text_to_image: Caption -> image index `[M]` (enables retrieval metrics).
        labels: Image class indices `[N]` (enables zero-shot metrics).

    Returns:
        ``{"reference": {...}, "test": {...}, "delta": {metric: test - reference}, "agreement": {...}}`` where
        agreement holds the mean/min cosine between reference and test embeddings per tower.
    """

    def metrics(d: dict[str, torch.Tensor]) -> dict[str, float]:
        return embedding_metrics(
            d["image"], d.get("text"), text_to_image=text_to_image, classes=d.get("classes"), labels=labels
        )

    ref, tst = metrics(reference), metrics(test)
    agreement = {}
    for key in ("image", "text", "classes"):
        if key in reference and key in test:
            cos = F.cosine_similarity(reference[key].float(), test[key].float(), dim=-1)
            agreement[f"{key}_cosine_mean"] = cos.mean().item()
            agreement[f"{key}_cosine_min"] = cos.min().item()
    return {
        "reference": ref,
        "test": tst,
        "delta": {k: tst[k] - ref[k] for k in ref if k in tst},
        "agreement": agreement,
    }


@torch.no_grad()
def agreement_delta(
    reference: dict[str, Embedder],
    test: dict[str, Embedder],
    images: Sequence[torch.Tensor],
    captions: torch.Tensor,
    class_prompts: Sequence[torch.Tensor],
) -> dict[str, dict[str, float]]:
    """`quantization_delta` with the reference's own answers as labels (zero-shot and text-to-image R@K).

    Args:
        reference: ``{"image": fn, "text": fn}`` of the reference (FP32) towers.
        test: The same for the changed (int8) towers (pass a reference tower where only one is quantised).
        images: Held-out images, each `[1, 3, H, W]` or `[B, 3, H, W]`.
        captions: Token rows `[M, L]` used as retrieval queries.
        class_prompts: One `[T, L]` token batch per class (prompt templates), averaged into a class embedding.
    """

    def embed(fns: dict[str, Embedder]) -> dict[str, torch.Tensor]:
        image = F.normalize(torch.cat([fns["image"](x) for x in images]).float(), dim=-1)
        per_class = [F.normalize(F.normalize(fns["text"](t).float(), dim=-1).mean(0), dim=-1) for t in class_prompts]
        return {
            "image": image,
            "text": F.normalize(fns["text"](captions).float(), dim=-1),
            "classes": torch.stack(per_class),
        }

    ref, tst = embed(reference), embed(test)
    labels = (ref["image"] @ ref["classes"].T).argmax(dim=1)  # [N]: the reference's zero-shot answers
    text_to_image = (ref["text"] @ ref["image"].T).argmax(dim=1)  # [M]: the reference's best image per caption
    return quantization_delta(ref, tst, text_to_image=text_to_image, labels=labels)
