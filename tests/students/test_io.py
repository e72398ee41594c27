"""save_student / load_student, and loading saved students with open_clip itself."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

import students
from mcd_common import UsageError
from students import load_student, save_student


def _embed(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def test_saved_student_loads_in_open_clip_local_dir(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    out = save_student(tiny_student, tmp_path / "student")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["distill"]["format"] == 1 and config["model_cfg"]["custom_text"] is True
    assert config["preprocess_cfg"]["size"] == 32
    images, tokens = tiny_batch(tiny_student)
    expected = _embed(tiny_student, images, tokens)
    model = open_clip.create_model("local-dir:" + str(out)).eval()
    got = _embed(model, images, tokens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    loaded = load_student(out)
    assert loaded.cfg == tiny_student.cfg and not loaded.training
    got = _embed(loaded, images, tokens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_open_clip_named_config_with_pretrained_file(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path / "s")
    arch = "students-test-tiny-io"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / f"{arch}.json").write_text(json.dumps(tiny_student.cfg.open_clip_model_cfg()))
    open_clip.add_model_config(tmp_path / "cfg")
    model = open_clip.create_model(arch, pretrained=str(tmp_path / "s" / "open_clip_model.safetensors")).eval()
    images, tokens = tiny_batch(tiny_student)
    got, expected = _embed(model, images, tokens), _embed(tiny_student, images, tokens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_mct_students_load_only_through_load_student(perturb, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    student = perturb(students.create_student("test_tiny_mct")).eval()
    save_student(student, tmp_path)
    with pytest.raises(TypeError, match="load_with_students_load_student"):
        open_clip.create_model("local-dir:" + str(tmp_path))
    loaded = load_student(tmp_path)
    images, tokens = tiny_batch(student)
    assert torch.equal(_embed(loaded, images, tokens)[1], _embed(student, images, tokens)[1])


def test_load_bare_safetensors_and_lightning_ckpt(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path / "dir")
    images, tokens = tiny_batch(tiny_student)
    expected = _embed(tiny_student, images, tokens)
    loaded = load_student(tmp_path / "dir" / "open_clip_model.safetensors")
    assert torch.equal(_embed(loaded, images, tokens)[0], expected[0])
    # what distill train writes: student.* weights among others, StudentCfg dict in hyper_parameters
    ckpt = {
        "state_dict": {**{"student." + k: v for k, v in tiny_student.state_dict().items()}, "loss.w": torch.ones(2)},
        "hyper_parameters": {"student_cfg": tiny_student.cfg.to_dict(), "teacher_name": "test_tiny"},
        "epoch": 0,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_student(tmp_path / "last.ckpt")
    got = _embed(loaded, images, tokens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert students.read_student_cfg(tmp_path / "last.ckpt") == tiny_student.cfg


def test_plain_open_clip_directory_loads(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    # an open_clip directory without our `distill` section (e.g. downloaded from the hub)
    save_student(tiny_student, tmp_path)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    del config["distill"]
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    loaded = load_student(tmp_path)
    assert loaded.cfg.with_overrides(name="test_tiny") == tiny_student.cfg
    images, tokens = tiny_batch(tiny_student)
    assert torch.equal(_embed(loaded, images, tokens)[0], _embed(tiny_student, images, tokens)[0])


def test_reparameterized_student_round_trip(perturb, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    student = perturb(students.create_student("test_tiny_mct")).eval().reparameterize()
    save_student(student, tmp_path)
    assert json.loads((tmp_path / "open_clip_config.json").read_text())["distill"]["reparameterized"] is True
    loaded = load_student(tmp_path)
    images, tokens = tiny_batch(student)
    assert loaded.is_reparameterized
    assert torch.equal(_embed(loaded, images, tokens)[1], _embed(student, images, tokens)[1])


def test_save_is_atomic_and_overwrites(tiny_student, tmp_path) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path)
    with torch.no_grad():
        tiny_student.logit_scale.fill_(3.0)
    save_student(tiny_student, tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert load_student(tmp_path).logit_scale.item() == 3.0


def test_load_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(UsageError, match="no such directory"):
        load_student(tmp_path / "nothing")
    with pytest.raises(UsageError, match="open_clip_config.json"):
        load_student(tmp_path)
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "x.ckpt")
    with pytest.raises(UsageError, match="student_cfg"):
        load_student(tmp_path / "x.ckpt")
