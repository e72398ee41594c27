"""Every trained student is a teacher: an MCt student trained here serves as a `local-dir:` teacher in `build-data`
and in online `train` (through the students backend `distill` registers in `teachers.local_dir`)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

import teachers
from distill.cli import main
from distill.student_teachers import StudentTeacher
from mcd_common import UsageError
from mcd_common.images import decode_image, to_uint8_tensor
from reinforced_data._io import decode_npz
from reinforced_data.augment import decode_param_aug, replay
from students import load_student
from teachers.open_clip_teacher import OpenClipTeacher

ATOL = 2e-3  # float16 storage of unit vectors


def _train(root, corpus, student, *extra):
    args = [
        "train", "--student", student, "--data.path", str(corpus / "train"), "--data.batch_size", "16",
        "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--val.zeroshot", "null", "--val.retrieval", "null", *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return root / "student"


@pytest.fixture(scope="module")
def mct_student_dir(tmp_path_factory, tiny_corpus):
    """`test_tiny_mct` trained 2 steps from scratch with `distill train`."""
    return _train(tmp_path_factory.mktemp("mct"), tiny_corpus, "test_tiny_mct")


def _pixels(n: int = 3, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_mct_student_is_a_teacher_with_the_students_own_embeddings(mct_student_dir):
    teacher = teachers.create_teacher(f"local-dir:{mct_student_dir}")
    student = load_student(mct_student_dir)
    assert isinstance(teacher, StudentTeacher) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert (teacher.image_size, teacher.context_length, teacher.embed_dim) == (32, 16, 32)
    assert teacher.learned_logit_scale == pytest.approx(student.logit_scale.exp().item())
    assert teacher.logit_scale == teachers.DEFAULT_KD_LOGIT_SCALE
    images, captions = _pixels(), ["a red circle", "two blue squares", "a star"]
    with torch.no_grad():
        torch.testing.assert_close(
            teacher.encode_image(images), student.encode_image(student.normalize(images)), rtol=0, atol=0
        )
        tokens = student.tokenize(captions)
        assert torch.equal(teacher.tokenize(captions), tokens)
        torch.testing.assert_close(teacher.encode_texts(captions), student.encode_text(tokens), rtol=0, atol=0)
    teacher.train()  # a teacher never leaves eval mode (MCt BatchNorm statistics stay fixed)
    assert not teacher.student.training


def test_build_data_with_an_mct_student_teacher_stores_its_embeddings(mct_student_dir, tiny_corpus, tmp_path):
    out = tmp_path / "ds"
    args = ["build-data", "--out", str(out), "--input", str(tiny_corpus / "train"), "--teacher",
            f"local-dir:{mct_student_dir}", "--build.num_augs", "2", "--build.batch_size", "8",
            "--build.num_workers", "0", "--build.progress", "false"]  # fmt: skip
    assert main(args) == 0
    member = json.loads((out / "teach.json").read_text())["teachers"][0]
    assert (member["dim"], member["image_size"], member["context_length"]) == (32, 32, 16)
    student = load_student(mct_student_dir)
    shard = sorted(out.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({n.split(".", 1)[0] for n in members})[:4]
    for key in keys:
        arrays = decode_npz(members[f"{key}.npz"])
        img = decode_image(members[f"{key}.jpg"])
        views = torch.stack(
            [to_uint8_tensor(replay(img, r, 32)) for r in decode_param_aug(members[f"{key}.paug.json"])]
        )
        caption = members[f"{key}.txt"].decode()
        with torch.no_grad():
            image_features = student.encode_image(student.normalize(views)).numpy()
            text_features = student.encode_text(student.tokenize([caption])).numpy()
        np.testing.assert_allclose(arrays["image_emb"].astype(np.float32), image_features, atol=ATOL, err_msg=key)
        np.testing.assert_allclose(arrays["text_emb"].astype(np.float32), text_features, atol=ATOL, err_msg=key)


def test_online_training_from_an_mct_student_teacher(mct_student_dir, tiny_corpus, tmp_path):
    _train(tmp_path, tiny_corpus, "test_tiny", "--teacher", f"local-dir:{mct_student_dir}")
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["mode"] == "online" and run["steps"] == 2
    assert run["loss"]["teacher_logit_scales"]  # the MCt student's own learned scale


def test_inherit_source_takes_an_mct_student_directory(mct_student_dir, tiny_corpus, tmp_path):
    _train(tmp_path, tiny_corpus, "test_tiny_mct", "--inherit.source", str(mct_student_dir))
    assert "inheritance" in json.loads((tmp_path / "run.json").read_text())


def test_open_clip_loadable_students_still_load_with_open_clip(tmp_path, tiny_corpus):
    directory = _train(tmp_path, tiny_corpus, "test_tiny")
    assert isinstance(teachers.create_teacher(f"local-dir:{directory}"), OpenClipTeacher)


def test_without_the_distill_backend_the_error_says_what_to_import(mct_student_dir, monkeypatch):
    from teachers import local_dir

    monkeypatch.setattr(local_dir, "_BACKENDS", {})  # a program that never imported distill
    with pytest.raises(UsageError, match="import distill"):
        teachers.create_teacher(f"local-dir:{mct_student_dir}")


def test_only_directories_open_clip_cannot_build_take_the_students_backend():
    from distill.student_teachers import is_student_only_dir
    from students import MCT_OPEN_CLIP_MARKER

    def config(text=None, image=None, marker=False):
        text_cfg = {"width": 32, **({MCT_OPEN_CLIP_MARKER: {}} if marker else {})}
        student_cfg = {"text": text or {"kind": "transformer"}, "image": image or {}}
        return {"model_cfg": {"text_cfg": text_cfg}, "distill": {"student_cfg": student_cfg}}

    assert not is_student_only_dir(config())
    assert not is_student_only_dir({"model_cfg": {"text_cfg": {}}})  # a plain open_clip directory
    assert is_student_only_dir(config(text={"kind": "mct"}))
    assert is_student_only_dir({"model_cfg": {"text_cfg": {MCT_OPEN_CLIP_MARKER: {}}}})
    assert is_student_only_dir(config(text={"kind": "hf"}))
    assert is_student_only_dir(config(image={"apple_vit": True}))


def test_a_student_teacher_runs_at_its_own_sizes(mct_student_dir):
    with pytest.raises(UsageError, match="its own sizes"):
        teachers.create_teacher(f"local-dir:{mct_student_dir}", image_size=64)
