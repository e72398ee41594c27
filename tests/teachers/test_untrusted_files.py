"""Every teacher and captioner weight read refuses pickled code; bad files give one line naming them.

open_clip's own ``load_checkpoint`` retries ``torch.load`` without ``weights_only`` when torch raises ``TypeError``;
with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` that retry unpickles, so the ``typeerror`` file ran code through
``--teacher_weights`` and ``local-dir:`` teachers before this toolkit read weights itself.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from safetensors.torch import save_file

import teachers
from mcd_common import UsageError
from teachers import WeightSpec


@pytest.fixture(params=[False, True], ids=["plain", "force_no_weights_only"])
def force_unsafe(request, monkeypatch) -> bool:  # noqa: ANN001
    if request.param:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return request.param


def _local_dir(path: Path, arch: str) -> Path:
    """An open_clip directory whose checkpoint is written by the caller (``open_clip_pytorch_model.bin``)."""
    import json

    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch)}))
    return path


@pytest.mark.parametrize("style", ["reduce", "typeerror"])
@pytest.mark.parametrize("case", ["teacher_weights", "local_dir_teacher", "captioner_weights", "local_dir_captioner"])
def test_open_clip_paths_refuse_pickled_code(tmp_path, force_unsafe, malicious_checkpoint, case, style) -> None:  # noqa: ANN001
    marker = tmp_path / "pwned"
    teachers.create_teacher("test_tiny")  # registers the tiny open_clip configs
    arch = "test-tiny-coca" if case.endswith("captioner") else "test-tiny-clip"
    if case.startswith("local_dir"):
        spec = "local-dir:" + str(_local_dir(tmp_path / "d", arch))
        evil = malicious_checkpoint(tmp_path / "d" / "open_clip_pytorch_model.bin", marker, style=style)
        weights = None
    else:
        spec = "test_tiny_coca" if case.endswith("captioner") else "test_tiny"
        evil = malicious_checkpoint(tmp_path / "w.pt", marker, style=style)
        weights = WeightSpec(file=str(evil))
    create = teachers.create_captioner if case.endswith("captioner") else teachers.create_teacher
    with pytest.raises(UsageError, match="refusing to load") as info:
        create(spec, weights=weights)
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and str(evil) in msg, msg


@pytest.mark.parametrize("kind", ["teacher", "captioner"])
def test_hugging_face_dirs_refuse_pickled_code(  # noqa: ANN001
    tmp_path, hf_clip_dir, hf_blip_dir, force_unsafe, malicious_checkpoint, kind
) -> None:
    # transformers reads the weights itself, with weights_only=True passed explicitly
    marker = tmp_path / "pwned"
    directory = hf_clip_dir if kind == "teacher" else hf_blip_dir
    (directory / "model.safetensors").unlink()
    malicious_checkpoint(directory / "pytorch_model.bin", marker)
    create = teachers.create_teacher if kind == "teacher" else teachers.create_captioner
    with pytest.raises(UsageError, match="refusing to load") as info:
        create(f"hf:{directory}")
    assert not marker.exists()
    assert "\n" not in str(info.value) and str(directory) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"definitely not weights"])
def test_garbage_and_empty_teacher_weights_name_the_file(tmp_path, content: bytes) -> None:  # noqa: ANN001
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        teachers.create_teacher("test_tiny", weights=WeightSpec(file=str(path)))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "--teacher_weights" in msg


def test_wrong_architecture_teacher_weights_say_what_differs(tmp_path) -> None:  # noqa: ANN001
    teachers.create_teacher("test_tiny")  # registers the tiny open_clip configs
    other = open_clip.create_model("test-tiny-clip-b")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "b.safetensors"))
    with pytest.raises(UsageError, match="does not fit") as info:
        teachers.create_teacher("test_tiny", weights=WeightSpec(file=str(tmp_path / "b.safetensors")))
    msg = str(info.value)
    assert "\n" not in msg and "b.safetensors" in msg and "shape mismatch" in msg
