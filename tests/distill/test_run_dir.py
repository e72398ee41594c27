"""A training run has one identity (issue 9): identity-checked resume, signals, atomic and damaged checkpoints,
kept metrics history, safe checkpoint loading, and the user errors of `distill train`."""

import builtins
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import distill.run_dir
from distill.cli import main
from distill.run_dir import AtomicCheckpointIO, find_resume_point
from mcd_common import UsageError


def _args(root, corpus, *extra, steps=3):
    args = ["train", "--student", "test_tiny", "--data.path", str(corpus / "train"), "--data.batch_size", "16"]
    args += ["--data.num_workers", "0", "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.log_every_n_steps", "1", "--val.zeroshot", "null", "--val.retrieval", "null"]
    if root is not None:
        args += ["--trainer.default_root_dir", str(root)]
    return [*args, *extra]


def _train_steps(root):
    with open(root / "logs" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _step_of(path):
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


# ------------------------------------------------------------------------------------------------------ identity


def test_resume_refuses_a_different_run_and_names_what_changed(tmp_path, tiny_corpus, capsys):
    assert main(_args(tmp_path, tiny_corpus)) == 0
    capsys.readouterr()
    # A changed image size, data path or mode used to resume the old run silently (0 steps, new args ignored).
    assert main(_args(tmp_path, tiny_corpus, "--image_size", "48")) == 2
    err = capsys.readouterr().err
    assert "image_size: 32 -> 48" in err and "--trainer.default_root_dir" in err and len(err.splitlines()) == 1
    assert main(_args(tmp_path, tiny_corpus, "--teacher", "test_tiny")) == 2
    assert "mode: 'scratch' -> 'online'" in capsys.readouterr().err
    other_data = _args(tmp_path, tiny_corpus)
    other_data[other_data.index("--data.path") + 1] = str(tiny_corpus / "val")
    assert main(other_data) == 2
    assert "data_path:" in capsys.readouterr().err
    # The same run resumes; --trainer.resume never starts over in the same directory.
    assert main(_args(tmp_path, tiny_corpus, steps=4)) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps"] == 4 and run["resumed_from"].endswith("last.ckpt")
    assert main(_args(tmp_path, tiny_corpus, "--image_size", "48", "--trainer.resume", "never", steps=2)) == 0
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["image_size"] == 48


def test_default_run_directory_is_per_run_and_logged(tmp_path, tiny_corpus, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="distill.train")
    assert main(_args(None, tiny_corpus, steps=2)) == 0
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("test_tiny-scratch-") and (first / "student").is_dir()
    assert any(f"run directory: {first.relative_to(tmp_path)}" in r.getMessage() for r in caplog.records)
    # Another run does not collide with it; the same command again resumes its own directory.
    assert main(_args(None, tiny_corpus, "--image_size", "48", steps=2)) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert main(_args(None, tiny_corpus, steps=3)) == 0
    assert json.loads((first / "run.json").read_text())["resumed_from"] is not None
    assert len(list((tmp_path / "runs").iterdir())) == 2


# ------------------------------------------------------------------------------------------------------- signals


def _signal_when_training(root, signum, min_rows=2):
    """Send `signum` to this process once `min_rows` training steps are logged (the CSV is flushed every log)."""
    stop = threading.Event()

    def run():
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            try:
                # Only while someone handles it (a default SIGUSR1 would kill the test process).
                if len(_train_steps(root)) >= min_rows and signal.getsignal(signum) not in (signal.SIG_DFL, None):
                    os.kill(os.getpid(), signum)
                    return
            except (FileNotFoundError, KeyError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return stop


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_exits_non_zero(tmp_path, tiny_corpus, signum):
    late = []
    # NOTE: a signal arriving after training ended must not kill pytest: park it in a handler of our own.
    previous = signal.signal(signum, lambda s, f: late.append(s))
    try:
        stop = _signal_when_training(tmp_path, signum)
        with pytest.raises(SystemExit) as exc:
            main(_args(tmp_path, tiny_corpus, "--trainer.checkpoint_every_n_steps", "1000", steps=500))
        stop.set()
    finally:
        signal.signal(signum, previous)
    assert exc.value.code == 128 + signum
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["interrupted"] == signal.Signals(signum).name and not (tmp_path / "student").exists()
    # The checkpoint is of the step the run stopped at, not of the last periodic save (none was due yet).
    assert 2 <= run["steps"] < 500
    assert _step_of(tmp_path / "checkpoints" / "last.ckpt") == run["steps"]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_loader_workers_checkpoints(tmp_path, tiny_corpus):
    """A terminal's Ctrl-C reaches the DataLoader workers too; they must not crash the loader before the save."""
    args = _args(tmp_path, tiny_corpus, "--trainer.checkpoint_every_n_steps", "1000", steps=500)
    args[args.index("--data.num_workers") + 1] = "1"
    code = "import sys; from distill.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(_train_steps(tmp_path)) >= 3:
                break
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert _step_of(tmp_path / "checkpoints" / "last.ckpt") == json.loads((tmp_path / "run.json").read_text())["steps"]


def test_slurm_requeue_checkpoint_is_written_and_resumed(tmp_path, tiny_corpus, monkeypatch):
    # Lightning's SLURM support: the requeue signal (SIGUSR1) saves hpc_ckpt_N.ckpt in the run directory.
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "distill")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no scontrol: the requeue call fails harmlessly
    # NOTE: no SIGUSR1 handler of our own: Lightning installs its requeue handler only where none is set.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: None)}
    try:
        stop_usr = _signal_when_training(tmp_path, signal.SIGUSR1, min_rows=2)
        stop_term = _signal_when_training(tmp_path, signal.SIGTERM, min_rows=5)
        with pytest.raises(SystemExit) as exc:
            main(_args(tmp_path, tiny_corpus, "--trainer.checkpoint_every_n_steps", "1000", steps=500))
        stop_usr.set(), stop_term.set()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert exc.value.code == 128 + signal.SIGTERM
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and 2 <= _step_of(hpc) <= _step_of(tmp_path / "checkpoints" / "last.ckpt")
    # The requeued job (same command) resumes the newest of last.ckpt and the requeue checkpoint.
    stopped = _step_of(tmp_path / "checkpoints" / "last.ckpt")
    assert main(_args(tmp_path, tiny_corpus, steps=stopped + 1)) == 0
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from"].endswith("last.ckpt")


def _fake_ckpt(path, step, identity):
    torch.save({"global_step": step, "hyper_parameters": {"identity": identity}, "state_dict": {}}, path)


def test_resume_picks_the_newest_readable_checkpoint(tmp_path):
    ident = {"mode": "scratch", "image_size": 32}
    (tmp_path / "checkpoints").mkdir()
    _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", 4, ident)
    _fake_ckpt(tmp_path / "checkpoints" / "step0000004.ckpt", 4, ident)
    assert find_resume_point("auto", tmp_path, ident).path.name == "last.ckpt"  # ties go to last.ckpt
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 6, ident)  # SLURM requeue checkpoint written after last.ckpt
    assert find_resume_point("auto", tmp_path, ident).path.name == "hpc_ckpt_1.ckpt"
    assert find_resume_point("never", tmp_path, ident) is None
    assert not (tmp_path / "hpc_ckpt_1.ckpt").exists()  # Lightning would resume it on its own under SLURM
    with pytest.raises(UsageError, match="image_size: 32 -> 64"):
        find_resume_point("auto", tmp_path, {**ident, "image_size": 64})


