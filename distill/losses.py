"""Contrastive and distillation losses for CLIP students.

Every loss is an `nn.Module` that takes tensors and returns a dict of `*_loss` terms (already weighted), so the
training total is the plain sum of the dict. Keyword names equal the model-output and batch keys, so
`loss(**student_out, **targets)` works. Softmax/log-softmax always run in fp32.

- `ClipLoss`: CLIP InfoNCE (Radford et al. 2021; open_clip `ClipLoss`), with distributed feature gathering.
- `AffinityKDLoss`: MobileCLIP's multi-modal reinforced-training KD (Vasu et al., CVPR'24; ml-mobileclip
  `DRClipLoss` with `--distill-average-after-softmax`): soft-target cross-entropy between the student's
  image-text similarity distributions and the teacher ensemble's, both directions, per-teacher logit scale,
  ensemble averaged after the softmax. With one teacher at scale 50 it is TinyCLIP's affinity mimicking
  (Wu et al., ICCV'23); at each model's own scale it is CLIP-KD's CRD (Yang et al., CVPR'24).
- `FeatureKDLoss`: CLIP-KD feature distillation, MSE between normalised embeddings with a learned projection when
  the dimensions differ.
- `ICLLoss`: CLIP-KD interactive contrastive learning (student features against teacher features).
- `DistillLoss`: the one module training uses; weights select the terms, and real and synthetic captions are
  both scored and summed (MobileCLIP: L = w_con [L_CLIP(I,T) + L_CLIP(I,T_syn)] + w_kd [L_KD(I,T) + L_KD(I,T_syn)]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AffinityKDLoss",
    "ClipLoss",
    "DistillLoss",
    "FeatureKDLoss",
    "ICLLoss",
    "gather_features",
    "soft_cross_entropy",
]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, gather_with_grad: bool = True) -> Tensor:
    """All-gather `[B, D]` features from every rank into `[world * B, D]` (identity on one process).

    Args:
        x: Local features.
        gather_with_grad: Keep the autograd graph through the gather (open_clip's `--gather-with-grad`), so every
            rank gets gradients for its features from all ranks' loss terms. Without it, the local slice is put
            back in place so local gradients still flow.
    """
    rank, world = _world()
    if world == 1:
        return x
    if gather_with_grad:
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    parts[rank] = x
    return torch.cat(parts, dim=0)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over rows of `-sum_j p_ij log softmax(z)_ij` (cross-entropy with soft targets), in fp32."""
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def _diag_labels(rows: int, rank: int, device: torch.device) -> Tensor:
    # NOTE: with local rows against global columns, row i of rank r matches column r * rows + i.
    return torch.arange(rows, device=device) + rank * rows


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: `0.5 * [CE(s * I T^T, diag) + CE(s * T I^T, diag)]`.

    In a distributed run the local rows are scored against the gathered global batch (open_clip `local_loss`).
    """

    def __init__(self, weight: float = 1.0, gather_with_grad: bool = True) -> None:
        """Args:
        weight: Multiplier of the returned `contrastive_loss`.
        gather_with_grad: See `gather_features`.
        """
        super().__init__()
        self.weight = weight
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        """`{"contrastive_loss"}` for `[b, D]` local features and the scalar (exp) logit scale."""
        rank, _ = _world()
        all_image = gather_features(image_features, self.gather_with_grad)
        all_text = gather_features(text_features, self.gather_with_grad)
        logits_i2t = logit_scale * image_features @ all_text.T  # [b, B]
        logits_t2i = logit_scale * text_features @ all_image.T  # [b, B]
        labels = _diag_labels(image_features.shape[0], rank, image_features.device)
        loss = 0.5 * (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels))
        return {"contrastive_loss": self.weight * loss}


def _teacher_targets(
    t_image: Mapping[str, Tensor], t_text: Mapping[str, Tensor], scales: Mapping[str, float], gather: bool
) -> tuple[Tensor, Tensor]:
    """Ensemble soft targets averaged AFTER the per-teacher softmax: `P_i2t, P_t2i`, each `[b, B]`."""
    p_i2t, p_t2i = 0.0, 0.0
    for name, ti in t_image.items():
        tt = t_text[name]
        all_ti = gather_features(ti, False) if gather else ti
        all_tt = gather_features(tt, False) if gather else tt
        scale = float(scales[name])
        p_i2t = p_i2t + F.softmax(scale * ti.float() @ all_tt.float().T, dim=-1)
        p_t2i = p_t2i + F.softmax(scale * tt.float() @ all_ti.float().T, dim=-1)
    k = len(t_image)
    return p_i2t / k, p_t2i / k


class AffinityKDLoss(nn.Module):
    """MobileCLIP ensemble KD / TinyCLIP affinity mimicking on one (image, caption) batch.

    `L = 0.5 * [H(P_i2t, softmax(s * I T^T)) + H(P_t2i, softmax(s * T I^T))]` with
    `P_i2t = mean_k softmax(a_k * t_I^k t_T^k^T)`, and `P_t2i` alike with image and text swapped.
    """

    def __init__(self, logit_scales: Mapping[str, float], weight: float = 1.0, gather_with_grad: bool = True) -> None:
        """Args:
        logit_scales: Teacher member name -> fixed KD logit scale a_k (MobileCLIP: 100; v2 DFN2B: 70 and 60).
        weight: Multiplier of the returned `kd_loss`.
        gather_with_grad: See `gather_features`.
        """
        super().__init__()
        self.logit_scales = dict(logit_scales)
        self.weight = weight
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Mapping[str, Tensor],
        teacher_text_features: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """`{"kd_loss"}`; teacher features are `{member: [b, D_k]}`."""
        _, world = _world()
        p_i2t, p_t2i = _teacher_targets(teacher_image_features, teacher_text_features, self.logit_scales, world > 1)
        all_image = gather_features(image_features, self.gather_with_grad)
        all_text = gather_features(text_features, self.gather_with_grad)
        z_i2t = logit_scale * image_features @ all_text.T
        z_t2i = logit_scale * text_features @ all_image.T
        loss = 0.5 * (soft_cross_entropy(z_i2t, p_i2t) + soft_cross_entropy(z_t2i, p_t2i))
        return {"kd_loss": self.weight * loss}


class _Projections(nn.Module):
    """Per-teacher `Linear(D_student, D_teacher)` maps (CLIP-KD), identity where the dims already agree."""

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int]) -> None:
        super().__init__()
        self.image = nn.ModuleDict()
        self.text = nn.ModuleDict()
        for name, dim in teacher_dims.items():
            if dim != student_dim:
                self.image[name] = nn.Linear(student_dim, dim, bias=False)
                self.text[name] = nn.Linear(student_dim, dim, bias=False)

    def forward(self, x: Tensor, name: str, kind: str) -> Tensor:
        table = self.image if kind == "image" else self.text
        return F.normalize(table[name](x), dim=-1) if name in table else x


class FeatureKDLoss(nn.Module):
    """CLIP-KD feature distillation: mean-reduced MSE between normalised student and teacher embeddings.

    Against an ensemble, the per-teacher MSEs are averaged. Default weight 2000 as in CLIP-KD.
    """

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int], weight: float = 2000.0) -> None:
        """Args:
        student_dim: Student embedding dim.
        teacher_dims: Teacher member name -> embedding dim (a learned projection is added where they differ).
        weight: Multiplier of the returned `fd_loss`.
        """
        super().__init__()
        self.weight = weight
        self.proj = _Projections(student_dim, teacher_dims)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        teacher_image_features: Mapping[str, Tensor],
        teacher_text_features: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """`{"fd_loss"}`; teacher features are `{member: [b, D_k]}`."""
        loss = 0.0
        for name, ti in teacher_image_features.items():
            si = self.proj(image_features, name, "image")
            st = self.proj(text_features, name, "text")
            tt = teacher_text_features[name]
            loss = loss + F.mse_loss(si.float(), ti.float()) + F.mse_loss(st.float(), tt.float())
        return {"fd_loss": self.weight * loss / len(teacher_image_features)}


class ICLLoss(nn.Module):
    """CLIP-KD interactive contrastive learning: student image vs teacher text and student text vs teacher image.

    `0.5 * [CE(s_x * S_I T_T^T, diag) + CE(s_x * S_T T_I^T, diag)]`, learnable `s_x` initialised to 1/0.07,
    averaged over ensemble members.
    """

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int], weight: float = 1.0) -> None:
        """Args:
        student_dim: Student embedding dim.
        teacher_dims: Teacher member name -> embedding dim (a learned projection is added where they differ).
        weight: Multiplier of the returned `icl_loss`.
        """
        super().__init__()
        self.weight = weight
        self.proj = _Projections(student_dim, teacher_dims)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        teacher_image_features: Mapping[str, Tensor],
        teacher_text_features: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """`{"icl_loss"}`; teacher features are `{member: [b, D_k]}`."""
        rank, world = _world()
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        labels = _diag_labels(image_features.shape[0], rank, image_features.device)
        loss = 0.0
        for name, ti in teacher_image_features.items():
            si = self.proj(image_features, name, "image")
            st = self.proj(text_features, name, "text")
            all_ti = gather_features(ti, False) if world > 1 else ti
            all_tt = gather_features(teacher_text_features[name], False) if world > 1 else teacher_text_features[name]
            loss = loss + 0.5 * (
                F.cross_entropy((scale * si @ all_tt.to(si.dtype).T).float(), labels)
                + F.cross_entropy((scale * st @ all_ti.to(st.dtype).T).float(), labels)
            )
        return {"icl_loss": self.weight * loss / len(teacher_image_features)}


class DistillLoss(nn.Module):
    """The training objective: weighted sum of contrastive, affinity-KD, feature-KD and ICL terms.

    Terms with weight 0 are not computed. When the batch carries synthetic captions (`syn_text_features` and, for
    the teacher terms, `teacher_syn_text_features`), every caption-dependent term is computed a second time with
    the synthetic caption and the two are summed (MobileCLIP's DRClipLoss). A loss built without teacher terms
    (scratch training) takes no targets; one with teacher terms refuses a batch without them.
    """

    def __init__(
        self,
        *,
        contrastive_weight: float = 0.0,
        kd_weight: float = 1.0,
        fd_weight: float = 0.0,
        icl_weight: float = 0.0,
        teacher_logit_scales: Mapping[str, float] | None = None,
        teacher_dims: Mapping[str, int] | None = None,
        student_dim: int | None = None,
        gather_with_grad: bool = True,
    ) -> None:
        """Args:
        contrastive_weight: w_con (MobileCLIP S*: 0; B on DataCompDR-1B: 0.25; scratch training: 1).
        kd_weight: w_kd (MobileCLIP S*: 1; B: 0.75).
        fd_weight: CLIP-KD feature-distillation weight (recipe value 2000).
        icl_weight: CLIP-KD interactive-contrastive weight (recipe value 1).
        teacher_logit_scales: Teacher member -> KD logit scale; needed when kd_weight > 0.
        teacher_dims: Teacher member -> embedding dim; needed when fd_weight or icl_weight > 0.
        student_dim: Student embedding dim; needed when fd_weight or icl_weight > 0.
        gather_with_grad: See `gather_features`.
        """
        super().__init__()
        self.clip = ClipLoss(contrastive_weight, gather_with_grad) if contrastive_weight > 0 else None
        if kd_weight > 0 and teacher_logit_scales:
            self.kd = AffinityKDLoss(teacher_logit_scales, kd_weight, gather_with_grad)
        else:
            self.kd = None
        needs_dims = fd_weight > 0 or icl_weight > 0
        if needs_dims and (teacher_dims is None or student_dim is None):
            raise ValueError("fd_weight/icl_weight > 0 need teacher_dims and student_dim")
        self.fd = FeatureKDLoss(student_dim, teacher_dims, fd_weight) if fd_weight > 0 else None
        self.icl = ICLLoss(student_dim, teacher_dims, icl_weight) if icl_weight > 0 else None
        if not any((self.clip, self.kd, self.fd, self.icl)):
            raise ValueError("every loss weight is 0 (or KD has no teacher): nothing to train")

    @property
    def needs_teacher(self) -> bool:
        """True when some term needs teacher targets."""
        return any(m is not None for m in (self.kd, self.fd, self.icl))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        syn_text_features: Tensor | None = None,
        teacher_image_features: Mapping[str, Tensor] | None = None,
        teacher_text_features: Mapping[str, Tensor] | None = None,
        teacher_syn_text_features: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Every enabled term, summed over the real and (when given) the synthetic caption.

        The names are the model-output and batch keys (`loss(**student_out, **targets)`) and there is no catch-all:
        a misspelt key raises `TypeError` instead of silently switching a term off.

        Args:
            image_features: Student image embeddings `[b, D]`.
            text_features: Student embeddings of the real caption `[b, D]`.
            logit_scale: The student's (exp) logit scale, a scalar.
            syn_text_features: Student embeddings of one synthetic caption `[b, D]`, or None.
            teacher_image_features: `{member: [b, D_k]}` targets; required when a teacher term is enabled.
            teacher_text_features: `{member: [b, D_k]}` targets of the real caption.
            teacher_syn_text_features: `{member: [b, D_k]}` targets of the synthetic caption; without them the
                synthetic caption is scored by the contrastive term only (a live teacher without synthetic captions).

        Raises:
            ValueError: teacher terms are enabled but the batch has no teacher targets, or synthetic-caption
                targets come without the student's synthetic-caption features.
        """
        has_targets = teacher_image_features is not None and teacher_text_features is not None
        if self.needs_teacher and not has_targets:
            raise ValueError("the batch has no teacher targets but the loss has teacher terms (kd/fd/icl)")
        if teacher_syn_text_features is not None and syn_text_features is None:
            raise ValueError("teacher_syn_text_features were given without syn_text_features")
        captions = [(text_features, teacher_text_features)]
        if syn_text_features is not None:
            captions.append((syn_text_features, teacher_syn_text_features))
        out: dict[str, Tensor] = {}

        def add(terms: dict[str, Tensor]) -> None:
            for k, v in terms.items():
                out[k] = out[k] + v if k in out else v

        for s_text, t_text in captions:
            if self.clip is not None:
                add(self.clip(image_features, s_text, logit_scale))
            if teacher_image_features is None or t_text is None:
                continue
            if self.kd is not None:
                add(self.kd(image_features, s_text, logit_scale, teacher_image_features, t_text))
            if self.fd is not None:
                add(self.fd(image_features, s_text, teacher_image_features, t_text))
            if self.icl is not None:
                add(self.icl(image_features, s_text, teacher_image_features, t_text))
        return out
