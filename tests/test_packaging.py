"""The five packages and the leaf `mcd_common` import from this checkout (PyPI has unrelated `export`/`teachers`)."""

import importlib
import importlib.metadata as md
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["distill", "students", "teachers", "reinforced_data", "export", "mcd_common"])
def test_package_comes_from_this_repo(package):
    mod = importlib.import_module(package)
    assert Path(mod.__file__).resolve().is_relative_to(ROOT), mod.__file__
    assert getattr(mod, "__all__", None), f"{package} must declare __all__"


def test_tests_package_is_not_installed():
    # The wheel's packages are exactly the five plus the leaf helpers; `tests` is never one of them.
    # (md.files() is no use here: from a checkout it reads the egg-info's SOURCES.txt, which lists the sdist and tests.)
    from setuptools.config.setupcfg import read_configuration

    opts = read_configuration(str(ROOT / "setup.cfg"))["options"]
    packages = opts["packages"]
    if not isinstance(packages, list):  # `find:` already expanded by newer setuptools
        packages = list(packages)
    top = {p.split(".")[0] for p in packages}
    assert top == {"distill", "students", "teachers", "reinforced_data", "export", "mcd_common"}, top
    spec = importlib.util.find_spec("tests")
    assert spec is None or Path(spec.origin or "").resolve().is_relative_to(ROOT)


def test_console_script_points_at_cli_main():
    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "distill"]
    assert eps and eps[0].value == "distill.cli:main"


def test_pins_match_installed_versions():
    # Every exact pin in setup.cfg is what is installed: the lock file and setup.cfg cannot drift apart.
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options"]["install_requires"].strip().splitlines():
        name, _, version = line.strip().partition("==")
        name = name.split("[")[0]
        assert md.version(name) == version, f"{name}: setup.cfg pins {version}, installed {md.version(name)}"
