"""cache/atomic.py: every file whole or not at all; a full disk is one CacheError, nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from featcache.cache.atomic import (
    atomic_open, atomic_path, check_writable_parent, ensure_free_space, is_disk_full, temp_path, write_json,
    write_text,
)
from featcache.cache.errors import CacheError, FeatcacheError
from smallfs import fill, small_fs  # noqa: F401  (fixture)


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failure_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "keep.csv"
    target.write_text("path,class_1\na.png,cat\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "w") as fh:
            fh.write("path,class_1\n")  # a header, then the computation fails
            raise RuntimeError("boom")
    assert target.read_text() == "path,class_1\na.png,cat\n"
    assert not temp_path(target).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]


def test_keyboard_interrupt_also_removes_the_temporary(tmp_path):
    target = tmp_path / "m.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_refuses_append_mode(tmp_path):
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_disk_full_is_one_cache_error_and_nothing_is_left(small_fs):
    mnt = small_fs(256)
    target = mnt / "big.bin"
    target.write_bytes(b"previous")
    with pytest.raises(CacheError) as e:
        write_text(target, "x" * (2 << 20))  # 2 MB into a 256 KiB filesystem
    msg = str(e.value)
    assert msg.startswith(f"no space left on {mnt}") and "needed about 2.1 MB" in msg and "\n" not in msg
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in mnt.iterdir()) == ["big.bin"]  # the temporary is gone


def test_disk_full_while_a_library_writes_a_path(small_fs):
    mnt = small_fs(128)
    with pytest.raises(CacheError, match="no space left"):
        with atomic_path(mnt / "model.pt") as tmp:
            with open(tmp, "wb") as fh:
                for _ in range(64):
                    fh.write(os.urandom(4096))
    assert list(mnt.iterdir()) == []


def test_ensure_free_space_refuses_early_with_the_figure(small_fs):
    mnt = small_fs(256)
    fill(mnt, 64 << 10)
    ensure_free_space(mnt / "small", 8 << 10)  # fits: no error
    with pytest.raises(CacheError, match=r"needed about 5\.0 MB, 0\.\d+ MB free"):
        ensure_free_space(mnt / "c.h5", 5_000_000)


def test_is_disk_full_reads_hdf5_style_messages():
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(RuntimeError("Can't close dataset (file write failed: ..., errno = 28, error message = ...)"))
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert not is_disk_full(ValueError("No space left on device"))


def test_check_writable_parent(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FeatcacheError, match="is a file"):
        check_writable_parent(tmp_path / "afile" / "p.csv", "--csv")
    with pytest.raises(FeatcacheError, match="does not exist"):
        check_writable_parent(tmp_path / "nodir" / "p.csv", "--csv")
    with pytest.raises(FeatcacheError, match="is a folder"):
        check_writable_parent(tmp_path, "--csv")
    check_writable_parent(tmp_path / "ok.csv")  # fine


def test_check_writable_parent_read_only(tmp_path, small_fs):
    if os.geteuid() == 0:  # root writes through permission bits, not onto a read-only mount
        mnt = small_fs(64)
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        with pytest.raises(FeatcacheError, match="not writable"):
            check_writable_parent(mnt / "p.csv", "--csv")
    else:  # root may write anywhere: the read-only case is only testable unprivileged
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(FeatcacheError, match="not writable"):
            check_writable_parent(ro / "p.csv")
