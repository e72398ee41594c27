"""A build killed with SIGKILL mid-shard, restarted with the same arguments, equals an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from reinforced_data._io import decode_npz

# Runs build-data like the CLI would. With "kill", a logging handler SIGKILLs the process right after batch 2 of 4
# of shard 1 was written: a real SIGKILL (no cleanup, no finally), at a deterministic point of the run.
_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from reinforced_data import BuildArgs, build_data

    out, spec, mode, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class KillMidShard(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "shard 1: wrote batch 2/4":
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill":
        log = logging.getLogger("reinforced_data.build")
        log.setLevel(logging.DEBUG)
        log.addHandler(KillMidShard())
    summary = build_data(out=out, input=spec, teacher="test_tiny_ensemble",
                         build=BuildArgs(num_augs=3, batch_size=3, num_workers=workers, progress=False))
    print(json.dumps(summary))
    """
)


def _run(tmp_path: Path, out: Path, spec: str, mode: str, workers: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run_build.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), str(out), spec, mode, str(workers)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path, corpus_spec, built, dataset_samples):
    out = tmp_path / "ds"
    killed = _run(tmp_path, out, corpus_spec, "kill", 0)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # shard 0 finished, shard 1 was mid-write: a partial temp file and no final tar
    assert (out / "00000000.tar").is_file() and (out / "_progress" / "00000000.tar.json").is_file()
    assert not (out / "00000001.tar").exists()
    partial = list(out.glob("00000001.tar.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0

    resumed = _run(tmp_path, out, corpus_spec, "resume", 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["shards_resumed"] == 1 and summary["shards_done"] == 2 and summary["dataset_complete"]
    assert not list(out.glob("*.tmp-*"))

    reference = dataset_samples(built[0])
    got = dataset_samples(out)
    assert list(got) == list(reference)  # same uids, same order, no duplicate, none missing
    for uid, members in got.items():
        ref = reference[uid]
        assert list(members) == list(ref)
        for ext, data in members.items():
            if ext == "npz":
                a, b = decode_npz(data), decode_npz(ref[ext])
                assert list(a) == list(b)
                for name in a:
                    assert np.array_equal(a[name], b[name]), (uid, name)
            else:
                assert data == ref[ext], (uid, ext)
    # shards are deterministic byte for byte, so the manifests (with their sha256) agree too
    assert (out / "manifest.jsonl").read_text() == (built[0] / "manifest.jsonl").read_text()
