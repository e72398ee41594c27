"""DataLoader workers that die with their parent (build-data and training).

torch's worker watchdog only looks at the parent while a worker waits for work: a worker blocked writing a batch
into a full pipe whose reader was SIGKILLed waits forever (seen: one build-data worker of 555 MB left running after
`kill -9`). On Linux, `prctl(PR_SET_PDEATHSIG, SIGKILL)` makes the kernel kill the worker when its parent dies;
elsewhere a daemon thread polls the parent pid. Either way a worker whose parent is already gone exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch

__all__ = ["exit_with_parent", "init_worker"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0


def _watch(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(_POLL_S)


def exit_with_parent(parent_pid: int) -> None:
    """Make the calling process exit when `parent_pid` (its parent) dies.

    Args:
        parent_pid: The pid of the process that started this one (read there, before starting it).
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    # NOTE: the parent may have died before prctl took effect; the kernel would never signal then.
    if os.getppid() != parent_pid:
        os._exit(1)


def init_worker(parent_pid: int, worker_id: int) -> None:
    """`worker_init_fn` (bind `parent_pid` with functools.partial): one torch thread, exit with the parent.

    Args:
        parent_pid: `os.getpid()` of the process that creates the DataLoader.
        worker_id: Given by the DataLoader.
    """
    # Workers decode and resample with PIL; one torch thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)
    exit_with_parent(parent_pid)
