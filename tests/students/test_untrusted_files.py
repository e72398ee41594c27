"""Every student weight read refuses pickled code, and bad files or paths give one line naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import students
from mcd_common import UsageError
from students import WeightSpec, create_student, get_student_cfg, load_student, save_student


def _paths(tmp_path: Path, tiny_student, write, marker: Path, style: str) -> dict[str, tuple[str, Path, str]]:  # noqa: ANN001
    """Each way a student reads weights -> (how to read it, the path given, the malicious file's name)."""
    state = dict(tiny_student.state_dict())
    write(tmp_path / "w.pt", marker, state, style)
    directory = save_student(tiny_student, tmp_path / "dir")
    (directory / "open_clip_model.safetensors").unlink()
    write(directory / "open_clip_pytorch_model.bin", marker, state, style)
    if style == "reduce":
        ckpt = {"state_dict": state, "hyper_parameters": {"student_cfg": tiny_student.cfg.to_dict()}}
        write(tmp_path / "last.ckpt", marker, ckpt, style)
    else:
        write(tmp_path / "last.ckpt", marker, None, style)
    bin_name = "open_clip_pytorch_model.bin"
    return {
        "weights": ("weights", tmp_path / "w.pt", "w.pt"),
        "weights_dir": ("weights", directory, bin_name),
        "student_dir": ("load", directory, bin_name),
        "ckpt": ("load", tmp_path / "last.ckpt", "last.ckpt"),
        "ckpt_cfg": ("cfg", tmp_path / "last.ckpt", "last.ckpt"),
        "local_dir": ("name", directory, bin_name),
    }


@pytest.mark.parametrize("force_unsafe", [False, True])
@pytest.mark.parametrize("style", ["reduce", "typeerror"])
@pytest.mark.parametrize("case", ["weights", "weights_dir", "student_dir", "ckpt", "ckpt_cfg", "local_dir"])
def test_pickled_code_is_refused(tmp_path, tiny_student, monkeypatch, malicious_checkpoint, force_unsafe, style, case):  # noqa: ANN001, ANN201
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    how, path, file_name = _paths(tmp_path, tiny_student, malicious_checkpoint, marker, style)[case]
    with pytest.raises(UsageError, match="refusing to load") as info:
        if how == "weights":
            create_student("test_tiny", weights=WeightSpec(file=str(path)))
        elif how == "load":
            load_student(path)
        elif how == "cfg":
            students.read_student_cfg(path)
        else:
            create_student(f"local-dir:{path}")
    assert not marker.exists()
    assert "\n" not in str(info.value) and file_name in str(info.value)


@pytest.mark.parametrize("content", [b"", b"definitely not weights", None])
def test_garbage_and_empty_files_name_the_file(tmp_path, content) -> None:  # noqa: ANN001
    path = tmp_path / "w.safetensors"
    if content is None:  # truncated torch file
        torch.save({"a": torch.ones(1000)}, tmp_path / "full.pt")
        content = (tmp_path / "full.pt").read_bytes()[:300]
        path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        create_student("test_tiny", weights=WeightSpec(file=str(path)))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_wrong_architecture_says_what_differs(tmp_path, tiny_student) -> None:  # noqa: ANN001
    save_file({k: v.contiguous() for k, v in create_student("test_tiny_mct").state_dict().items()}, str(tmp_path / "m"))
    with pytest.raises(UsageError, match="do not fit student 'test_tiny'") as info:
        create_student("test_tiny", weights=WeightSpec(file=str(tmp_path / "m")))
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "m") in msg and "missing: " in msg and "unexpected: " in msg


def test_corrupt_config_is_a_usage_error(tmp_path, tiny_student) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="open_clip_config.json"):
        load_student(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"distill": {"student_cfg": {"bogus": 1}}}))
    with pytest.raises(UsageError, match="bogus"):
        load_student(tmp_path)


@pytest.mark.parametrize(
    "name", ["./runs/nope", "runs/nope", "~/no_such_student_dir", "nope/last.ckpt", "local-dir:{tmp}/x"]
)
def test_missing_student_path_says_no_such_directory(tmp_path, name: str) -> None:  # noqa: ANN001
    name = name.format(tmp=tmp_path)
    for fn in (create_student, get_student_cfg):
        with pytest.raises(UsageError, match="no such directory") as info:
            fn(name)
        assert "list_students" not in str(info.value)


def test_existing_student_path_loads_as_saved(tmp_path, tiny_student, monkeypatch) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    loaded = create_student("./s")
    assert loaded.cfg == tiny_student.cfg == get_student_cfg("./s")
    with pytest.raises(UsageError, match="loaded as saved"):
        create_student("./s", image_size=64)
