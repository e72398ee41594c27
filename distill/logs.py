"""Console logging of the `distill` CLI: our INFO lines and real warnings, not the libraries' chatter.

Levels by verbosity (`-q`/`-v` on the command line, see `split_verbosity`):

| verbosity        | our loggers (`distill`, `students`, ...) | third-party libraries          |
| ---------------- | ---------------------------------------- | ------------------------------ |
| -2 (`-qq`)       | ERROR                                    | ERROR                          |
| -1 (`-q`)        | WARNING                                  | ERROR                          |
| 0 (default)      | INFO                                     | WARNING, known noise dropped   |
| 1 (`-v`)         | DEBUG                                    | INFO, nothing dropped          |
| 2 (`-vv`)        | DEBUG                                    | DEBUG                          |

Results (tables, summaries) are printed by `distill/cli.py` on stdout and are not log records, so `-q` keeps them.

Why a handler filter and not logger levels: libraries set their own levels on import (Lightning sets
`pytorch_lightning` to INFO when it is imported, which happens after the CLI configured logging), and open_clip logs
through the root logger itself (`logging.info(...)`), so "third party" is decided per record by logger name.
Python warnings are routed into logging (`logging.captureWarnings`) so the same rules apply to them.

Known-harmless messages (`KNOWN_NOISE`) are dropped with a logger-level filter on the exact logger that emits them:
that also works for loggers that do not propagate to the root (torch's own loggers keep a private handler).
Native (C++) output written straight to file descriptor 2 never passes through Python and cannot be filtered here
(executorch's `[cpuinfo_utils.cpp:..]` lines).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = [
    "KNOWN_NOISE",
    "OWN_LOGGERS",
    "KnownNoise",
    "configure_logging",
    "current_verbosity",
    "reset_logging",
    "split_verbosity",
]

OWN_LOGGERS = ("distill", "students", "teachers", "reinforced_data", "export", "mcd_common")
"""Top-level logger names of this toolkit (every module logs to `logging.getLogger(__name__)`)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# verbosity -> (level of our loggers, level of every other logger)
_LEVELS: dict[int, tuple[int, int]] = {
    -2: (logging.ERROR, logging.ERROR),
    -1: (logging.WARNING, logging.ERROR),
    0: (logging.INFO, logging.WARNING),
    1: (logging.DEBUG, logging.INFO),
    2: (logging.DEBUG, logging.DEBUG),
}


@dataclass(frozen=True)
class KnownNoise:
    """A third-party message that is harmless for this toolkit, dropped unless `-v` is given."""

    logger: str
    """Exact name of the logger that emits it (`py.warnings` for Python warnings)."""
    pattern: str
    """Regular expression searched in the formatted message."""
    why: str
    """Why it is harmless here (shown nowhere; it is the reason the filter exists, kept next to it)."""


