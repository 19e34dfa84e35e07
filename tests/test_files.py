"""Atomic writes: whole or nothing, and the permissions a plain open()/mkdir() would give."""

import os
import stat

import pytest

from qatune.files import atomic_dir, atomic_file, atomic_write_bytes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_dirs_get_umask_permissions_not_owner_only(tmp_path, umask_022):
    path = atomic_write_bytes(tmp_path / "a.bin", b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_gives_its_files_the_usual_permissions(tmp_path, umask_022):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        os.chmod(tmp / "model.safetensors", 0o600)  # what safetensors' writer leaves
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644
