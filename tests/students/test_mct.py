"""The MCt text tower: size, equivalence with open_clip's TextTransformer, and RepMixer folding."""

from __future__ import annotations

import torch
from open_clip.transformer import TextTransformer

from students.mct import MCtTextTower, RepMixer1d, RepMixerBlock1d


def test_mct_s0_parameter_count() -> None:
    with torch.device("meta"):
        tower = MCtTextTower(embed_dim=512, width=512, heads=8, layers=4, causal=False)
    # 49408x512 tokens + 77x512 positions + 2 RepMixer blocks + 4 layers + LN + 512x512 projection
    assert sum(p.numel() for p in tower.parameters()) == 42_441_216


def test_mct_with_closed_mixers_equals_open_clip_text_transformer() -> None:
    # With both layer scales at zero a RepMixer block is the identity, so MCt must compute exactly what open_clip's
    # TextTransformer computes with the same embeddings, layers, final LN and projection.
    torch.manual_seed(0)
    mct = MCtTextTower(embed_dim=24, context_length=12, width=32, heads=4, layers=2, causal=False).eval()
    ref = TextTransformer(context_length=12, width=32, heads=4, layers=2, output_dim=24, no_causal_mask=True).eval()
    with torch.no_grad():
        for block in (mct.mixer_in, mct.mixer_out):
            block.layer_scale.zero_()
            block.token_mixer.layer_scale.zero_()
    missing = ref.load_state_dict({k: v for k, v in mct.state_dict().items() if not k.startswith("mixer_")})
    assert not missing.missing_keys and not missing.unexpected_keys
    tokens = torch.randint(1, 49406, (3, 12))
    tokens[:, 7] = 49407  # EOT: pooled by argmax
    with torch.no_grad():
        torch.testing.assert_close(mct(tokens), ref(tokens))


def test_repmixer_matches_naive_formula() -> None:
    torch.manual_seed(0)
    mixer = RepMixer1d(8, kernel_size=5, layer_scale_init=0.3).eval()
    with torch.no_grad():
        for bn in (mixer.norm, mixer.mixer_skip, mixer.mixer_bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(2, 8, 9)

    def bn(m: torch.nn.BatchNorm1d, v: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1)
        return (v - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(
            shape
        ) + m.bias.view(shape)

    conv = torch.nn.functional.conv1d(x, mixer.mixer_conv.weight, padding=2, groups=8)
    naive = x + mixer.layer_scale * (bn(mixer.mixer_skip, x) + bn(mixer.mixer_bn, conv) - bn(mixer.norm, x))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), naive)
        mixer.reparameterize()
        torch.testing.assert_close(mixer(x), naive, atol=1e-5, rtol=1e-5)
    assert mixer.reparam_conv is not None and not hasattr(mixer, "mixer_conv")


def test_repmixer_block_fold_and_shapes() -> None:
    torch.manual_seed(0)
    block = RepMixerBlock1d(16, kernel_size=11, layer_scale_init=0.5).eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        before = block(x)
        block.reparameterize()
        after = block(x)
    assert before.shape == x.shape
    assert (before - after).abs().max() < 1e-5
