"""Keep converter chatter out of a default ``distill export``: progress bars captured, known-harmless warnings dropped.

What is captured here is only what this package's own calls trigger (the converters it runs); the process-wide
logging levels and the known-harmless third-party messages (coremltools' version notices, ...) belong to
``distill.logs``, which the CLI configures once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

_logger = logging.getLogger(__name__)

__all__ = [
    "captured_fd2",
    "captured_stderr",
    "quiet_loggers",
]

# tqdm redraws a bar with "\r"; a finished bar ends in a rate ("1124.80 ops/s", "164.58 passes/s")
_PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\[\d\d:\d\d<")
# the end of a tqdm bar ("[00:00<00:00, 135.30 passes/s]"): output written while a bar is open follows it on its line
_BAR_END = re.compile(r"\[\d+:\d\d<[^\]]*\]")


class _Capture(io.StringIO):
    """The stand-in `sys.stderr` of `captured_stderr`: collects what converters write; `log_stream` tells the CLI's
    log handler (which follows `sys.stderr`) where our own records still go."""

    def __init__(self, log_stream: TextIO) -> None:
        super().__init__()
        self.log_stream = log_stream


@contextlib.contextmanager
def captured_stderr(source: str) -> Iterator[None]:
    """Capture what a converter writes to ``sys.stderr``: progress bars go to DEBUG, anything else to WARNING.

    Logging handlers keep their own stream, so our log lines are not affected; C++ code writing to file
    descriptor 2 directly is out of reach (it is not ``sys.stderr``).

    Args:
        source: Name used in the re-logged lines (``coremltools``, ``torch.onnx``).
    """
    buf = _Capture(sys.stderr)
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for line in re.split(r"[\r\n]+", buf.getvalue()):
            end = _BAR_END.search(line)
            bar, rest = (line[: end.end()], line[end.end() :]) if end else ("", line)
            if bar.strip():
                _logger.debug("%s: %s", source, bar.strip())
            if not rest.strip():
                continue
            if _PROGRESS.search(rest):
                _logger.debug("%s: %s", source, rest.strip())
            else:
                _logger.warning("%s: %s", source, rest.rstrip())


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of third-party loggers to at least ``level`` while a converter runs, then restore it.

    Converters log every graph pass at INFO (coremltools, ``onnx_ir`` initializer de-duplication, onnxscript's
    optimiser); with ``-v`` the CLI sets the root logger to DEBUG and these loggers still follow it afterwards.
    """
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    try:
        if not verbose:
            for lg in loggers:
                lg.setLevel(max(lg.getEffectiveLevel(), level))
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)


@contextlib.contextmanager
def captured_fd2(source: str, harmless: str) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2: lines matching ``harmless`` go to DEBUG, others WARNING.

    Keep the window small (one native call): Python's own stderr output inside it is captured too.

    Args:
        source: Name used in the re-logged lines.
        harmless: Regex of known-harmless lines (documented by the caller).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
    pattern = re.compile(harmless)
    for line in text.splitlines():
        if line.strip():
            _logger.log(logging.DEBUG if pattern.search(line) else logging.WARNING, "%s: %s", source, line.rstrip())
