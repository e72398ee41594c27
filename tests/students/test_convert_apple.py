"""Apple MobileCLIP v1 checkpoints load into our students (issue 10, item 1).

The fixture holds the key names and shapes of Apple's `mobileclip_{s0,s1,s2,b}.pt` (and a re-parameterised S0) as
apple/ml-mobileclip builds them (commit in the file). Full-size checks run on the meta device (shapes only); the
numeric checks use a reduced S0 file (same MCi0 image tower, one MCt transformer layer, small vocabulary) with
random tensors of Apple's shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mcd_common import UsageError
from students import CLIPStudent, WeightSpec, create_student, get_student_cfg, load_student, save_student
from students.convert_apple import APPLE_COMMIT, apple_student_cfg, convert_apple_state_dict
from students.io import load_student_weights
from students.published import copy_student_weights

FIXTURE = Path(__file__).parent / "fixtures" / "apple_mobileclip_v1_keys.json"
MODELS = ["mobileclip_s0", "mobileclip_s0_reparameterized", "mobileclip_s1", "mobileclip_s2", "mobileclip_b"]


@pytest.fixture(scope="module")
def apple_shapes() -> dict[str, dict[str, list[int]]]:
    return json.loads(FIXTURE.read_text())


def _meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _random_apple_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of Apple's shapes, scaled like a trained model (positive BatchNorm variances)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[key] = torch.tensor(100)
        elif leaf == "running_var":
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif "layer_scale" in key:
            state[key] = 0.1 * torch.rand(shape, generator=gen)
        elif leaf == "weight" and len(shape) == 1:  # norm scales
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=gen)
    return state


def _reduced_s0(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Apple's S0 layout with one MCt transformer layer (transformer.{0,1,5} -> {0,1,2}) and a 1000-token vocabulary."""
    out = {}
    for key, shape in shapes.items():
        if any(key.startswith(f"text_encoder.transformer.{i}.") for i in (2, 3, 4)):
            continue
        key = key.replace("text_encoder.transformer.5.", "text_encoder.transformer.2.")
        if key == "text_encoder.embedding_layer.weight":
            shape = [1000, shape[1]]
        out[key] = shape
    return out


def _inputs(student: CLIPStudent) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, student.image_size, student.image_size, generator=gen)
    tokens = torch.randint(1, 900, (2, student.context_length), generator=gen)
    tokens[:, 9] = 999  # the EOT token has the largest id, as 49407 in CLIP's BPE
    return image, tokens


def test_fixture_records_the_commit_it_was_read_from(apple_shapes):
    source = apple_shapes["_source"]
    assert source["repo"] == "apple/ml-mobileclip"
    assert source["commit"].startswith(APPLE_COMMIT)
    assert len(apple_shapes["mobileclip_s0"]) == 893  # the "892 unexpected keys" of the issue, plus logit_scale


@pytest.mark.parametrize("model", MODELS)
def test_every_apple_key_fills_exactly_one_student_key(apple_shapes, model):
    shapes = apple_shapes[model]
    state = _meta_state(shapes)
    cfg = apple_student_cfg(state)
    assert cfg.name == model.removesuffix("_reparameterized")
    registered = get_student_cfg(cfg.name)
    assert dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, apple_vit=False)) == registered
    converted = convert_apple_state_dict(state)
    with torch.device("meta"):
        student = CLIPStudent(cfg)
        if model.endswith("_reparameterized"):
            student.eval().reparameterize()
    own = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    # Apple's projection has no bias: the one key we add; a folded MCt ConvFFN BatchNorm (5 keys, twice) is
    # folded into its conv, which gains a bias
    added = 1 - (2 * (5 - 1) if model.endswith("_reparameterized") else 0)
    assert len(converted) == len(shapes) + added


def test_conversion_is_a_bijection_of_tensors(apple_shapes):
    # each Apple tensor holds its own index: every index must come out exactly once
    shapes = _reduced_s0(apple_shapes["mobileclip_s0"])
    state = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}
    converted = convert_apple_state_dict(state)
    seen = []
    for key, value in converted.items():
        values = value.unique()
        assert values.numel() == 1, key
        if key.endswith("head.fc.bias"):
            assert values.item() == 0.0
            continue
        seen.append(int(values.item()))
    assert sorted(seen) == list(range(len(shapes)))


@pytest.fixture
def reduced_s0_file(apple_shapes, tmp_path) -> Path:
    path = tmp_path / "mobileclip_s0.pt"
    torch.save(_random_apple_state(_reduced_s0(apple_shapes["mobileclip_s0"])), path)
    return path


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_reduced_s0_loads_strictly_everywhere_and_round_trips(reduced_s0_file, tmp_path):
    loaded = load_student(reduced_s0_file)  # no config next to it: the architecture comes from Apple's keys
    assert loaded.cfg.name == "mobileclip_s0" and loaded.cfg.text.kind == "mct" and loaded.cfg.text.layers == 1
    created = create_student(
        "mobileclip_s0", text_layers=1, vocab_size=1000, weights=WeightSpec(file=str(reduced_s0_file))
    )
    assert _same_state(loaded, created)
    again = load_student(save_student(loaded, tmp_path / "saved"))
    assert again.cfg == loaded.cfg and _same_state(again, loaded)