KNOWN_NOISE: tuple[KnownNoise, ...] = (
    # Found by running `distill zoo`, `distill train` (test_tiny, 2 steps) and `distill export` (test_tiny student)
    # with torch 2.14.1, pytorch-lightning 2.6.6, open_clip 3.3.0, coremltools 9.0, executorch 1.5.1, torchao 0.18.
    KnownNoise(
        "coremltools",
        r"^scikit-learn version \S+ is not supported",
        "coremltools only disables its scikit-learn converters; we convert torch programs only",
    ),
    KnownNoise(
        "coremltools",
        r"^Torch version \S+ has not been tested with coremltools",
        "every exported package is checked against PyTorch (cosine >= --min_cosine) by export itself, which is the "
        "test that matters; a real conversion problem fails that check or raises",
    ),
    KnownNoise(
        "coremltools",
        r"^Failed to load _ML\w+Proxy",
        "libcoremlpython (CoreML prediction) exists only on macOS; elsewhere export writes the package spec-only "
        "and says so in its own report",
    ),
    KnownNoise(
        "coremltools",
        r"^Saving value type of int64 into a builtin type of int32",
        "CoreML has no int64 tensors; the only int64 values in our graphs are token ids and argmax indices "
        "(< 50,000), which int32 holds exactly",
    ),
    KnownNoise(
        "coremltools",
        r"^Core ML embedding \(gather\) layer does not support any inputs besides the weights and indices",
        "the ignored inputs are `F.embedding`'s padding_idx / scale_grad_by_freq, which only shape training "
        "gradients; no tower here sets max_norm (the one option that changes outputs)",
    ),
    KnownNoise(
        "onnxscript.optimizer._constant_folding",
        r"Skipping constant folding for op",
        "onnxscript's optimiser leaves a node (e.g. LayerNormalization with unused extra outputs) unfolded: an "
        "optimisation skipped, the node is computed at run time and the ONNX parity check still runs",
    ),
    KnownNoise(
        "onnxscript.optimizer._constant_folding",
        r"^Evaluation failed: cannot reshape array",
        "onnxscript's optimiser could not pre-compute a node (a Hugging Face text tower's mask reshape) and leaves it "
        "to run time; the exported graph is unchanged and the ONNX Runtime parity check still runs",
    ),
    KnownNoise(
        "torch.utils._pytree",
        r"is an Enum subclass and is now natively supported by torch\.compile",
        "torchao registers its KernelPreference enum with the pre-2.14 pytree API at import; a deprecation notice "
        "addressed to torchao, nothing we call",
    ),
    KnownNoise(
        "py.warnings",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning 2.6.6's _pytree helper builds a LeafSpec, a class torch 2.14 deprecated but still supports; "
        "the flattened batch is the same",
    ),
    KnownNoise(
        "py.warnings",
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the parts of a tower frozen by --lock.* (students.lock) and a live teacher run in eval mode on purpose: "
        "frozen BatchNorm statistics, no dropout; CLIPStudent.train() keeps them so",
    ),
    # Lightning's INFO lines (the "try installing litlogger" tip, "GPU available", "Seed set to", "`Trainer.fit`
    # stopped") and open_clip's per-model INFO lines ("Parsing model identifier", "Loaded built-in ... config") are
    # INFO records of third-party loggers: the default WARNING level for libraries drops them without a filter.
)


