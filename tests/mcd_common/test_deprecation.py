"""`mcd_common.deprecation.renamed_kwargs`: old keywords still reach the function, with a FutureWarning; the
signature that jsonargparse and `inspect` see is the new one."""

import inspect
import warnings
from dataclasses import dataclass

import pytest

from mcd_common.deprecation import renamed_kwargs


@dataclass
class _Group:
    path: str | None = None
    split_file: str | None = None


_DEFAULT = _Group()


@renamed_kwargs({"input": "data.path", "split": "data.split_file", "sets": "val"})
def _job(out: str = "o", data: _Group = _DEFAULT, val: int = 0) -> tuple[str, _Group, int]:
    """A subcommand-like function."""
    return out, data, val


def test_old_keywords_reach_the_new_parameters_with_a_warning():
    assert list(inspect.signature(_job).parameters) == ["out", "data", "val"]
    with pytest.warns(FutureWarning) as record:
        out, data, val = _job(input="a.tar", split="s.txt", sets=3)
    assert [str(w.message).split(";")[1] for w in record] == [
        " use data=...(... path=...)",
        " use data=...(... split_file=...)",
        " use val=...",
    ]
    assert str(record[0].message).startswith("_job(input=...) is deprecated and will be removed in the next release")
    assert (out, data, val) == ("o", _Group(path="a.tar", split_file="s.txt"), 3)
    assert _DEFAULT == _Group()  # the shared default instance is copied, never mutated
    with pytest.warns(FutureWarning):
        assert _job(data=_Group(split_file="t.txt"), input="b.tar")[1] == _Group("b.tar", "t.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names alone: no warning
        assert _job(data=_Group(path="c"))[1] == _Group(path="c")


def test_giving_an_old_and_a_new_keyword_for_one_value_is_an_error():
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="got both input= .* and data=path"):
        _job(data=_Group(path="x"), input="y")
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="got both sets= .* and val="):
        _job(val=1, sets=2)


def test_a_rename_to_no_parameter_fails_at_decoration():
    with pytest.raises(TypeError, match="names no parameter"):
        renamed_kwargs({"input": "data.nope"})(_job.__wrapped__)
    with pytest.raises(TypeError, match="names no parameter"):
        renamed_kwargs({"input": "missing"})(_job.__wrapped__)
