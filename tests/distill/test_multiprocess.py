"""Two real training processes (torchrun + Lightning DDP over gloo, CPU) against one process on the whole batch.

The distributed loss paths (features gathered with gradients, local rows scored against global columns, teacher
targets gathered without gradients, ICL labels offset by rank) only run with a process group, so these tests start
two ranks with `torch.distributed.run` and drive the product through `distill.cli.main` only.

How a rank's loss is read: the worker registers a global module forward hook that records the output of the
training objective (`distill.DistillLoss`, the loss module `distill train` builds) on every step. With equal local
batches the global loss is the mean of the ranks' losses.

Why the optimiser settings: after one AdamW step the update is `lr * g / (|g| + eps)`, i.e. `lr * sign(g)` with
the default eps, which would hide a gradient off by any positive factor (a missing world-size factor, say).
With `eps` far above `|g|` the step is `lr / eps * g`, plain SGD, so weights that agree to 1e-5 after moving by
more than 1e-3 mean gradients that agree to 1 %. Weight decay and clipping are off for the same reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import distill
from distill.cli import main
from mcd_common.weights import read_state_dict_file
from reinforced_data import BuildArgs, CorpusCfg, InputArgs, build_data, write_shapes_corpus
from students import create_student, load_student, save_student

PRESETS = ("contrastive", "mobileclip", "tinyclip", "clip_kd")
GLOBAL_BATCH = 16  # 8 samples per rank
TOL = 1e-5
_ROOT = Path(__file__).resolve().parents[2]

# One rank (or the single process): runs `distill train` command lines in turn and records each step's loss.
_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import distill
    from distill.cli import main

    spec = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ.get("RANK", "0"))
    losses = []

    def record(module, inputs, output):
        if isinstance(module, distill.DistillLoss):
            losses.append(float(sum(v.detach() for v in output.values())))
            if rank == 0 and len(losses) == spec.get("kill_at_loss"):
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-step, at a known point

    torch.nn.modules.module.register_module_forward_hook(record)
    runs = []
    for argv in spec["runs"]:
        losses.clear()
        runs.append({"code": main(argv), "losses": list(losses)})
    with open(spec["out"] + f".rank{rank}.json", "w") as f:
        json.dump(runs, f)
    """
)


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 reinforced samples (tiny two-teacher ensemble, 2 views, alternative captions as synthetic ones)."""
    root = tmp_path_factory.mktemp("mp")
    write_shapes_corpus(root / "corpus", CorpusCfg(n_train=32, n_val=4, n_zeroshot_per_class=1, shard_size=16))
    build = BuildArgs(num_augs=2, batch_size=16, num_workers=0, progress=False)
    build_data(
        out=root / "rd", data=InputArgs(path=str(root / "corpus" / "train")), teacher="test_tiny_ensemble", build=build
    )
    return root / "rd"


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved test_tiny student: every run starts from exactly these weights."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("init") / "student"
    save_student(create_student("test_tiny"), path)
    return path


def _train_argv(data: Path, init: Path, root: Path, batch: int, *extra: str) -> list[str]:
    return [
        "train",
        "--student",
        "test_tiny",
        "--student_weights",
        str(init),
        "--data.path",
        str(data),
        "--data.batch_size",
        str(batch),
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.resume",
        "never",
        "--trainer.enable_progress_bar",
        "false",
        "--val.zeroshot",
        "null",
        "--val.retrieval",
        "null",
        *extra,
    ]


def _one_step(preset: str) -> list[str]:
    return [
        "--loss.preset",
        preset,
        "--trainer.max_steps",
        "1",
        "--optim.lr",
        "1e4",
        "--optim.eps",
        "1e6",
        "--optim.weight_decay",
        "0",
        "--trainer.gradient_clip_val",
        "null",
    ]


def _ddp() -> list[str]:
    return ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _torchrun(tmp: Path, name: str, runs: list[list[str]], kill_at_loss: int | None = None) -> tuple:
    """Run the worker on 2 ranks; returns (completed process, [rank0 runs, rank1 runs] or None if none wrote)."""
    script, spec = tmp / "worker.py", tmp / f"{name}.json"
    script.write_text(_WORKER)
    spec.write_text(json.dumps({"out": str(tmp / name), "runs": runs, "kill_at_loss": kill_at_loss}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(spec),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    outs = [tmp / f"{name}.rank{r}.json" for r in (0, 1)]
    ranks = [json.loads(p.read_text()) for p in outs] if all(p.is_file() for p in outs) else None
    return proc, ranks


class _RecordLosses:
    """The worker's hook, in this process: records `DistillLoss` outputs while active."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def __enter__(self) -> _RecordLosses:
        def hook(module: torch.nn.Module, inputs: object, output: dict) -> None:
            if isinstance(module, distill.DistillLoss):
                self.losses.append(float(sum(v.detach() for v in output.values())))

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return read_state_dict_file(root / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory: pytest.TempPathFactory, reinforced: Path, init_weights: Path) -> dict:
    """Every preset, one step: in this process on the global batch, and on 2 ranks (one launch for all presets)."""
    tmp = tmp_path_factory.mktemp("one_step")
    single: dict[str, dict] = {}
    for preset in PRESETS:
        root = tmp / f"single-{preset}"
        with _RecordLosses() as rec:
            code = main(_train_argv(reinforced, init_weights, root, GLOBAL_BATCH, *_one_step(preset)))
        single[preset] = {"code": code, "losses": rec.losses, "root": root}
    runs = [
        _train_argv(reinforced, init_weights, tmp / f"ddp-{p}", GLOBAL_BATCH // 2, *_one_step(p), *_ddp())
        for p in PRESETS
    ]
    proc, ranks = _torchrun(tmp, "ddp", runs)
    assert proc.returncode == 0 and ranks is not None, proc.stderr[-4000:]
    ddp = {p: {"ranks": [ranks[0][i], ranks[1][i]], "root": tmp / f"ddp-{p}"} for i, p in enumerate(PRESETS)}
    return {"single": single, "ddp": ddp}


@pytest.mark.parametrize("preset", PRESETS)
def test_two_ranks_match_one_process_on_the_global_batch(preset, one_step_runs, init_weights):
    single, ddp = one_step_runs["single"][preset], one_step_runs["ddp"][preset]
    assert single["code"] == 0 and [r["code"] for r in ddp["ranks"]] == [0, 0]
    (loss,) = single["losses"]
    (loss0,), (loss1,) = (r["losses"] for r in ddp["ranks"])
    # Each rank scored its own half of the batch (else the split would not be tested) ...
    assert abs(loss0 - loss1) > 1e-4 * abs(loss)
    # ... and their mean is the loss of the whole batch in one process.
    assert abs((loss0 + loss1) / 2 - loss) <= TOL * max(1.0, abs(loss)), (loss0, loss1, loss)

    one, two = _weights(single["root"]), _weights(ddp["root"])
    assert set(one) == set(two)
    diff = {k: float((one[k] - two[k]).abs().max()) for k in one}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= TOL, f"{worst}: {diff[worst]:.2e}"
    init = {f"student.{k}": v for k, v in load_student(init_weights).state_dict().items()}
    moved = max(float((one[k] - v).abs().max()) for k, v in init.items())
    assert moved > 100 * TOL, f"the step moved the weights by only {moved:.2e}: the comparison would be vacuous"


@pytest.mark.slow
def test_two_rank_run_killed_and_resumed_equals_uninterrupted(tmp_path, reinforced, init_weights):
    """SIGKILL of rank 0 in step 3 (after the step-2 checkpoint), restart with the same command: same end."""
    extra = [
        "--trainer.max_steps",
        "4",
        "--trainer.checkpoint_every_n_steps",
        "2",
        "--optim.lr",
        "1e-2",
        "--data.num_workers",
        "1",
        *_ddp(),
    ]
    ref_root, run_root = tmp_path / "ref", tmp_path / "run"
    proc, ref = _torchrun(tmp_path, "ref", [_train_argv(reinforced, init_weights, ref_root, 8, *extra)])
    assert proc.returncode == 0 and ref is not None, proc.stderr[-4000:]
    argv = _train_argv(reinforced, init_weights, run_root, 8, *extra)
    argv[argv.index("--trainer.resume") + 1] = "auto"

    proc, killed = _torchrun(tmp_path, "killed", [argv], kill_at_loss=3)
    assert proc.returncode != 0 and killed is None
    assert "SIGKILL" in proc.stderr, proc.stderr[-4000:]
    ckpts = sorted(p.name for p in (run_root / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000002.ckpt"], ckpts
    proc, resumed = _torchrun(tmp_path, "resumed", [argv])
    assert proc.returncode == 0 and resumed is not None, proc.stderr[-4000:]

    for rank in (0, 1):
        (ref_run,), (res_run,) = ref[rank], resumed[rank]
        assert len(ref_run["losses"]) == 4 and res_run["losses"] == ref_run["losses"][2:], (rank, res_run, ref_run)
    a, b = _weights(ref_root), _weights(run_root)
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.equal(b[k], v), k
