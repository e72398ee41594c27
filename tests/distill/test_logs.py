"""`distill.logs`: our INFO lines by default, libraries at WARNING minus known noise, `-v` shows their INFO, `-q`
only errors (and our warnings); `-v/-q` are taken out of the command line wherever they stand."""

import io
import logging
import warnings

import open_clip
import pytest
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from distill.logs import KNOWN_NOISE, configure_logging, reset_logging, split_verbosity


@pytest.fixture
def console():
    """Configure logging into a StringIO; returns a function (verbosity -> stream), undone after the test."""
    streams = []

    def make(verbosity: int) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(verbosity, stream=stream)
        streams.append(stream)
        return stream

    yield make
    reset_logging()


def _emit_everything() -> None:
    logging.getLogger("distill.train").debug("own debug")
    logging.getLogger("distill.train").info("own info")
    logging.getLogger("export.coreml").warning("own warning")
    rank_zero_info("lightning info line")  # Lightning's real logger (it sets itself to INFO on import)
    logging.getLogger("somelib").warning("library warning")
    logging.getLogger("somelib").error("library error")
    # open_clip logs "Parsing model identifier" etc. on the root logger itself
    open_clip.create_model(
        "test-tiny-clip" if "test-tiny-clip" in open_clip.list_models() else "ViT-B-32", device="meta"
    )


def test_default_shows_own_info_and_library_warnings_only(console):
    out = console(0)
    _emit_everything()
    text = out.getvalue()
    assert "INFO distill.train: own info" in text and "WARNING export.coreml: own warning" in text
    assert "library warning" in text and "library error" in text
    assert "own debug" not in text and "lightning info line" not in text and "Parsing model identifier" not in text


def test_verbose_shows_third_party_info_and_our_debug(console):
    out = console(1)
    _emit_everything()
    text = out.getvalue()
    assert "INFO root: Parsing model identifier" in text  # open_clip's INFO record
    assert "lightning info line" in text and "DEBUG distill.train: own debug" in text


def test_quiet_keeps_errors_and_our_warnings(console):
    out = console(-1)
    _emit_everything()
    text = out.getvalue()
    assert "own warning" in text and "library error" in text
    assert "own info" not in text and "library warning" not in text and "Parsing model" not in text
    out = console(-2)
    _emit_everything()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "ERROR somelib: library error" in lines[0]


def test_known_noise_is_dropped_and_a_real_warning_kept(console):
    out = console(0)
    coreml = logging.getLogger("coremltools")
    coreml.warning("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'")
    coreml.warning("Torch version 2.14.1+cu130 has not been tested with coremltools. You may run into errors.")
    coreml.warning("Output var reduce_argmax_0 of type i32 in function main is cast to type fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("this API changes in the next release", FutureWarning, stacklevel=1)
    text = out.getvalue()
    assert "_MLModelProxy" not in text and "has not been tested" not in text and "LeafSpec" not in text
    assert "reduce_argmax_0" in text and "this API changes in the next release" in text
    # -v drops nothing: the same noise is shown
    out = console(1)
    coreml.warning("Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'")
    assert "_MLModelProxy" in out.getvalue()


def test_every_noise_filter_says_why():
    assert KNOWN_NOISE and all(len(n.why) > 30 and n.logger and n.pattern for n in KNOWN_NOISE)


def test_reset_restores_levels_and_reconfiguring_does_not_duplicate_lines(console):
    root = logging.getLogger()
    before = root.level, len(root.handlers)
    out = console(0)
    out2 = console(0)
    logging.getLogger("distill").info("once")
    assert out.getvalue() == "" and out2.getvalue().count("once") == 1
    reset_logging()
    assert (root.level, len(root.handlers)) == before


def test_split_verbosity_anywhere_and_stops_at_double_dash():
    assert split_verbosity(["train", "-v", "--student", "x"]) == (1, ["train", "--student", "x"])
    assert split_verbosity(["-q", "export", "--out", "o"]) == (-1, ["export", "--out", "o"])
    assert split_verbosity(["zoo", "-v", "-v"]) == (2, ["zoo"])
    assert split_verbosity(["zoo", "-vv", "-v"]) == (2, ["zoo"])
    assert split_verbosity(["zoo", "--verbose", "--quiet"]) == (0, ["zoo"])
    assert split_verbosity(["zoo", "-qq"]) == (-2, ["zoo"])
    assert split_verbosity(["train", "--", "-v"]) == (0, ["train", "--", "-v"])
    assert split_verbosity(["train", "--data.path", "-value"]) == (0, ["train", "--data.path", "-value"])


def test_lightning_imported_before_the_cli_is_brought_under_our_levels():
    # What pytorch_lightning/__init__.py does when no root handler exists at its import (a script importing
    # Lightning before calling distill.cli.main): a private StreamHandler and no propagation.
    lightning = logging.getLogger("pytorch_lightning")
    private_stream = io.StringIO()
    private = logging.StreamHandler(private_stream)
    saved = lightning.propagate
    lightning.addHandler(private)
    lightning.propagate = False
    try:
        out = io.StringIO()
        configure_logging(0, stream=out)
        rank_zero_info("lightning tip")
        logging.getLogger("pytorch_lightning.trainer").warning("lightning warning")
        assert private_stream.getvalue() == "" and "lightning tip" not in out.getvalue()
        assert "lightning warning" in out.getvalue()
        reset_logging()
        assert private in lightning.handlers and lightning.propagate is False
    finally:
        lightning.removeHandler(private)
        lightning.propagate = saved


def test_log_records_during_a_converter_capture_go_out_once_and_whole(capsys):
    # export captures what converters write to sys.stderr; our handler follows sys.stderr, so without the capture's
    # `log_stream` our own records were captured too and re-logged as converter output (a second prefix, the lines
    # of a multi-line warning apart, a record glued to a progress bar and dropped with it as DEBUG).
    import sys

    from export._quiet import captured_stderr

    configure_logging(0)
    try:
        with captured_stderr("coremltools"):
            sys.stderr.write("\rRunning MIL default pipeline:  59%|#####8    | 56/95 [00:00<00:00, 135.30 passes/s]")
            logging.getLogger("somelib").warning("overflow encountered in cast\n  return x.astype(y)")
            sys.stderr.write("converter says hi\n")
        err = capsys.readouterr().err
    finally:
        reset_logging()
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if "overflow encountered in cast" in line)
    assert lines[first].endswith("WARNING somelib: overflow encountered in cast") and "_quiet" not in lines[first]
    assert lines[first + 1] == "  return x.astype(y)" and err.count("overflow encountered") == 1
    assert any(line.endswith("WARNING export._quiet: coremltools: converter says hi") for line in lines)
    assert "passes/s" not in err  # the bar itself is DEBUG
