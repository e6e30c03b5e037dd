"""A small real filesystem for disk-full tests: a tmpfs mounted on a folder of the test's tmp_path.

Mounting needs root (or CAP_SYS_ADMIN); where it is refused the test is skipped with the reason,
never faked: ENOSPC must come from a real kernel, through h5py, numpy and the CLI.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_fs(tmp_path):
    """Factory: ``small_fs(size_kib)`` -> a mounted, empty folder of that capacity (unmounted after)."""
    mounted: list[Path] = []

    def make(size_kib: int) -> Path:
        mnt = tmp_path / f"smallfs{len(mounted)}"
        mnt.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a {size_kib} KiB tmpfs here to fill a real disk: "
                        f"{(p.stderr or p.stdout).strip() or 'mount failed'} (needs root)")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> None:
    """Write a filler file so only about ``leave_bytes`` stay free on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free > leave_bytes:
        with open(folder / "filler", "wb") as fh:
            fh.write(b"\0" * (free - leave_bytes))
