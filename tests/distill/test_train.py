"""End-to-end `distill train` runs on the tiny corpus (litgpt test_lora_script style), all three modes."""

import csv
import json
import math

import pytest
import torch
import yaml

from distill.cli import main


def _args(root, corpus, *extra):
    return [
        "train",
        "--student",
        "test_tiny",
        "--data.path",
        str(corpus / "train"),
        "--data.batch_size",
        "16",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--val.zeroshot",
        str(corpus / "zeroshot"),
        "--val.retrieval",
        str(corpus / "val"),
        *extra,
    ]


def _losses(root):
    with open(root / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def test_scratch_mode_writes_checkpoint_student_and_run_json(tmp_path, tiny_corpus):
    assert main(_args(tmp_path, tiny_corpus)) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    hparams = yaml.safe_load((tmp_path / "logs" / "hparams.yaml").read_text())
    assert hparams["mode"] == "scratch" and hparams["student_cfg"]["name"] == "test_tiny"
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps"] == 3 and run["mode"] == "scratch"
    assert {"val/zeroshot_top1", "val/i2t_R@1", "val/t2i_R@10"} <= set(run["metrics"])
    assert run["versions"]["torch"] == torch.__version__.split("+")[0] or run["versions"]["torch"]
    assert len(run["data_fingerprint"]) == 64
    # The saved student is an open_clip model directory that loads back with identical weights.
    from students import load_student

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    student = load_student(tmp_path / "student")
    for k, v in student.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"]["student." + k]), k
    assert all(math.isfinite(v) for v in _losses(tmp_path).values())


def test_online_mode_with_teacher_ensemble_logs_every_term(tmp_path, tiny_corpus):
    assert main(_args(tmp_path, tiny_corpus, "--teacher", "test_tiny_ensemble", "--loss.preset", "clip_kd")) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["mode"] == "online"
    with open(tmp_path / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for term in ("train/contrastive_loss", "train/kd_loss", "train/fd_loss", "train/icl_loss"):
        assert term in header


def test_tinyclip_preset_freezes_student_scale_at_50(tmp_path, tiny_corpus):
    assert main(_args(tmp_path, tiny_corpus, "--teacher", "test_tiny", "--loss.preset", "tinyclip")) == 0
    from students import load_student

    scale = load_student(tmp_path / "student").logit_scale.exp().item()
    assert scale == pytest.approx(50.0, rel=1e-5)


def test_bad_flags_give_clear_errors(tmp_path, tiny_corpus, capsys):
    assert main(_args(tmp_path, tiny_corpus, "--mode", "reinforced")) == 2
    assert "build-data" in capsys.readouterr().err
    assert main(_args(tmp_path, tiny_corpus, "--mode", "online")) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(_args(tmp_path, tiny_corpus, "--optim.lr", "-1")) == 2
    assert "--optim.lr" in capsys.readouterr().err
    with pytest.raises(KeyError, match="test_tiny"):
        from students import create_student

        create_student("test_tin")


def test_resume_after_sigkill_continues_the_same_loss_trajectory(tmp_path, tiny_corpus):
    """A run killed with SIGKILL and restarted with the same command ends like an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def cmd(root):
        args = _args(
            root,
            tiny_corpus,
            "--trainer.max_steps",
            "8",
            "--trainer.checkpoint_every_n_steps",
            "2",
            "--val.zeroshot",
            "null",
            "--val.retrieval",
            "null",
        )
        return [sys.executable, "-c", "import sys; from distill.cli import main; sys.exit(main(sys.argv[1:]))", *args]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_at = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= resumed_at < 8, "the kill must land mid-run for this test to mean anything"
    subprocess.run(cmd(run), check=True, env=env, capture_output=True)

    a, b = _losses(ref), _losses(run)
    after = [s for s in a if s >= resumed_at]
    assert after and all(s in b for s in after)
    for s in after:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), f"step {s}: {b[s]} vs {a[s]}"
    final_a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)
    final_b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_b["global_step"] == final_a["global_step"] == 8
    for k, v in final_a["state_dict"].items():
        torch.testing.assert_close(final_b["state_dict"][k], v, rtol=1e-5, atol=1e-6)


def test_coca_student_trains_with_caption_loss_and_serves_as_teacher_and_captioner(tmp_path, tiny_corpus):
    import teachers

    assert main(_args(tmp_path, tiny_corpus, "--student", "test_tiny_coca")) == 0
    with open(tmp_path / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train/caption_loss" in header and "train/contrastive_loss" in header
    teacher = teachers.create_teacher(f"local-dir:{tmp_path / 'student'}")
    from students import load_student

    student = load_student(tmp_path / "student")
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(
        teacher.encode_image(images),
        student.encode_image(student.normalize(images), normalize=True),
        rtol=1e-5,
        atol=1e-5,
    )
    captioner = teachers.create_captioner(f"local-dir:{tmp_path / 'student'}")
    caps = captioner.generate(images, num_captions=2, seed=0, max_len=8)
    assert len(caps) == 2 and all(isinstance(c, str) for cs in caps for c in cs)


def test_manual_inheritance_and_auto_l0_pruning(tmp_path, tiny_corpus):
    from students import load_student

    src = tmp_path / "src"
    assert main(_args(src, tiny_corpus, "--student", "tiny_vit", "--image_size", "32")) == 0
    # Manual (TinyCLIP) inheritance into a thinner, shallower student of the same family.
    man = tmp_path / "manual"
    assert (
        main(
            _args(
                man,
                tiny_corpus,
                "--student",
                "tiny_vit_s",
                "--image_size",
                "32",
                "--inherit.source",
                str(src / "student"),
                "--trainer.max_steps",
                "1",
            )
        )
        == 0
    )
    run = json.loads((man / "run.json").read_text())
    assert "inheritance" in run
    # Automatic inheritance: learn masks, prune at step 2, keep training the compact model, and save it.
    auto = tmp_path / "auto"
    assert (
        main(
            _args(
                auto,
                tiny_corpus,
                "--student",
                "tiny_vit",
                "--inherit.source",
                str(src / "student"),
                "--inherit.mode",
                "auto",
                "--inherit.target_sparsity",
                "0.5",
                "--inherit.sparsity_warmup_steps",
                "1",
                "--inherit.mask_lr",
                "3.0",
                "--trainer.max_steps",
                "8",
                "--inherit.prune_step",
                "6",
            )
        )
        == 0
    )
    big, small = load_student(src / "student"), load_student(auto / "student")
    n_big = sum(p.numel() for p in big.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < n_big
    ckpt = torch.load(auto / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["student_cfg"] == small.cfg.to_dict()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert small.encode_image(small.normalize(x)).shape == (2, small.embed_dim)


def test_inherit_from_the_live_open_clip_teacher(tmp_path, tiny_corpus):
    assert (
        main(
            _args(
                tmp_path,
                tiny_corpus,
                "--teacher",
                "test_tiny",
                "--inherit.source",
                "teacher",
                "--loss.preset",
                "tinyclip",
                "--trainer.max_steps",
                "1",
            )
        )
        == 0
    )
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["mode"] == "online" and "inheritance" in run