class _NoiseFilter(logging.Filter):
    """Drops records whose message matches one of the patterns (attached to the emitting logger)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


class _LevelFilter(logging.Filter):
    """Passes our records at `own_level` and up, everybody else's at `other_level` and up."""

    def __init__(self, own_level: int, other_level: int) -> None:
        super().__init__()
        self.own_level, self.other_level = own_level, other_level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return record.levelno >= (self.own_level if own else self.other_level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (pytest and `contextlib.redirect_stderr` swap it).

    A stand-in stderr that captures a converter's output (`export._quiet.captured_stderr`) names the real stream
    in its `log_stream` attribute: log records go there, formatted once, instead of into the capture (which would
    re-log them as the converter's output, with a second prefix).
    """

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return getattr(sys.stderr, "log_stream", None) or sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        # StreamHandler.__init__ assigns the stream; this handler always follows sys.stderr instead.
        pass


@dataclass
class _Installed:
    """What `configure_logging` changed, so the next call (tests, `main` run twice) or `reset_logging` undoes it."""

    handler: logging.Handler
    noise: dict[str, _NoiseFilter]
    levels: dict[str, int]
    """Logger name ("" for the root) -> its level before the first configure_logging call."""
    verbosity: int
    detached: dict[str, list[logging.Handler]]
    """Library loggers whose private console handlers were taken off (see `_SELF_HANDLING`)."""


_installed: _Installed | None = None


def reset_logging() -> None:
    """Undo `configure_logging`: remove its handler and noise filters, restore the levels it changed."""
    global _installed
    if _installed is None:
        return
    root = logging.getLogger()
    root.removeHandler(_installed.handler)
    _installed.handler.close()
    for name, flt in _installed.noise.items():
        logging.getLogger(name).removeFilter(flt)
    for name, level in _installed.levels.items():
        logging.getLogger(name or None).setLevel(level)
    for name, handlers in _installed.detached.items():
        logger = logging.getLogger(name)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = False
    logging.captureWarnings(False)
    _installed = None


def configure_logging(verbosity: int = 0, stream: TextIO | None = None) -> logging.Handler:
    """Set up console logging for one CLI invocation (idempotent: a second call replaces the first).

    Args:
        verbosity: -2 (`-qq`) .. 2 (`-vv`); values outside are clamped. See the module docstring for the levels.
        stream: Where log lines go (default: `sys.stderr`, looked up at each record).

    Returns:
        The handler installed on the root logger.
    """
    global _installed
    verbosity = max(-2, min(2, verbosity))
    own_level, other_level = _LEVELS[verbosity]
    levels = _installed.levels if _installed is not None else _current_levels()
    reset_logging()
    root = logging.getLogger()
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_LevelFilter(own_level, other_level))
    root.addHandler(handler)
    # NOTE: the root level gates records of every logger without its own level (open_clip logs on the root itself);
    # our own loggers get their level explicitly, so -v creates their DEBUG records without turning on DEBUG
    # records everywhere (PIL and others log per image at DEBUG: costly in data loading).
    root.setLevel(other_level)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level)
    detached = _detach_library_handlers()
    logging.captureWarnings(True)
    noise: dict[str, _NoiseFilter] = {}
    if verbosity <= 0:
        by_logger: dict[str, list[str]] = {}
        for item in KNOWN_NOISE:
            by_logger.setdefault(item.logger, []).append(item.pattern)
        for name, patterns in by_logger.items():
            noise[name] = _NoiseFilter(patterns)
            logging.getLogger(name).addFilter(noise[name])
    _installed = _Installed(handler=handler, noise=noise, levels=levels, verbosity=verbosity, detached=detached)
    return handler


_SELF_HANDLING = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
"""Libraries that, when imported before any root handler exists (a script importing Lightning before calling
`distill.cli.main`), give their logger a private StreamHandler and stop propagation: every INFO line would
bypass our levels and filters."""


def _detach_library_handlers() -> dict[str, list[logging.Handler]]:
    detached = {}
    for name in _SELF_HANDLING:
        logger = logging.Logger.manager.loggerDict.get(name)
        if not isinstance(logger, logging.Logger) or logger.propagate:
            continue
        handlers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        for h in handlers:
            logger.removeHandler(h)
        logger.propagate = True
        detached[name] = handlers
    return detached


def current_verbosity() -> int:
    """The verbosity of the last `configure_logging` call (0 when logging was not configured by the CLI)."""
    return 0 if _installed is None else _installed.verbosity


def _current_levels() -> dict[str, int]:
    return {name: logging.getLogger(name or None).level for name in ("", *OWN_LOGGERS)}


_VERBOSE = {"-v": 1, "--verbose": 1, "-vv": 2}
_QUIET = {"-q": -1, "--quiet": -1, "-qq": -2}


def split_verbosity(argv: Sequence[str]) -> tuple[int, list[str]]:
    """Take `-v/--verbose/-vv` and `-q/--quiet/-qq` out of a `distill` command line, wherever they stand.

    Repeated flags add up (`-v -v` is `-vv`); quiet and verbose flags cancel. Everything from a `--` on is left
    alone. No `distill` option takes `-v` or `-q` as its value, so a standalone token is always a verbosity flag.

    Args:
        argv: Arguments without the program name.

    Returns:
        The verbosity (-2 .. 2, 0 when no flag is given) and the remaining arguments, in order.
    """
    verbosity, rest = 0, []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in _VERBOSE:
            verbosity += _VERBOSE[arg]
        elif arg in _QUIET:
            verbosity += _QUIET[arg]
        else:
            rest.append(arg)
    return max(-2, min(2, verbosity)), rest
