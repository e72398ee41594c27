"""TinyCLIP's released checkpoints (its open_clip fork's `_image_encoder` / `_text_encoder` layout) load into our
TinyCLIP students (issue 10, item 2); auto-inheritance (per-layer width) files are refused with the reason.

The fixture holds the key names and shapes of the four manual-inheritance ViTs as microsoft/Cream's TinyCLIP code
builds them (commit in the file). Numeric checks use a tiny model of the same kind (head dim 64, causal text).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mcd_common import UsageError
from students import (
    CLIPStudent,
    ImageTowerCfg,
    StudentCfg,
    TextTowerCfg,
    WeightSpec,
    create_student,
    get_student_cfg,
    load_student,
    save_student,
)
from students.convert_tinyclip import TINYCLIP_COMMIT, convert_tinyclip_state_dict, native_vit_student_cfg

FIXTURE = Path(__file__).parent / "fixtures" / "tinyclip_manual_keys.json"
MODELS = [
    "tinyclip_vit_8m_16_text_3m",
    "tinyclip_vit_39m_16_text_19m",
    "tinyclip_vit_40m_32_text_19m",
    "tinyclip_vit_61m_32_text_29m",
]
# a TinyCLIP-like model small enough for numerics: head dim 64 (as TinyCLIP), 32 px, causal 16-token text
TINY = StudentCfg(
    name="tinyclip_custom",
    embed_dim=48,
    image=ImageTowerCfg(image_size=32, width=64, layers=2, head_width=64, patch_size=16),
    text=TextTowerCfg(context_length=16, vocab_size=1000, width=64, heads=1, layers=2, causal=True),
)


@pytest.fixture(scope="module")
def tinyclip_shapes() -> dict:
    return json.loads(FIXTURE.read_text())


def _to_tinyclip_layout(state: dict[str, torch.Tensor], ddp: bool = False) -> dict[str, torch.Tensor]:
    """Our keys written the way TinyCLIP's CLIPBase saves them (optionally with DDP's inner `.module`)."""
    mod = "module." if ddp else ""
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            out[f"_image_encoder.{mod}{key}"] = value
        elif key.startswith("text."):
            out[f"_text_encoder.{mod}{key[len('text.') :]}"] = value
        else:
            out[f"_logit_scale.{mod}logit_scale"] = value
    return out


def _inputs(student: CLIPStudent) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, student.image_size, student.image_size, generator=gen)
    tokens = torch.randint(1, 900, (2, student.context_length), generator=gen)
    tokens[0, 5], tokens[1, 15] = 999, 999
    return image, tokens


def test_fixture_records_the_commit_it_was_read_from(tinyclip_shapes):
    assert tinyclip_shapes["_source"]["repo"] == "microsoft/Cream"
    assert tinyclip_shapes["_source"]["commit"].startswith(TINYCLIP_COMMIT)


@pytest.mark.parametrize("model", MODELS)
def test_manual_inheritance_layouts_map_onto_the_registered_students(tinyclip_shapes, model):
    shapes = tinyclip_shapes[model]
    converted = convert_tinyclip_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    assert native_vit_student_cfg(converted) == get_student_cfg(model)
    with torch.device("meta"):
        student = create_student(model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in student.state_dict().items()
    }
    assert len(converted) == len(shapes)


@pytest.mark.parametrize("ddp", [False, True])
def test_tinyclip_file_loads_with_equal_outputs_and_round_trips(perturb, tmp_path, ddp):
    original = perturb(CLIPStudent(TINY)).eval()
    path = tmp_path / "TinyCLIP-tiny.pt"
    # released files are training checkpoints: the state dict sits under "state_dict" next to other entries
    torch.save({"epoch": 3, "state_dict": _to_tinyclip_layout(original.state_dict(), ddp=ddp)}, path)

    loaded = load_student(path)  # the architecture is inferred from the shapes
    assert loaded.cfg == TINY
    image, tokens = _inputs(original)
    with torch.no_grad():
        want, got = original(image, tokens), loaded(image, tokens)
    for key in ("image_features", "text_features"):
        assert torch.equal(want[key], got[key])

    again = load_student(save_student(loaded, tmp_path / "saved"))
    assert again.cfg == TINY
    with torch.no_grad():
        assert torch.equal(again(image, tokens)["text_features"], want["text_features"])


def test_registered_student_takes_a_tinyclip_file(perturb, tmp_path):
    original = perturb(create_student("test_tiny")).eval()  # any open_clip ViT fits TinyCLIP's layout
    path = tmp_path / "tiny.pt"
    torch.save(_to_tinyclip_layout(original.state_dict()), path)
    student = create_student("test_tiny", weights=WeightSpec(file=str(path))).eval()
    image, tokens = _inputs(original)
    with torch.no_grad():
        assert torch.equal(student(image, tokens)["image_features"], original(image, tokens)["image_features"])


def test_auto_inheritance_checkpoints_are_refused_with_the_reason():
    with torch.device("meta"):
        state = _to_tinyclip_layout(CLIPStudent(TINY).state_dict())
    # L0 pruning keeps its own FFN width and head count per layer
    pruned = dict(state)
    pruned["_image_encoder.visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.empty(96, 64, device="meta")
    with pytest.raises(UsageError, match="layer 1: 64 attention dims, FFN 96.*automatic-inheritance"):
        convert_tinyclip_state_dict(pruned)
    fewer_heads = dict(state)
    fewer_heads["_text_encoder.transformer.resblocks.0.attn.in_proj_weight"] = torch.empty(96, 64, device="meta")
    with pytest.raises(UsageError, match="per-layer widths in the text tower"):
        convert_tinyclip_state_dict(fewer_heads)
    with pytest.raises(UsageError, match="L0 pruning masks"):
        convert_tinyclip_state_dict({**state, "_image_encoder.l0_module.z_loga": torch.empty(3, device="meta")})
    with pytest.raises(UsageError, match="ResNet"):
        convert_tinyclip_state_dict({**state, "_image_encoder.visual.layer1.0.conv1.weight": torch.empty(1)})


def test_heads_that_cannot_be_inferred_ask_for_the_student_name(tmp_path):
    with torch.device("meta"):
        state = create_student("test_tiny").state_dict()  # 32 wide: TinyCLIP's head dim 64 does not divide it
    path = tmp_path / "tiny.pt"
    torch.save({k: torch.zeros(v.shape) for k, v in _to_tinyclip_layout(state).items()}, path)
    with pytest.raises(UsageError, match="build the student by name"):
        load_student(path)
