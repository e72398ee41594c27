"""A student with a locked pretrained Hugging Face text tower (LiT-style) trains, resumes, saves, reloads, evaluates,
serves as a teacher and exports (`--hf_text_dir`, `--lock.text`)."""

from __future__ import annotations

import json

import pytest
import torch

import teachers
from distill.cli import main
from distill.student_teachers import StudentTeacher
from students import load_student


def _train_args(root, corpus, hf_dir, steps, *extra):
    return [
        "train", "--student", "test_tiny_hf", "--hf_text_dir", str(hf_dir), "--lock.text", "true",
        "--data.path", str(corpus / "train"), "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.max_steps", str(steps), "--trainer.checkpoint_every_n_steps", "2",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--val.zeroshot", "null", "--val.retrieval", "null", *extra,
    ]  # fmt: skip


def _pretrained_encoder(hf_dir) -> dict[str, torch.Tensor]:
    from transformers import BertModel

    return BertModel.from_pretrained(hf_dir, local_files_only=True, add_pooling_layer=False).state_dict()


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory, tiny_corpus, tiny_hf_text_dir):
    """`test_tiny_hf` trained 2 steps with its text encoder locked (the projection trains)."""
    root = tmp_path_factory.mktemp("locked_hf")
    assert main(_train_args(root, tiny_corpus, tiny_hf_text_dir, 2)) == 0
    return root


def _assert_encoder_frozen_and_rest_trained(state, encoder, initial):
    for key, value in encoder.items():
        assert torch.equal(state[f"student.text.transformer.{key}"], value), key
    assert not torch.equal(state["student.text.proj.weight"], initial.text.proj.weight)
    assert not torch.equal(state["student.visual.proj"], initial.visual.proj)


def test_locked_encoder_is_unchanged_and_left_out_of_the_optimizer(locked_run, tiny_hf_text_dir):
    import students

    torch.manual_seed(0)  # the run's seed: the same initial student
    initial = students.create_student("test_tiny_hf", hf_model_dir=str(tiny_hf_text_dir))
    ckpt = torch.load(locked_run / "checkpoints" / "last.ckpt", weights_only=True)
    _assert_encoder_frozen_and_rest_trained(ckpt["state_dict"], _pretrained_encoder(tiny_hf_text_dir), initial)
    trainable = [n for n, p in initial.named_parameters() if not n.startswith("text.transformer.")]
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # frozen weights: no optimizer state, no decay
    run = json.loads((locked_run / "run.json").read_text())
    assert run["lock"]["text"]["frozen_params"] > 0 and run["config"]["lock"]["text"] is True


def test_resumed_run_keeps_the_lock(locked_run, tiny_corpus, tiny_hf_text_dir):
    import shutil

    root = locked_run.parent / "resumed"
    shutil.copytree(locked_run, root)
    assert main(_train_args(root, tiny_corpus, tiny_hf_text_dir, 4)) == 0
    run = json.loads((root / "run.json").read_text())
    assert run["steps"] == 4 and run["resumed_from"]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in _pretrained_encoder(tiny_hf_text_dir).items():
        assert torch.equal(ckpt["state_dict"][f"student.text.transformer.{key}"], value), key


def test_saved_student_reloads_evaluates_and_teaches(locked_run, tiny_corpus, capsys):
    student = load_student(locked_run / "student")
    ckpt = load_student(locked_run / "checkpoints" / "last.ckpt")
    captions = ["a red circle", "two blue squares left of a star"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = student.tokenize(captions)
        torch.testing.assert_close(student.encode_text(tokens), ckpt.encode_text(tokens), rtol=0, atol=0)
        torch.testing.assert_close(
            student.encode_image(student.normalize(images)), ckpt.encode_image(ckpt.normalize(images)), rtol=0, atol=0
        )
    out = locked_run / "eval.json"
    args = ["eval", "--student", str(locked_run / "student"), "--data.zeroshot", str(tiny_corpus / "zeroshot"),
            "--data.retrieval", str(tiny_corpus / "val"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "zero-shot" in capsys.readouterr().out
    teacher = teachers.create_teacher(f"local-dir:{locked_run / 'student'}")
    assert isinstance(teacher, StudentTeacher)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_texts(captions), student.encode_text(tokens), rtol=0, atol=0)


@pytest.mark.slow
def test_export_lowers_both_towers(locked_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(locked_run / "student"), "--out", str(out), "--format", "all"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "test_tiny_hf"
    assert (out / "text_encoder_xnnpack_fp32.pte").is_file() and (out / "text_encoder_fp16.mlpackage").exists()
