"""One writer per output: an exclusive, non-blocking lock per cache file or run folder, so two
extracts never write one cache and two fit-heads never write one run folder.

The lock is an flock on a hidden file ``.NAME.lock`` beside the *real* target
(``os.path.realpath``): a symlink to a cache and the cache itself are one target, so no spelling
of the path lets a second writer in. The file sits on the target's own filesystem, so writers on
two machines sharing it (NFS) still exclude each other, and it is **removed when the lock is
released**: no ``.lock`` file outlives a command, failed ones included.

Why removing it stays safe against a concurrent run: an flock belongs to the open file (its inode),
not to the name. A writer that opened the file just before the holder removed it could lock an
inode nobody will open again. So after locking, a writer checks that the name still refers to the
inode it locked (``fstat`` against ``stat``) and otherwise starts over with the name as it is now;
and the holder removes the name *before* it lets go of the flock. Whoever holds the flock on the
inode the name currently refers to is therefore the only writer. A process killed by SIGKILL leaves
the file behind, but the kernel drops its flock; the next writer takes that file and removes it.

Forked children (decode workers) inherit the descriptor, and an inherited descriptor keeps the
flock alive after its writer died (an immediate re-run was refused for seconds); every forked
child therefore closes the lock descriptors it inherited (``os.register_at_fork``).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from featcache.cache.atomic import is_disk_full
from featcache.cache.errors import CacheError

_HELD: dict[int, Path] = {}  # descriptor -> lock file, of the locks this process holds
_ATTEMPTS = 20  # a name replaced under us this often means something else is playing with it


def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside its real path."""
    real = Path(os.path.realpath(target))
    return real.with_name(f".{real.name}.lock")


def _close_inherited() -> None:
    """In a forked child: drop the parent's lock descriptors (the parent keeps its locks)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


def _open_locked(lock_path: Path, target: str | os.PathLike, writer: str) -> int:
    """Open ``lock_path`` and take its flock, or raise the one-line CacheError saying why not."""
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CacheError(f"cannot lock {target}: cannot create {lock_path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheError(
                f"another {writer} is writing {target} (lock {lock_path} is held); wait for it to finish"
            ) from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)  # its holder removed the name after we opened it: lock the name as it is now
    raise CacheError(f"cannot lock {target}: {lock_path} keeps being replaced")


@contextmanager
def cache_lock(cache_path: str | Path, writer: str = "featcache extract"):
    """Hold the lock of ``cache_path`` (a cache file or a run folder) for the block.

    Args:
        cache_path: the output as the user spelled it; it is locked through its real path.
        writer: who holds it, for the error message (``featcache fit-head`` for run folders).
    Raises:
        CacheError: another process holds it, or the lock file cannot be created.
    """
    lock_path = lock_path_for(cache_path)
    fd = _open_locked(lock_path, cache_path, writer)
    _HELD[fd] = lock_path
    try:
        try:  # the pid is for people reading the file; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            if not is_disk_full(e):
                raise
        yield
    finally:
        try:
            os.unlink(lock_path)  # before the flock goes: see the module docstring
        except OSError:
            pass  # removed by hand, or its folder turned read-only: the flock still goes below
        _HELD.pop(fd, None)
        os.close(fd)
