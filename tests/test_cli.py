"""The `distill` CLI: every subcommand's --help works without the heavy export extras, and `zoo` counts match
the published parameter figures."""

import subprocess
import sys

import pytest

from distill.cli import SUBCOMMANDS, main

_PROBE = (
    "import sys\n"
    "from distill.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "heavy = [m for m in ('coremltools', 'executorch', 'webdataset') if m in sys.modules]\n"
    "print('HEAVY', heavy)\n"
)


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in SUBCOMMANDS]])
def test_help_works_without_importing_export_extras(args):
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    assert "usage:" in res.stdout, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout, res.stdout[-500:]


def test_subcommands_listed_in_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_zoo_parameter_counts_match_published_figures():
    from distill.zoo import student_rows

    rows = {r["name"]: r for r in student_rows()}
    # ANCHORS §1.1 / §3.5: measured image params with projection, text tower params.
    assert rows["mobileclip_s0"]["image_params_m"] == pytest.approx(11.41, abs=0.01)
    assert rows["mobileclip_s0"]["text_params_m"] == pytest.approx(42.44, abs=0.01)
    assert rows["mobileclip2_s0"]["text_params_m"] == pytest.approx(63.43, abs=0.01)
    assert rows["mobileclip_s2"]["image_params_m"] == pytest.approx(35.82, abs=0.01)
    assert rows["mobileclip_b"]["image_params_m"] == pytest.approx(86.35, abs=0.01)
    assert rows["mobileclip2_s4"]["text_params_m"] == pytest.approx(123.65, abs=0.01)
    assert rows["tinyclip_vit_8m_16_text_3m"]["image_params_m"] == pytest.approx(8.28, abs=0.01)
    assert rows["tinyclip_vit_8m_16_text_3m"]["text_params_m"] == pytest.approx(15.17, abs=0.01)


def test_zoo_cli_prints_every_registry(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name in (
        "mobileclip_s0",
        "tinyclip_vit_39m_16_text_19m",
        "vit_l14.openai",
        "ensemble_l14x2",
        "coca_vit_l14.mscoco",
        "blip_base",
    ):
        assert name in out


def test_unknown_names_list_close_matches(capsys):
    with pytest.raises(SystemExit) as err:  # jsonargparse rejects the Literal value with a usage error
        main(["zoo", "--kind", "studnts"])
    assert err.value.code == 2
    assert "studnts" in capsys.readouterr().err
    from students import create_student
    from teachers import create_teacher

    with pytest.raises(KeyError, match="mobileclip_s0"):
        create_student("mobileclip_s00")
    with pytest.raises(KeyError, match="vit_l14.openai"):
        create_teacher("vit_l14.opnai")


def _zoo_raising(monkeypatch, exc):
    import distill.zoo

    def zoo(kind: str = "all") -> dict:
        """Stand-in job that fails the way a real one can."""
        raise exc

    monkeypatch.setattr(distill.zoo, "zoo", zoo)


def test_a_usage_error_prints_one_line_and_exits_2(monkeypatch, capsys):
    from mcd_common import UsageError

    _zoo_raising(monkeypatch, UsageError("--kind: pick one of students, teachers"))
    assert main(["zoo"]) == 2
    err = capsys.readouterr().err
    assert err == "distill zoo: error: --kind: pick one of students, teachers\n"


@pytest.mark.parametrize("exc", [KeyError("image_emb"), ValueError("shapes differ"), FileNotFoundError("x.tar")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, exc):
    # An internal KeyError/ValueError/FileNotFoundError deep in a job is not a usage error: it propagates
    # (the console script then exits 1 with the traceback) instead of becoming a one-line exit 2.
    _zoo_raising(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["zoo"])


def test_a_real_validation_error_exits_2(capsys):
    assert main(["train", "--student", "test_tiny", "--trainer.max_steps", "0"]) == 2
    assert "--trainer.max_steps must be >= 1" in capsys.readouterr().err


def test_zoo_lists_the_recipes_train_accepts_by_name(tmp_path, monkeypatch, capsys):
    from distill.recipes import recipe_rows

    monkeypatch.chdir(tmp_path)  # packaged recipes, not files of the checkout
    assert main(["zoo", "--kind", "recipes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("RECIPES") and "STUDENTS" not in out
    lines = out.splitlines()
    for recipe in recipe_rows():
        (row,) = [line for line in lines if line.startswith(recipe["name"] + " ")]
        assert row.split()[1] == recipe["student"]
    assert "mobileclip_s0_reinforced  mobileclip_s0" in out  # name, then the student it trains
    assert main(["zoo", "--kind", "recipes", "--pattern", "tinyclip*"]) == 0
    out = capsys.readouterr().out
    assert "tinyclip_vit40m_online" in out and "mobileclip_s0_reinforced" not in out
    assert main(["zoo"]) == 0
    assert "\nRECIPES" in capsys.readouterr().out
