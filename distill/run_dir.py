"""A training run's directory: its identity, the checkpoint that resumes it, atomic checkpoints, kept log history.

- **Identity.** What makes two runs the same run (student config, mode, loss preset, data path and fingerprint,
  image size, teacher, inheritance, seed) is recorded in every checkpoint (`hyper_parameters["identity"]`). A
  checkpoint resumes a run only when its identity matches; otherwise `find_resume_point` refuses with the differing
  keys (old -> new). Without `--trainer.default_root_dir` the directory is named from the student, the mode and a
  hash of the identity, so the same command resumes its own run and a changed one starts a directory of its own.
- **Which checkpoint.** `checkpoints/last.ckpt`, the periodic `checkpoints/step*.ckpt` and Lightning's SLURM
  requeue checkpoints (`hpc_ckpt_N.ckpt`) are candidates; the readable one with the most steps wins. A damaged
  file is skipped with a warning, and temp files of killed writes are removed first.
- **Atomic, never unpickling.** `AtomicCheckpointIO` writes through `mcd_common.files.atomic_path` (temp file in
  the destination directory, fsync, rename, whatever `TMPDIR` is) and reads through `mcd_common.weights`
  (`torch.load(weights_only=True)` passed explicitly, so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot turn it off).
- **Schedule.** Resuming with another `--trainer.max_steps` (or `--optim.lr/warmup_steps/min_lr_ratio`) is allowed,
  the run is the same run, but the cosine schedule is recomputed for the new values from the resumed step on:
  `check_schedule_change` warns with the learning rate before and after.
- **History.** `HistoryCSVLogger` keeps the metrics rows logged before the resumed step (Lightning's `CSVLogger`
  deletes `metrics.csv` on every start) and flushes every logging step, so a kill loses no row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from distill.module import cosine_with_warmup
from mcd_common import UsageError
from mcd_common.files import atomic_path, atomic_write_text, remove_stale_temps
from mcd_common.weights import read_weights

_logger = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "HistoryCSVLogger",
    "ResumePoint",
    "check_schedule_change",
    "default_run_dir",
    "find_resume_point",
    "identity_changes",
    "next_requeue_path",
]

IDENTITY_KEY = "identity"
"""`hyper_parameters` key of a checkpoint holding the run identity."""

_HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's SLURM requeue checkpoints (its naming)
_RESUME_HINT = "pass a new --trainer.default_root_dir, or --trainer.resume never to start over in it"


@dataclass(frozen=True)
class ResumePoint:
    """A readable checkpoint to resume from."""

    path: Path
    global_step: int
    hparams: dict[str, object]


def next_requeue_path(root: Path) -> Path:
    """`<root>/hpc_ckpt_<N+1>.ckpt`: where a SLURM requeue checkpoint goes (the name Lightning resumes too)."""
    numbers = [int(m.group(1)) for p in root.glob("hpc_ckpt_*.ckpt") if (m := _HPC_PATTERN.match(p.name))]
    return root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def identity_hash(identity: dict[str, object]) -> str:
    """Short stable hash of an identity (names the default run directory)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_dir(identity: dict[str, object], student_name: str, mode: str, base: Path = Path("runs")) -> Path:
    """`runs/<student>-<mode>-<identity hash>`: one directory per distinct run, the same one for a rerun."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", student_name).strip("._") or "student"
    return base / f"{safe}-{mode}-{identity_hash(identity)}"


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def identity_changes(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """`key: old -> new` for every key both identities record and that differs (nested keys dotted)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [
        f"{k}: {flat_old[k]!r} -> {flat_new[k]!r}"
        for k in sorted(set(flat_old) & set(flat_new))
        if flat_old[k] != flat_new[k]
    ]


def _legacy_identity(hparams: dict[str, object]) -> dict[str, object]:
    """The identity keys a checkpoint written before identities were recorded still allows checking."""
    data, loss = hparams.get("data"), hparams.get("loss")
    out = {"mode": hparams.get("mode")}
    if isinstance(loss, dict):
        out["loss_preset"] = loss.get("preset")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        out["data_path"] = os.path.abspath(os.path.expanduser(data["path"]))  # as `distill.train` records it
    return {k: v for k, v in out.items() if v is not None}


