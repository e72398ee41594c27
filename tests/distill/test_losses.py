"""Losses against naive loop implementations, plus invariants (torchtune test_kd_losses style)."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import AffinityKDLoss, ClipLoss, DistillLoss, FeatureKDLoss, ICLLoss


def _feats(b: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1)


def _naive_clip(img, txt, scale):
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        row = [scale * float(img[i] @ txt[j]) for j in range(b)]
        total += -row[i] + math.log(sum(math.exp(r) for r in row))
        col = [scale * float(txt[i] @ img[j]) for j in range(b)]
        total += -col[i] + math.log(sum(math.exp(c) for c in col))
    return total / (2 * b)


def _naive_kd(img, txt, scale, t_img: dict, t_txt: dict, t_scales: dict):
    b = img.shape[0]

    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    total = 0.0
    for i in range(b):
        for direction in ("i2t", "t2i"):
            probs = [0.0] * b
            for name in t_img:
                a, c = (t_img[name], t_txt[name]) if direction == "i2t" else (t_txt[name], t_img[name])
                p = softmax([t_scales[name] * float(a[i] @ c[j]) for j in range(b)])
                probs = [x + y / len(t_img) for x, y in zip(probs, p, strict=False)]
            s, o = (img, txt) if direction == "i2t" else (txt, img)
            logp = [scale * float(s[i] @ o[j]) for j in range(b)]
            lse = math.log(sum(math.exp(z) for z in logp))
            total += -sum(p * (z - lse) for p, z in zip(probs, logp, strict=False))
    return total / (2 * b)


@pytest.mark.parametrize("b", [1, 2, 7])
def test_clip_loss_matches_naive(b):
    img, txt = _feats(b, 16, 0), _feats(b, 16, 1)
    scale = torch.tensor(14.3)
    out = ClipLoss()(img, txt, scale)["contrastive_loss"]
    assert out.item() == pytest.approx(_naive_clip(img, txt, 14.3), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_affinity_kd_matches_naive_ensemble(b):
    img, txt = _feats(b, 16, 0), _feats(b, 16, 1)
    t_img = {"a": _feats(b, 24, 2), "b": _feats(b, 8, 3)}
    t_txt = {"a": _feats(b, 24, 4), "b": _feats(b, 8, 5)}
    scales = {"a": 70.0, "b": 60.0}
    out = AffinityKDLoss(scales)(img, txt, torch.tensor(20.0), t_img, t_txt)["kd_loss"]
    assert out.item() == pytest.approx(_naive_kd(img, txt, 20.0, t_img, t_txt, scales), rel=1e-4)


def test_kd_minimal_when_student_equals_teacher():
    b, d = 6, 16
    t_img, t_txt = _feats(b, d, 0), _feats(b, d, 1)
    loss = AffinityKDLoss({"t": 50.0})
    same = loss(t_img, t_txt, torch.tensor(50.0), {"t": t_img}, {"t": t_txt})["kd_loss"]
    # Soft-target CE = KL + entropy(P): at the optimum the KL part is 0, so any other student is worse.
    for seed in range(5):
        other = loss(_feats(b, d, 10 + seed), _feats(b, d, 20 + seed), torch.tensor(50.0), {"t": t_img}, {"t": t_txt})
        assert other["kd_loss"] > same
    p = F.softmax(50.0 * t_img @ t_txt.T, dim=-1)
    q = F.softmax(50.0 * t_txt @ t_img.T, dim=-1)
    entropy = 0.5 * (-(p * p.log()).sum(-1).mean() - (q * q.log()).sum(-1).mean())
    assert same.item() == pytest.approx(entropy.item(), rel=1e-4)


def test_losses_invariant_to_joint_batch_permutation():
    b, d = 9, 12
    img, txt, ti, tt = _feats(b, d, 0), _feats(b, d, 1), _feats(b, d, 2), _feats(b, d, 3)
    perm = torch.randperm(b)
    loss = DistillLoss(
        contrastive_weight=0.3,
        kd_weight=0.7,
        fd_weight=5.0,
        icl_weight=1.0,
        teacher_logit_scales={"t": 100.0},
        teacher_dims={"t": d},
        student_dim=d,
    )
    a = loss(img, txt, torch.tensor(10.0), teacher_image_features={"t": ti}, teacher_text_features={"t": tt})
    p = loss(
        img[perm],
        txt[perm],
        torch.tensor(10.0),
        teacher_image_features={"t": ti[perm]},
        teacher_text_features={"t": tt[perm]},
    )
    assert set(a) == {"contrastive_loss", "kd_loss", "fd_loss", "icl_loss"}
    for k in a:
        assert a[k].item() == pytest.approx(p[k].item(), rel=1e-5)


def test_feature_kd_with_projection_and_naive_mse():
    b = 4
    img, txt = _feats(b, 8, 0), _feats(b, 8, 1)
    ti, tt = _feats(b, 8, 2), _feats(b, 8, 3)
    out = FeatureKDLoss(8, {"t": 8}, weight=2000.0)(img, txt, {"t": ti}, {"t": tt})["fd_loss"]
    naive = 2000.0 * (((img - ti) ** 2).mean() + ((txt - tt) ** 2).mean())
    assert out.item() == pytest.approx(naive.item(), rel=1e-5)
    proj = FeatureKDLoss(8, {"big": 24})
    res = proj(img, txt, {"big": _feats(b, 24, 4)}, {"big": _feats(b, 24, 5)})["fd_loss"]
    res.backward()
    assert proj.proj.image["big"].weight.grad is not None


def test_icl_matches_naive():
    b, d = 5, 16
    img, txt, ti, tt = _feats(b, d, 0), _feats(b, d, 1), _feats(b, d, 2), _feats(b, d, 3)
    loss = ICLLoss(d, {"t": d})
    out = loss(img, txt, {"t": ti}, {"t": tt})["icl_loss"]
    s = 1 / 0.07
    naive = 0.5 * (_naive_clip_cross(img, tt, s) + _naive_clip_cross(txt, ti, s))
    assert out.item() == pytest.approx(naive, rel=1e-4)


def _naive_clip_cross(a, c, scale):
    b = a.shape[0]
    total = 0.0
    for i in range(b):
        row = [scale * float(a[i] @ c[j]) for j in range(b)]
        total += -row[i] + math.log(sum(math.exp(r) for r in row))
    return total / b


def test_distill_loss_sums_real_and_synthetic_captions():
    b, d = 6, 16
    img, txt, syn = _feats(b, d, 0), _feats(b, d, 1), _feats(b, d, 2)
    ti, tt, ts = {"t": _feats(b, d, 3)}, {"t": _feats(b, d, 4)}, {"t": _feats(b, d, 5)}
    scale = torch.tensor(30.0)
    loss = DistillLoss(contrastive_weight=0.25, kd_weight=0.75, teacher_logit_scales={"t": 100.0})
    out = loss(
        img,
        txt,
        scale,
        syn_text_features=syn,
        teacher_image_features=ti,
        teacher_text_features=tt,
        teacher_syn_text_features=ts,
    )
    clip, kd = ClipLoss(), AffinityKDLoss({"t": 100.0})
    want_con = 0.25 * (clip(img, txt, scale)["contrastive_loss"] + clip(img, syn, scale)["contrastive_loss"])
    want_kd = 0.75 * (kd(img, txt, scale, ti, tt)["kd_loss"] + kd(img, syn, scale, ti, ts)["kd_loss"])
    assert out["contrastive_loss"].item() == pytest.approx(want_con.item(), rel=1e-5)
    assert out["kd_loss"].item() == pytest.approx(want_kd.item(), rel=1e-5)


def test_distill_loss_errors():
    with pytest.raises(ValueError, match="nothing to train"):
        DistillLoss(contrastive_weight=0.0, kd_weight=0.0)
    loss = DistillLoss(contrastive_weight=0.0, kd_weight=1.0, teacher_logit_scales={"t": 100.0})
    with pytest.raises(ValueError, match="no teacher targets"):
        loss(_feats(2, 4), _feats(2, 4, 1), torch.tensor(1.0))


def test_kd_gradient_flows_to_student_scale_and_features():
    b, d = 4, 8
    img = _feats(b, d, 0).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    out = AffinityKDLoss({"t": 100.0})(img, _feats(b, d, 1), scale, {"t": _feats(b, d, 2)}, {"t": _feats(b, d, 3)})
    out["kd_loss"].backward()
    assert img.grad.abs().sum() > 0 and scale.grad.abs() > 0


def _targets(b, d):
    return {"teacher_image_features": {"t": _feats(b, d, 3)}, "teacher_text_features": {"t": _feats(b, d, 4)}}


@pytest.mark.parametrize(
    "make",
    [
        lambda d: ClipLoss(),
        lambda d: AffinityKDLoss({"t": 50.0}),
        lambda d: FeatureKDLoss(d, {"t": d}),
        lambda d: ICLLoss(d, {"t": d}),
        lambda d: DistillLoss(contrastive_weight=1.0, kd_weight=1.0, teacher_logit_scales={"t": 50.0}),
    ],
    ids=["clip", "affinity_kd", "feature_kd", "icl", "distill"],
)
def test_a_misspelt_key_raises_instead_of_switching_a_term_off(make):
    b, d = 4, 8
    loss = make(d)
    kwargs = {"image_features": _feats(b, d, 0), "text_features": _feats(b, d, 1)}
    if not isinstance(loss, (FeatureKDLoss, ICLLoss)):
        kwargs["logit_scale"] = torch.tensor(10.0)
    if not isinstance(loss, ClipLoss):
        kwargs.update(_targets(b, d))
    loss(**kwargs)  # the exact names work
    with pytest.raises(TypeError, match="teacher_syn_text_feature"):
        loss(**kwargs, teacher_syn_text_feature={"t": _feats(b, d, 5)})


def test_distill_loss_refuses_inconsistent_targets():
    b, d = 4, 8
    img, txt, scale = _feats(b, d, 0), _feats(b, d, 1), torch.tensor(10.0)
    both = DistillLoss(contrastive_weight=1.0, kd_weight=1.0, teacher_logit_scales={"t": 50.0})
    # A loss with a KD term never silently degrades to contrastive-only when the targets are missing.
    with pytest.raises(ValueError, match="no teacher targets"):
        both(img, txt, scale)
    with pytest.raises(ValueError, match="without syn_text_features"):
        both(img, txt, scale, **_targets(b, d), teacher_syn_text_features={"t": _feats(b, d, 5)})
    # A synthetic caption without teacher targets of its own is scored contrastively only (live teacher case).
    out = both(img, txt, scale, syn_text_features=_feats(b, d, 2), **_targets(b, d))
    clip, kd = ClipLoss(), AffinityKDLoss({"t": 50.0})
    t = _targets(b, d)
    want_con = clip(img, txt, scale)["contrastive_loss"] + clip(img, _feats(b, d, 2), scale)["contrastive_loss"]
    want_kd = kd(img, txt, scale, t["teacher_image_features"], t["teacher_text_features"])["kd_loss"]
    assert out["contrastive_loss"].item() == pytest.approx(want_con.item(), rel=1e-6)
    assert out["kd_loss"].item() == pytest.approx(want_kd.item(), rel=1e-6)