def test_checkpoints_from_before_identities_are_checked_on_what_they_record(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    legacy = {"mode": "reinforced", "loss": {"preset": "mobileclip"}, "data": {"path": str(tmp_path / "shards")}}
    torch.save({"global_step": 3, "hyper_parameters": legacy}, tmp_path / "checkpoints" / "last.ckpt")
    new = {"mode": "reinforced", "loss_preset": "mobileclip", "data_path": str(tmp_path / "shards"), "seed": 0}
    assert find_resume_point("auto", tmp_path, new).global_step == 3
    with pytest.raises(UsageError, match="mode: 'reinforced' -> 'scratch'"):
        find_resume_point("auto", tmp_path, {**new, "mode": "scratch", "loss_preset": "contrastive"})


# --------------------------------------------------------------------------------------------------- checkpoints


def test_damaged_last_checkpoint_falls_back_and_stale_temps_are_removed(tmp_path, tiny_corpus, caplog):
    assert main(_args(tmp_path, tiny_corpus, "--trainer.checkpoint_every_n_steps", "1")) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a kill mid-write used to leave
    stale = tmp_path / "checkpoints" / "last.ckpt.tmp-999999999"  # a killed writer's temp file (dead pid)
    stale.write_bytes(b"partial")
    caplog.set_level(logging.WARNING)
    assert main(_args(tmp_path, tiny_corpus, "--trainer.checkpoint_every_n_steps", "1", steps=4)) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps"] == 4 and run["resumed_from"].endswith("step0000003.ckpt")
    assert any("last.ckpt is damaged" in r.getMessage() for r in caplog.records)
    assert not stale.exists()


def test_no_readable_checkpoint_is_a_usage_error(tmp_path, tiny_corpus, capsys):
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert main(_args(tmp_path, tiny_corpus)) == 2
    assert "no readable checkpoint" in capsys.readouterr().err


def test_checkpoint_writes_are_atomic_in_the_destination_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    dest = tmp_path / "run" / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, dest)
    seen = []
    real_save = torch.save

    def killed_mid_write(obj, f):
        seen.append(f)
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(distill.run_dir.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, dest)
    monkeypatch.setattr(distill.run_dir.torch, "save", real_save)
    assert seen[0].parent == dest.parent  # the temp file lives next to the target, not in TMPDIR
    assert io.load_checkpoint(dest)["global_step"] == 1  # the old checkpoint is intact
    assert [p.name for p in dest.parent.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_through_the_atomic_io(tmp_path, tiny_corpus, monkeypatch):
    written = []
    real = distill.run_dir.atomic_path

    def recording(path, **kw):
        written.append(os.fspath(path))
        return real(path, **kw)

    monkeypatch.setattr(distill.run_dir, "atomic_path", recording)
    assert main(_args(tmp_path, tiny_corpus, steps=1)) == 0
    assert str(tmp_path / "checkpoints" / "last.ckpt") in written


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_malicious_checkpoint_is_never_unpickled(tmp_path, tiny_corpus, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"global_step": 1, "hyper_parameters": _Evil(str(marker)), "state_dict": {}}, evil)
    with pytest.raises(UsageError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(evil)  # Lightning's own resume path
    run = tmp_path / "run"
    assert main(_args(run, tiny_corpus, "--trainer.resume", str(evil))) == 2
    assert "refused" in capsys.readouterr().err
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(evil.read_bytes())
    assert main(_args(run, tiny_corpus)) == 2
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- history


def test_metrics_history_survives_a_resume(tmp_path, tiny_corpus):
    assert main(_args(tmp_path, tiny_corpus)) == 0
    assert main(_args(tmp_path, tiny_corpus, steps=6)) == 0
    assert _train_steps(tmp_path) == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------- user errors


def test_user_mistakes_are_one_line_usage_errors(tmp_path, tiny_corpus, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a directory")
    assert main(_args(a_file, tiny_corpus)) == 2
    assert "--trainer.default_root_dir" in capsys.readouterr().err
    missing = _args(tmp_path, tiny_corpus)
    missing[missing.index("--student") + 1] = str(tmp_path / "no_such_student")
    assert main(missing) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(_args(tmp_path, tiny_corpus, "--student_weights", str(tmp_path / "nope.safetensors"))) == 2
    assert "--student_weights" in capsys.readouterr().err
    assert main(_args(tmp_path, tiny_corpus, "--loss.contrastive_weight", "0")) == 2
    assert "nothing to train" in capsys.readouterr().err
