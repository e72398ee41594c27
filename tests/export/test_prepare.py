"""export.prepare: folded, rewritten wrappers compute exactly what the student computes."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from export.prepare import (
    ExportLayerNorm,
    L2Norm,
    TiledGroupedConv,
    TransformerTextEncoder,
    example_inputs,
    prepare_towers,
    reparameterize,
    untile_grouped_convs,
)

STUDENTS = ["test_tiny", "test_tiny_mci", "test_tiny_mct", "test_tiny_coca"]


@pytest.mark.parametrize("name", STUDENTS)
@pytest.mark.parametrize("backend", ["eager", "xnnpack", "coreml"])
def test_wrappers_match_student(make_student, name: str, backend: str) -> None:
    student = make_student(name)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    image_enc, text_enc = prepare_towers(student, backend=backend)
    image = torch.rand(2, 3, student.image_size, student.image_size)
    tokens = student.tokenize(["a photo of a dog.", "two red apples on a wooden table and a cup"])
    with torch.no_grad():
        want_img = student.encode_image(student.normalize(image))
        want_txt = student.encode_text(tokens)
        got_img = image_enc(image)
        got_txt = text_enc(tokens.to(torch.int32))
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=1e-4)
    # the open_clip tower and MCt take the fast path; CoCa's CLS-token tower the generic one (rewritten attention)
    assert isinstance(text_enc, TransformerTextEncoder) == (name != "test_tiny_coca")
    # the student itself is untouched (deep copy): no folding, same weights
    after = student.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool_type", ["argmax", "eos", "last"])
def test_open_clip_text_variants(causal: bool, pool_type: str) -> None:
    """Causal and bidirectional towers, every pooling mode, LayerScale folded: same output as open_clip."""
    torch.manual_seed(0)
    text_cfg = {"context_length": 12, "width": 32, "heads": 4, "layers": 2, "no_causal_mask": not causal}
    text_cfg |= {"pool_type": pool_type, "ls_init_value": 0.3, "proj_bias": True, "proj_type": "linear"}
    model = open_clip.CustomTextCLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg=text_cfg,
    ).eval()
    _, text_enc = prepare_towers(model, backend="xnnpack")
    assert isinstance(text_enc, TransformerTextEncoder)
    tokens = torch.randint(1, 49000, (3, 12))
    tokens[:, 0] = 49406
    tokens[0, 5], tokens[1, 11], tokens[2, 3] = 49407, 49407, 49407  # EOT mid-sequence, at the end, early
    tokens[0, 6:] = 0
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=True)
        got = text_enc(tokens.to(torch.int32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wrap", [False, True])
def test_reparameterize_folds_fastvit(make_student, wrap: bool) -> None:
    """Both paths fold: the student's own reparameterize() and timm's walk for a plain module (no such method)."""
    student = make_student("test_tiny_mci")
    x = student.normalize(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        want = student.visual(x)
        model = copy.deepcopy(student) if wrap else torch.nn.Sequential(copy.deepcopy(student.visual))
        reparameterize(model)
        visual = model.visual if wrap else model[0]
        got = visual(x)
    # every MobileOne/RepMixer block now runs its single folded convolution
    blocks = [m for m in visual.modules() if hasattr(m, "reparam_conv")]
    assert blocks and all(m.reparam_conv is not None for m in blocks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_layer_norm_and_l2_forms() -> None:
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(24)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    x = torch.randn(2, 5, 24) * 3 + 1
    torch.testing.assert_close(ExportLayerNorm(ln, decomposed=True)(x), ln(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ExportLayerNorm(ln, decomposed=False)(x), ln(x))
    feats = torch.randn(3, 512) * 40  # FP16 would overflow summing these squares without the coreml form
    want = F.normalize(feats, dim=-1)
    for norm in (L2Norm(512, "xnnpack"), L2Norm(None, "coreml"), L2Norm()):
        torch.testing.assert_close(norm(feats), want, atol=1e-6, rtol=1e-5)
    assert feats.half().pow(2).sum(-1).isinf().all()  # the plain form overflows in FP16 ...
    torch.testing.assert_close(L2Norm(None, "coreml")(feats.half()).float(), want, atol=2e-3, rtol=0)  # ... this not


def test_example_inputs_mimic_clip_tokens() -> None:
    image, tokens = example_inputs(64, 77)
    assert image.shape == (1, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert tokens.dtype == torch.int32 and tokens.shape == (1, 77)
    assert tokens[0, 0] == 49406 and tokens.argmax() == 8 and tokens[0, 8] == 49407 and tokens[0, 9:].eq(0).all()


def test_prepare_rejects_unknown_backend(make_student) -> None:
    with pytest.raises(ValueError, match="backend"):
        prepare_towers(make_student("test_tiny"), backend="tflite")  # type: ignore[arg-type]


def test_coca_towers_keep_the_contrastive_query_only(make_student) -> None:
    """CoCa towers return (embedding, tokens): the wrappers export the embedding, from the first pooler query."""
    student = make_student("test_tiny_coca")
    image_enc, text_enc = prepare_towers(student, backend="xnnpack")
    assert image_enc.visual.attn_pool.query.shape[0] == 1 and student.visual.attn_pool.query.shape[0] == 16
    assert not image_enc.visual.output_tokens and student.visual.output_tokens  # the student is untouched
    image = torch.rand(3, 3, 32, 32)
    tokens = student.tokenize(["a dog", "two cats on a mat", "x"])  # padded rows: the pad mask matters
    with torch.no_grad():
        torch.testing.assert_close(image_enc(image), student.encode_image(student.normalize(image)), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_enc(tokens.to(torch.int32)), student.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("k", "stride", "groups", "cin", "cout"), [(7, 1, 16, 16, 16), (7, 2, 8, 8, 16), (11, 1, 4, 4, 4)]
)
def test_tiled_grouped_conv_is_the_same_conv(k: int, stride: int, groups: int, cin: int, cout: int) -> None:
    """XNNPACK's slow >5x5 grouped convs become sums of 5x5 ones: same outputs, BatchNorm folded in."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=stride == 1)
    bn = torch.nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_(1, 0.2)
        bn.bias.normal_(0, 0.2)
    x = torch.randn(2, cin, 19, 21)  # odd, non-square sizes: the views must line up with the strided outputs
    tiled = TiledGroupedConv(conv, bn)
    assert TiledGroupedConv.supports(conv) and not TiledGroupedConv.supports(torch.nn.Conv2d(4, 4, 5, groups=4))
    assert len(tiled.offsets) == ((k + 4) // 5) ** 2
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
        # and back: one k x k conv (what static int8 programs get), the BatchNorm still folded in
        single = tiled.as_conv()
        assert single.kernel_size == (k, k) and single.groups == groups and single.stride == (stride, stride)
        torch.testing.assert_close(single(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
        parent = torch.nn.Sequential(tiled, torch.nn.Identity())
        assert untile_grouped_convs(parent) == 1 and isinstance(parent[0], torch.nn.Conv2d)