def _probe(path: Path) -> ResumePoint | str:
    """The checkpoint's step and hyper-parameters, or why it cannot be read (tensors stay memory-mapped)."""
    try:
        # NOTE: weights_only=True passed explicitly (never unpickles, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says);
        # mmap reads only the pickled metadata, not the tensors.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "it holds Python objects other than tensors and plain data (refused)"
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"unreadable ({first[:120]})"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("global_step"), int):
        return "not a Lightning checkpoint"
    hparams = ckpt.get("hyper_parameters")
    return ResumePoint(path, ckpt["global_step"], hparams if isinstance(hparams, dict) else {})


def _candidates(root: Path) -> list[Path]:
    ckpt_dir = root / "checkpoints"
    found = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    found += sorted(p for p in root.glob("hpc_ckpt_*.ckpt") if _HPC_PATTERN.match(p.name))
    return [p for p in found if p.is_file()]


def _check_identity(point: ResumePoint, identity: dict[str, object], flag: str) -> None:
    recorded = point.hparams.get(IDENTITY_KEY)
    old = recorded if isinstance(recorded, dict) else _legacy_identity(point.hparams)
    changes = identity_changes(old, identity)
    if changes:
        raise UsageError(
            f"{flag}: {point.path} belongs to a different run ({'; '.join(changes[:6])}"
            f"{'; ...' if len(changes) > 6 else ''}); {_RESUME_HINT}"
        )


def find_resume_point(resume: str, root: Path, identity: dict[str, object]) -> ResumePoint | None:
    """The checkpoint this run resumes from, after checking it is the same run.

    Args:
        resume: `--trainer.resume`: `auto` (the newest readable checkpoint in `root`, if any), `never`, or a path.
        root: The run directory.
        identity: This run's identity.

    Raises:
        UsageError: the checkpoint belongs to a run with another identity, an explicit path is missing or
            unreadable, or `root` holds checkpoints of which none is readable.
    """
    for directory in (root / "checkpoints", root):
        for removed in remove_stale_temps(directory):
            _logger.warning("removed %s, left by a write that was killed", removed)
    if resume == "never":
        for stale in root.glob("hpc_ckpt_*.ckpt"):
            # Lightning resumes these on its own under SLURM; they belong to the run being replaced.
            _logger.warning("--trainer.resume never: removing %s of the run being replaced", stale)
            stale.unlink()
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not path.is_file():
            raise UsageError(f"--trainer.resume {resume}: no such checkpoint")
        point = _probe(path)
        if isinstance(point, str):
            raise UsageError(f"--trainer.resume {resume}: {point}")
        _check_identity(point, identity, f"--trainer.resume {resume}")
        return point
    readable, broken = [], []
    for path in _candidates(root):
        point = _probe(path)
        (broken if isinstance(point, str) else readable).append((path, point))
    for path, why in broken:
        _logger.warning("ignoring checkpoint %s: %s", path, why)
    if not readable:
        if broken:
            raise UsageError(
                f"--trainer.resume auto: no readable checkpoint in {root} ({broken[0][0].name}: {broken[0][1]}); "
                f"delete the damaged files, or {_RESUME_HINT}"
            )
        return None
    # The most steps wins; at equal steps last.ckpt (written last) before the periodic copy.
    _, point = max(readable, key=lambda pp: (pp[1].global_step, pp[0].name == "last.ckpt"))
    if broken and any(p.name == "last.ckpt" for p, _ in broken):
        _logger.warning("last.ckpt is damaged: resuming from %s (step %d)", point.path, point.global_step)
    _check_identity(point, identity, "--trainer.resume auto")
    return point


_SCHEDULE_KEYS = ("lr", "warmup_steps", "min_lr_ratio")  # the OptimArgs fields the LR schedule is made of


