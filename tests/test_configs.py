"""Every shipped YAML config parses with the real `distill` parser (litgpt test_config_hub style)."""

from pathlib import Path

import pytest
import yaml

from distill.cli import main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "distill" / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_round_trips_through_the_parser(path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--config", str(path), "--print_config"])
    assert err.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load(path.read_text())
    from students import get_student_cfg

    get_student_cfg(printed["student"])  # the student named by the recipe exists
    if printed.get("teacher"):
        from teachers import get_teacher_cfg

        get_teacher_cfg(printed["teacher"])
