"""An exclusive, non-blocking lock per output path, so two extracts never write one cache and two
fit-heads never write one run folder."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from featcache.cache.atomic import is_disk_full
from featcache.cache.errors import CacheError


@contextmanager
def cache_lock(cache_path: str | Path, writer: str = "featcache extract"):
    """Hold ``PATH.lock`` (flock) for the block. The kernel drops it if the process dies.

    Args:
        writer: who holds it, for the error message (``featcache fit-head`` for run folders).
    """
    lock_path = Path(f"{cache_path}.lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"another {writer} is writing {cache_path} (lock {lock_path} is held); wait for it to finish"
            ) from None
        try:  # the pid is for people reading the file; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            if not is_disk_full(e):
                raise
        yield
    finally:
        os.close(fd)