def _lr_at(step: int, max_steps: int, optim: dict[str, object]) -> float:
    # As DistillModule.configure_optimizers: warm-up clipped to max_steps // 5, LambdaLR at `step`.
    warmup = min(int(optim["warmup_steps"]), max_steps // 5)
    return float(optim["lr"]) * cosine_with_warmup(step, warmup, max_steps, float(optim["min_lr_ratio"]))


def check_schedule_change(point: ResumePoint, *, max_steps: int, optim: dict[str, object]) -> str | None:
    """Warn when a resumed run's LR schedule differs from the checkpoint's (`--trainer.max_steps`, `--optim.*`).

    The schedule is a function of the step recomputed from the current flags, so a changed horizon bends it from
    the resumed step on (the learning rate jumps there, and decays to the new `max_steps`).

    Args:
        point: The checkpoint being resumed (its `hyper_parameters` hold `max_steps` and `optim`).
        max_steps: This run's `--trainer.max_steps`.
        optim: This run's `--optim.*` values (`dataclasses.asdict(OptimArgs)`).

    Returns:
        The warning logged, or None when the schedule is unchanged (or the checkpoint does not record it).
    """
    old_max = point.hparams.get("max_steps")
    old_optim = point.hparams.get("optim")
    if not isinstance(old_max, int) or not isinstance(old_optim, dict):
        return None
    changes = [f"--trainer.max_steps {old_max} -> {max_steps}"] if old_max != max_steps else []
    changes += [
        f"--optim.{k} {old_optim[k]} -> {optim[k]}"
        for k in _SCHEDULE_KEYS
        if k in old_optim and old_optim[k] != optim[k]
    ]
    if not changes:
        return None
    step = point.global_step
    if step >= max_steps:
        effect = f"the checkpoint is already at step {step}: nothing is left to train"
    else:
        old_lr = _lr_at(step, old_max, {**optim, **old_optim})
        new_lr = _lr_at(step, max_steps, optim)
        effect = (
            f"the learning-rate schedule is recomputed from step {step}: lr {old_lr:.3g} (the checkpoint's schedule) "
            f"-> {new_lr:.3g}, decaying to step {max_steps}"
        )
    message = f"resuming {point.path} with a changed schedule ({'; '.join(changes)}): {effect}"
    _logger.warning("%s", message)
    return message


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes atomically next to the target and reads without unpickling."""

    def save_checkpoint(
        self, checkpoint: dict[str, object], path: str | os.PathLike, storage_options: object = None
    ) -> None:
        """`torch.save` to a temp file in `path`'s directory, fsync, rename (a kill never leaves a truncated file)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: object = None, weights_only: bool | None = None
    ) -> dict[str, object]:
        """Read with `torch.load(weights_only=True)` whatever the caller asks (our checkpoints are plain data)."""
        ckpt = read_weights(path, what="checkpoint")
        if not isinstance(ckpt, dict):
            raise UsageError(f"checkpoint {path}: not a Lightning checkpoint")
        return ckpt


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows logged before `start_step` instead of deleting the file."""

    def __init__(self, log_dir: str, start_step: int) -> None:
        self._start_step = start_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        # Rows at or after the resumed step were logged after the checkpoint: the resumed run logs them again.
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < self._start_step]
        if not kept:
            path.unlink()
            return
        self.metrics_keys = sorted(keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buf.getvalue())


class HistoryCSVLogger(pl.loggers.CSVLogger):
    """`CSVLogger` whose `metrics.csv` survives a resume (rows before `start_step` kept) and is flushed every log."""

    def __init__(self, save_dir: str | os.PathLike, start_step: int, name: str = "logs") -> None:
        """Args:
        save_dir: The run directory.
        start_step: The step training starts from (the resumed checkpoint's global step, 0 for a new run).
        name: Sub-directory of the log files.
        """
        super().__init__(save_dir, name=name, version="", flush_logs_every_n_steps=1)
        self._start_step = start_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._start_step)
        return self._experiment
