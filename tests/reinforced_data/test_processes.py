"""build-data as real processes: two builds on one `--out` cooperate, and a kill -9 leaves no worker behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reinforced_data import verify_dataset

# Runs build-data as the CLI would. mode "hold": after batch 1 of shard 0 is written (its temp tar exists, its
# lock is held), wait until `<marker>.go` exists. mode "kill": after batch 1 of shard 0, write the pids of this
# process's children (the DataLoader workers) to `<marker>`, then SIGKILL itself.
_SCRIPT = textwrap.dedent(
    """
    import glob, json, logging, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from reinforced_data import BuildArgs, build_data

    out, spec, mode, workers, marker = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

    def children():
        pids = []
        for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
            pids += [int(p) for p in open(path).read().split()]
        return pids

    class Hook(logging.Handler):
        def emit(self, record):
            if not record.getMessage().startswith("shard 0: wrote batch 1/"):
                return
            if mode == "hold":
                open(marker + ".holding", "w").close()
                while not os.path.exists(marker + ".go"):
                    time.sleep(0.05)
            elif mode == "kill":
                with open(marker, "w") as f:
                    json.dump(children(), f)
                os.kill(os.getpid(), signal.SIGKILL)

    log = logging.getLogger("reinforced_data.build")
    log.setLevel(logging.DEBUG)
    log.addHandler(Hook())
    summary = build_data(out=out, input=spec, teacher="test_tiny_ensemble",
                         build=BuildArgs(num_augs=3, batch_size=3, num_workers=workers, progress=False))
    print(json.dumps(summary))
    """
)


def _start(tmp_path: Path, out: Path, spec: str, mode: str, workers: int, marker: Path) -> subprocess.Popen:
    """Start the script; its output goes to `<marker>.out` / `<marker>.err` (files, not pipes: an orphaned worker
    would hold a pipe open, and reading it would never end)."""
    script = tmp_path / "run_build.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(f"{marker}.out", "w") as stdout, open(f"{marker}.err", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(script), str(out), spec, mode, str(workers), str(marker)],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )


def _finish(proc: subprocess.Popen, marker: Path) -> tuple[int, dict | None, str]:
    """`(exit code, printed summary or None, stderr tail)`."""
    code = proc.wait(timeout=300)
    lines = Path(f"{marker}.out").read_text().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None, Path(f"{marker}.err").read_text()[-3000:]


def _wait_for(path: Path, proc: subprocess.Popen, marker: Path, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {Path(f'{marker}.err').read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.1)


@pytest.mark.slow  # two build-data processes (~30 s on 2 loaded cores)
def test_two_builds_on_one_out_never_corrupt_each_other(tmp_path, corpus_spec, built):
    """A second build started while the first was writing deleted the first one's live temp shard ("from an
    interrupted run"); the first then died. Now each process builds the shards it can lock."""
    out, marker = tmp_path / "ds", tmp_path / "first"
    first = _start(tmp_path, out, corpus_spec, "hold", 0, marker)
    try:
        _wait_for(marker.with_name("first.holding"), first, marker)  # mid-shard 0: temp tar written, lock held
        live = list(out.glob("00000000.tar.tmp-*"))
        assert len(live) == 1
        code, summary, err = _finish(
            _start(tmp_path, out, corpus_spec, "run", 0, tmp_path / "second"), tmp_path / "second"
        )
        assert code == 0, err
        assert live[0].exists()  # the live writer's temp was left alone
        assert summary["shards_busy"] == 1 and summary["shards_done"] == 2 and not summary["dataset_complete"]
    finally:
        marker.with_name("first.go").touch()
    code, summary, err = _finish(first, marker)
    assert code == 0, err
    assert summary["shards_done"] == 1 and summary["dataset_complete"]
    assert (out / "manifest.jsonl").read_text() == (built[0] / "manifest.jsonl").read_text()
    assert verify_dataset(out)["ok"] and not list(out.glob("*.tmp-*"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has exited


@pytest.mark.slow  # one build-data process with 2 workers (~15 s)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_leaves_no_dataloader_worker_running(tmp_path, write_tar):
    """A worker blocked writing a batch into the pipe of a SIGKILLed parent stayed alive for good (555 MB)."""
    rng = np.random.default_rng(0)
    samples = []
    for k in range(12):
        # NOTE: big noisy images, so a batch (which carries the image bytes) is larger than a pipe's buffer
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append({"__key__": f"s{k:03d}", "png": buf.getvalue(), "txt": f"noise {k}"})
    spec = str(write_tar(tmp_path / "big.tar", samples))
    marker = tmp_path / "workers.json"
    proc = _start(tmp_path, tmp_path / "ds", spec, "kill", 2, marker)
    assert proc.wait(timeout=300) == -signal.SIGKILL, Path(f"{marker}.err").read_text()[-3000:]
    workers = json.loads(marker.read_text())
    assert len(workers) >= 2
    deadline = time.monotonic() + 4.0
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in workers if _alive(p)]
    for p in survivors:  # clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"workers still running after the parent's kill -9: {survivors}"
