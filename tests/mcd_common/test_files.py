"""Atomic writes, stale-temp cleanup, checksums and the advisory lock of `mcd_common.files`."""

import os
import subprocess
import sys

import pytest

from mcd_common.files import (
    FileLock,
    LockedError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    sha256_path,
    temp_path,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}") and '"x": 2' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_temp_is_in_the_destination_directory_whatever_tmpdir_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", "/nonexistent-elsewhere")
    assert temp_path(tmp_path / "x.ckpt").parent == tmp_path


def test_atomic_directory_replaces_an_existing_one(tmp_path):
    target = tmp_path / "pkg"
    for content in ("one", "two"):
        with atomic_path(target, keep_suffix=True) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"last.ckpt.tmp-{dead_pid}").write_text("partial")
    (tmp_path / f"other.tmp-{os.getppid()}").write_text("live writer")
    (tmp_path / "keep.txt").write_text("data")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f"last.ckpt.tmp-{dead_pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", f"other.tmp-{os.getppid()}"]


def test_sha256_path_covers_names_and_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    first = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    assert sha256_path(tmp_path / "d") != first


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    lock = tmp_path / "x.lock"
    with FileLock(lock):
        with pytest.raises(LockedError, match=str(os.getpid())):
            FileLock(lock).acquire()
    with FileLock(lock):  # released on exit
        pass


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    lock = tmp_path / "x.lock"
    code = f"from mcd_common.files import FileLock; FileLock({str(lock)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    with FileLock(lock):
        pass


def test_package_versions_names_installed_and_missing_distributions():
    import platform

    import torch

    from mcd_common.files import package_versions

    got = package_versions(["torch", "no-such-distribution-xyz"], missing="missing")
    assert list(got) == ["python", "torch", "no-such-distribution-xyz"]
    assert got["python"] == platform.python_version()
    assert got["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert got["no-such-distribution-xyz"] == "missing"
