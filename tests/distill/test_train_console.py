"""What `distill train` leaves at the console and in the run folder (issue 13): the best validation checkpoint kept
beside last.ckpt (`--trainer.save_best`), a warning when a resume changes the LR schedule, and `-q` output that is
the result only."""

import csv
import json
import logging

import pytest
import torch

from distill.cli import main
from distill.module import cosine_with_warmup
from distill.run_dir import ResumePoint, check_schedule_change
from distill.train import validation_metrics


def _args(root, corpus, *extra, steps=2):
    args = ["train", "--student", "test_tiny", "--data.path", str(corpus / "train"), "--data.batch_size", "16"]
    args += ["--data.num_workers", "0", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.log_every_n_steps", "1"]
    return [*args, *extra]


def _val(corpus):
    return ["--val.zeroshot", str(corpus / "zeroshot"), "--val.retrieval", str(corpus / "val")]


def test_save_best_keeps_the_best_validation_checkpoint_beside_last(tmp_path, tiny_corpus):
    root = tmp_path / "run"
    best_flags = ["--trainer.val_check_interval", "1", "--trainer.save_best", "val/t2i_R@5"]
    assert main(_args(root, tiny_corpus, *_val(tiny_corpus), *best_flags, steps=4)) == 0
    run = json.loads((root / "run.json").read_text())
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert run["best_metric"] == "val/t2i_R@5"
    assert run["best_checkpoint"] == str((root / "checkpoints" / "best.ckpt").resolve())
    # the metrics validation logs are the names --trainer.save_best is checked against
    assert set(run["metrics"]) == set(validation_metrics(zeroshot=True, retrieval=True))
    with open(root / "logs" / "metrics.csv", newline="") as f:
        scores = [(int(r["step"]), float(r["val/t2i_R@5"])) for r in csv.DictReader(f) if r.get("val/t2i_R@5")]
    assert len(scores) == 4  # validated after every step
    best_score = max(s for _, s in scores)
    first_best_step = next(step for step, s in scores if s == best_score)  # a tie does not replace the best
    best = torch.load(root / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    # metrics.csv logs validation at the step index (global step - 1 after the optimizer step)
    assert best["global_step"] == first_best_step + 1
    assert run["best_score"] == pytest.approx(best_score, abs=1e-3)


def test_save_best_names_a_metric_validation_logs(tmp_path, tiny_corpus, capsys):
    root = tmp_path / "run"
    assert main(_args(root, tiny_corpus, *_val(tiny_corpus), "--trainer.save_best", "val/t2i_R@2")) == 2
    err = capsys.readouterr().err
    assert "--trainer.save_best val/t2i_R@2: validation logs val/zeroshot_top1, val/i2t_R@1" in err
    # plain training data and no --val.* set: nothing is validated
    assert main(_args(root, tiny_corpus, "--trainer.save_best", "val/t2i_R@1")) == 2
    assert "this run has no validation set; pass --val.retrieval" in capsys.readouterr().err
    assert main(_args(root, tiny_corpus, "--trainer.save_best", "t2i_R@1")) == 2
    assert "name a validation metric, e.g. val/t2i_R@1" in capsys.readouterr().err
    assert not (root / "checkpoints").exists()  # refused before any training


def test_resuming_with_other_max_steps_warns_that_the_schedule_changes(tmp_path, tiny_corpus, caplog):
    root = tmp_path / "run"
    assert main(_args(root, tiny_corpus, steps=2)) == 0
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert main(_args(root, tiny_corpus, steps=2)) == 0  # the same schedule: no warning
    assert not [r for r in caplog.records if "changed schedule" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert main(_args(root, tiny_corpus, steps=4)) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "changed schedule" in r.getMessage()]
    assert "--trainer.max_steps 2 -> 4" in warning and "recomputed from step 2" in warning
    assert json.loads((root / "run.json").read_text())["steps"] == 4


def test_schedule_change_message_gives_the_learning_rate_before_and_after(tmp_path):
    optim = {"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.0, "weight_decay": 0.2}
    point = ResumePoint(tmp_path / "last.ckpt", 500, {"max_steps": 1000, "optim": dict(optim)})
    assert check_schedule_change(point, max_steps=1000, optim=optim) is None
    message = check_schedule_change(point, max_steps=2000, optim=optim)
    old, new = 1e-3 * cosine_with_warmup(500, 10, 1000), 1e-3 * cosine_with_warmup(500, 10, 2000)
    assert f"lr {old:.3g} (the checkpoint's schedule) -> {new:.3g}, decaying to step 2000" in message
    message = check_schedule_change(point, max_steps=1000, optim={**optim, "lr": 2e-3})
    assert "--optim.lr 0.001 -> 0.002" in message
    assert "nothing is left to train" in check_schedule_change(point, max_steps=400, optim=optim)
    assert check_schedule_change(ResumePoint(point.path, 5, {}), max_steps=10, optim=optim) is None  # not recorded


def test_quiet_train_prints_only_the_result(tmp_path, tiny_corpus, capsys):
    # default: no Rich model-summary table on a stdout that is not a terminal, our own INFO lines on stderr
    assert main(_args(tmp_path / "a", tiny_corpus)) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 2  # stdout is the result alone
    assert "M parameters" in err and "distill.progress" in err
    # -q: the result only; no model summary, no progress lines, no INFO at all
    assert main(["-q", *_args(tmp_path / "b", tiny_corpus)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 2
    assert err == ""
