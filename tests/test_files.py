"""spinctl.io.files.staged_dir: a directory appears whole or not at all, also when it replaces a full one."""

from __future__ import annotations

import os

import pytest

from spinctl.errors import OutputError
from spinctl.io.files import staged_dir, write_synced


def tree(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_new_and_empty_directories_are_staged_then_renamed(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        write_synced(tmp / "a", b"1")
        assert not out.exists()  # nothing at the final name until the block ends
    assert tree(out) == {"a": b"1"} and os.listdir(tmp_path) == ["out"]
    (tmp_path / "empty").mkdir()
    with staged_dir(tmp_path / "empty") as tmp:
        write_synced(tmp / "b", b"2")
    assert tree(tmp_path / "empty") == {"b": b"2"}


def test_a_full_directory_needs_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_bytes(b"old")
    with pytest.raises(OSError), staged_dir(out) as tmp:
        write_synced(tmp / "new", b"new")
    assert tree(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]
    with staged_dir(out, replace=True) as tmp:
        write_synced(tmp / "new", b"new")
    assert tree(out) == {"new": b"new"}  # no file of the old one survives beside the new ones
    assert os.listdir(tmp_path) == ["out"]  # the old one, renamed aside, is gone too


def test_a_failure_leaves_the_old_directory_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_bytes(b"old")
    with pytest.raises(RuntimeError), staged_dir(out, replace=True) as tmp:
        write_synced(tmp / "new", b"new")
        raise RuntimeError("killed while staging")
    assert tree(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]

    real = os.replace

    def second_rename_fails(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OutputError, match=r"cannot write .*out: No space left"), staged_dir(out, replace=True) as tmp:
        write_synced(tmp / "new", b"new")
    assert tree(out) == {"old": b"old"} and os.listdir(tmp_path) == ["out"]  # put back, nothing left aside


def test_a_longest_legal_name_has_room_for_its_temporary(tmp_path):
    """A 255-character name once failed with "File name too long": its temporary added 13."""
    from spinctl.io.files import atomic_write_bytes, staged_dir

    name = "s" * 243 + ".safetensors"  # 255 characters, the most a name may have
    atomic_write_bytes(tmp_path / name, b"x")
    with staged_dir(tmp_path / ("d" * 255)) as tmp:
        (tmp / "f").write_bytes(b"y")
    assert (tmp_path / name).read_bytes() == b"x" and (tmp_path / ("d" * 255) / "f").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "d" * 255])
