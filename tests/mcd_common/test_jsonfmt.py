"""`mcd_common.jsonfmt`: significant-digit rounding of JSON floats, ints and bools untouched, per-key digits."""

import json
import math

import pytest

from mcd_common.jsonfmt import round_floats, round_sig


def test_round_sig_keeps_significant_digits_not_decimal_places():
    assert round_sig(3.3333334922790527, 4) == 3.333
    assert round_sig(8.940696716308594e-08, 4) == 8.941e-08  # round(x, 4) would print 0.0
    assert round_sig(1234567.8, 4) == 1235000.0
    assert round_sig(-0.000123456, 3) == -0.000123
    assert round_sig(0.0, 4) == 0.0
    assert math.isnan(round_sig(float("nan"), 4)) and round_sig(float("inf"), 4) == float("inf")
    with pytest.raises(ValueError):
        round_sig(1.0, 0)


def test_round_floats_walks_nested_values_and_keeps_other_types():
    run = {
        "steps": 3,
        "resumed": False,
        "student": "test_tiny",
        "teacher": None,
        "metrics": {"val/zeroshot_top1": 3.3333334922790527, "val/i2t_R@1": 6.25},
        "betas": (0.9, 0.95),
        "history": [[0.123456789, 2], {"lr": 0.000987654321}],
    }
    out = round_floats(run)
    assert out == {
        "steps": 3,
        "resumed": False,
        "student": "test_tiny",
        "teacher": None,
        "metrics": {"val/zeroshot_top1": 3.333, "val/i2t_R@1": 6.25},
        "betas": [0.9, 0.95],
        "history": [[0.1235, 2], {"lr": 0.0009877}],
    }
    assert type(out["steps"]) is int and type(out["resumed"]) is bool and type(out["history"][0][1]) is int
    assert json.loads(json.dumps(out)) == out
    assert run["metrics"]["val/zeroshot_top1"] == 3.3333334922790527  # the input is not modified


def test_parity_cosines_keep_more_digits_by_default_and_overrides_apply():
    report = {"artifacts": [{"cosine": 0.9999998807907104, "max_abs_diff": 2.086162567138672e-07}], "x": 0.99999988}
    out = round_floats(report)
    assert out["artifacts"][0]["cosine"] == 0.99999988  # 4 digits would print a failing-looking 1.0
    assert out["artifacts"][0]["max_abs_diff"] == 2.086e-07 and out["x"] == 1.0
    assert round_floats(report, key_digits={})["artifacts"][0]["cosine"] == 1.0
    assert round_floats({"seconds": [12.3456, 0.98765]}, digits=2, key_digits={"sec*": 3}) == {"seconds": [12.3, 0.988]}
