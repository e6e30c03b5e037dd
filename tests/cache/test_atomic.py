"""cache/atomic.py: every file whole or not at all; a full disk is one CacheError, nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from smallfs import fill

from featcache.cache.atomic import (
    atomic_open,
    atomic_path,
    check_output_name,
    check_replaceable,
    check_writable_parent,
    ensure_free_space,
    is_disk_full,
    temp_path,
    write_buffered,
    write_json,
    write_text,
)
from featcache.cache.errors import CacheError, FeatcacheError


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


def test_is_disk_full_reads_pytorch_writer_messages():
    """torch.save / jit.save / export.save on a full disk: the zip writer's short-write check."""
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                                     "writing file data/0: file write failed"))
    assert is_disk_full(RuntimeError("c10::Error: write failed (errno 28)"))
    # reading a damaged file goes through the same source file, but is not a full disk
    assert not is_disk_full(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central "
                                         "directory (inline_container.cc)"))


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


def test_check_output_name_probes_the_longest_temporary_name(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    extra = len(temp_path(tmp_path / "x").name) - 1  # ".x.tmp-PID" is this much longer than "x"
    check_output_name(tmp_path / ("a" * (limit - extra)))  # fits exactly: no error
    with pytest.raises(FeatcacheError, match=f"at most {limit - extra} bytes") as e:
        check_output_name(tmp_path / ("a" * (limit - extra + 1)), "run folder")
    assert str(e.value).startswith("run folder name") and "\n" not in str(e.value)
    with pytest.raises(FeatcacheError, match="folder does not exist"):
        check_output_name(tmp_path / "missing" / "c.h5")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FeatcacheError, match="is a file, not a folder"):
        check_output_name(tmp_path / "afile" / "c.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # every probe removed


def test_check_output_name_on_a_read_only_mount(small_fs):
    mnt = small_fs(64)
    if subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    with pytest.raises(FeatcacheError, match="output folder is not writable: .*Read-only file system"):
        check_output_name(mnt / "c.h5")


def test_check_replaceable_refuses_read_only_files_only(tmp_path):
    f = tmp_path / "c.h5"
    check_replaceable(f)  # nothing there
    f.write_text("x")
    check_replaceable(f)
    f.chmod(0o444)
    with pytest.raises(FeatcacheError, match=r"cache .*c\.h5 is read-only \(mode 0444\)"):
        check_replaceable(f, "cache")
    check_replaceable(tmp_path)  # a folder is not this check's business


def test_write_buffered_writes_what_the_callable_wrote(tmp_path):
    n = write_buffered(tmp_path / "b.bin", lambda fh: fh.write(b"abc" * 1000))
    assert n == 3000 and (tmp_path / "b.bin").read_bytes() == b"abc" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]