def test_reduced_s0_still_folds_to_1e5(reduced_s0_file):
    # image size does not change MCi0's weights: 64 px keeps the forward passes cheap
    student = create_student(
        "mobileclip_s0", image_size=64, text_layers=1, vocab_size=1000, weights=WeightSpec(file=str(reduced_s0_file))
    ).eval()
    image, tokens = _inputs(student)
    with torch.no_grad():
        reference = student(image, tokens)
        folded = student.reparameterize()(image, tokens)
    assert student.is_reparameterized
    for key in ("image_features", "text_features"):
        assert (folded[key] - reference[key]).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore:for .*meta parameter.*:UserWarning")  # meta-device loads are shape-only
def test_unknown_and_missing_apple_keys_are_named(apple_shapes):
    state = _meta_state(_reduced_s0(apple_shapes["mobileclip_s0"]))
    with pytest.raises(UsageError, match="text_encoder.transformer.1.extra_gate"):
        convert_apple_state_dict({**state, "text_encoder.transformer.1.extra_gate": torch.empty(3, device="meta")})
    del state["text_encoder.final_layer_norm.bias"]
    with torch.device("meta"):
        student = create_student("mobileclip_s0", text_layers=1, vocab_size=1000)
    with pytest.raises(ValueError, match=r"missing: text\.ln_final\.bias"):
        load_student_weights(student, state)


@pytest.mark.filterwarnings("ignore:for .*meta parameter.*:UserWarning")  # meta-device loads are shape-only
def test_apple_b_weights_build_apples_vit_and_open_clip_b_weights_keep_timms(apple_shapes):
    with torch.device("meta"):
        student = create_student("mobileclip_b")
        hub_layout = create_student("mobileclip_b")
    load_student_weights(hub_layout, dict(student.state_dict()))  # open_clip-layout weights: timm's definition
    assert not hub_layout.cfg.image.apple_vit
    assert hub_layout.visual.trunk.patch_embed.backbone[0].conv.padding == (0, 0)

    load_student_weights(student, _meta_state(apple_shapes["mobileclip_b"]))
    assert student.cfg.image.apple_vit
    trunk = student.visual.trunk
    assert trunk.patch_embed.backbone[0].conv.padding == (1, 1)
    eps = {m.eps for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-5}
    with pytest.raises(ValueError, match="apple_vit"):
        get_student_cfg("mobileclip_s0", apple_vit=True)


@pytest.mark.slow
def test_apple_b_loads_into_the_faithful_variant_which_differs_from_timms(apple_shapes, tmp_path):
    path = tmp_path / "mobileclip_b.pt"
    torch.save(_random_apple_state(apple_shapes["mobileclip_b"]), path)
    faithful = load_student(path)
    assert faithful.cfg.image.apple_vit
    timm_cfg = dataclasses.replace(faithful.cfg, image=dataclasses.replace(faithful.cfg.image, apple_vit=False))
    timm_variant = CLIPStudent(timm_cfg).eval()
    timm_variant.load_state_dict(faithful.state_dict())
    image, _ = _inputs(faithful)
    with torch.no_grad():
        a, b = faithful.encode_image(image), timm_variant.encode_image(image)
    assert (a - b).abs().max().item() > 1e-4  # padding and eps change the embedding
    again = load_student(save_student(faithful, tmp_path / "saved"))
    assert again.cfg.image.apple_vit
    with torch.no_grad():
        assert torch.allclose(again.encode_image(image), a, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobileclip_s0", "mobileclip_s1", "mobileclip_s2"])
def test_full_size_apple_files_load_strictly(apple_shapes, tmp_path, model):
    path = tmp_path / f"{model}.pt"
    torch.save(_random_apple_state(apple_shapes[model]), path)
    student = load_student(path)
    assert student.cfg.name == model
    created = create_student(model, weights=WeightSpec(file=str(path)))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in created.state_dict().items())


@pytest.mark.filterwarnings("ignore:for .*meta parameter.*:UserWarning")  # meta-device loads are shape-only
def test_copying_an_apple_b_student_keeps_apples_vit(apple_shapes):
    # distill train --student mobileclip_b --student_weights mobileclip_b.pt copies a loaded student's weights
    with torch.device("meta"):
        source = CLIPStudent(apple_student_cfg(_meta_state(apple_shapes["mobileclip_b"])))
        target = create_student("mobileclip_b")
        other = create_student("mobileclip2_s2")
    copy_student_weights(target, source)
    assert target.cfg.image.apple_vit and target.visual.trunk.patch_embed.backbone[0].conv.padding == (1, 1)
    with pytest.raises(RuntimeError):  # a different architecture still fails the strict load
        copy_student_weights(other, source)
