"""Files written whole or not at all, and a full disk as one clear error.

Every file featcache writes (cache, journal parts, predict CSV, exported models, head.pt,
metrics.json, leaderboards, plots) goes through here, so a crash, a Ctrl-C or a full disk never
leaves a truncated file at the target path: the previous file stays as it was.

API:
  ``atomic_path(target, expected_bytes=None)``  context manager yielding a temporary ``Path`` beside
      ``target`` (same folder, so the rename is atomic). Write it with anything (torch.save,
      savefig, h5py, ...); on a clean exit it is fsynced and ``os.replace``d onto ``target`` and
      the folder is fsynced; on any exception (ENOSPC included) it is removed and the exception
      re-raised, an ENOSPC/EDQUOT one as ``CacheError("no space left on ...")``.
  ``atomic_open(target, mode="w", expected_bytes=None, **open_kw)``  the same, yielding an open file
      object (text or binary by ``mode``: "w" or "wb"; newline/encoding go in ``open_kw``).
  ``write_text(target, text)``, ``write_bytes(target, data)``, ``write_json(target, obj, indent=2)``.
  ``check_writable_parent(target, what="output")``  one-line ``FeatcacheError`` when the folder a
      file would be written to is missing, is a file, or is read-only: call it before long work.
  ``ensure_free_space(target, needed_bytes)``  refuse early when the filesystem of ``target``
      has less free space than a write is expected to need.
  ``is_disk_full(exc)``, ``disk_full_error(target, needed_bytes)``  recognise and describe ENOSPC
      (HDF5 reports it as a RuntimeError whose text says ``errno = 28``).

``expected_bytes`` only feeds the "(needed about N MB)" figure of the disk-full message; when it
is not given, the size the temporary file had reached when the disk filled is reported instead.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from featcache.cache.errors import CacheError, FeatcacheError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def temp_path(target: str | os.PathLike) -> Path:
    """The temporary name used for ``target``: hidden, beside it, unique per process."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    st = os.statvfs(mount_point(path) if not Path(path).exists() else path)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when HDF5 wraps it in a RuntimeError that only says it in text."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    return isinstance(exc, (OSError, RuntimeError)) and (
        "errno = 28" in text or "No space left on device" in text or "Disk quota exceeded" in text)


def _mb(n: int) -> str:
    """Megabytes with enough digits to be non-zero for small files (0.004 MB, 2.1 MB)."""
    mb = max(n, 0) / 1e6
    return f"{mb:.1f}" if mb >= 0.1 or mb == 0 else f"{mb:.3f}"


def disk_full_error(target: str | os.PathLike, needed_bytes: int | None) -> CacheError:
    """The one-line error for a full disk while writing ``target``."""
    folder = Path(os.path.abspath(target)).parent
    mp = mount_point(folder)
    try:
        free = f", {_mb(free_bytes(folder))} MB free"
    except OSError:
        free = ""
    needed = f"needed about {_mb(needed_bytes)} MB" if needed_bytes else "needed more space"
    return CacheError(f"no space left on {mp} writing {target} ({needed}{free})")


def ensure_free_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """Raise the disk-full error now if the filesystem of ``target`` cannot hold ``needed_bytes``."""
    folder = Path(os.path.abspath(target)).parent
    try:
        free = free_bytes(folder)
    except OSError:
        return  # cannot tell (no statvfs): let the write itself find out
    if needed_bytes > free:
        raise disk_full_error(target, needed_bytes)


def check_writable_parent(target: str | os.PathLike, what: str = "output") -> None:
    """One line, before any work, when ``target``'s folder cannot receive a file."""
    target = Path(target)
    if target.is_dir():
        raise FeatcacheError(f"{what} {target} is a folder; give a file path")
    parent = Path(os.path.abspath(target)).parent
    if parent.exists() and not parent.is_dir():
        raise FeatcacheError(f"{what} {target}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise FeatcacheError(f"{what} folder does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FeatcacheError(f"{what} folder is not writable: {parent}")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Args:
        target: the final file path (its folder must exist).
        expected_bytes: about how large the file will be (only for the disk-full message).
    Raises:
        CacheError: the disk (or quota) filled; the temporary file is gone, ``target`` unchanged.
    """
    target = Path(target)
    tmp = temp_path(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        reached = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(target, expected_bytes or reached or None) from None
        raise
    fsync_dir(target.parent)


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", expected_bytes: int | None = None,
                **open_kw) -> Iterator[IO]:
    """``atomic_path`` yielding an open file object (``mode`` "w" text or "wb" binary)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(target, expected_bytes) as tmp:
        with open(tmp, mode, **open_kw) as fh:
            yield fh
            fh.flush()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_open(target, "wb", expected_bytes=len(data)) as fh:
        fh.write(data)


def write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(target, text.encode(encoding))


def write_json(target: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """JSON (``allow_nan=False`` is not forced: callers decide how non-finite numbers appear)."""
    write_text(target, json.dumps(obj, indent=indent))
