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
  ``check_output_name(target, what="output")``  before any work, create and remove a file named as
      featcache's longest temporary name for ``target``, so a name too long for its filesystem, a
      read-only or missing folder is one line at once, not a failure after the whole computation.
  ``check_replaceable(target, what)``  refuse to replace an existing read-only file (mode 0444).
  ``real_path(target)``  the path writes go through: a symlinked output is written where it points.
  ``write_buffered(target, save)``  serialise into memory first (``save(fileobj)``, e.g. torch.save,
      torch.export.save, torch.jit.save), then write the bytes atomically: a full disk is one line,
      never a C++ ``terminate`` inside a library's file writer (exit 134, a temporary left behind).
  ``is_disk_full(exc)``, ``disk_full_error(target, needed_bytes)``  recognise and describe ENOSPC
      (HDF5 reports it as a RuntimeError whose text says ``errno = 28``; PyTorch's zip writer as
      ``[enforce fail at inline_container.cc:N] . unexpected pos A vs B``).

``expected_bytes`` only feeds the "(needed about N MB)" figure of the disk-full message; when it
is not given, the size the temporary file had reached when the disk filled is reported instead.
"""
from __future__ import annotations

import errno
import io
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator

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


# PyTorch's zip writer (caffe2::serialize::PyTorchStreamWriter) checks each write's position and
# reports a short write (what ENOSPC causes) only as this, without the errno.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "failed writing")


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when HDF5 or PyTorch wraps it in a RuntimeError that only
    says it in text (HDF5: ``errno = 28``; torch.save: ``enforce fail at inline_container.cc``)."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if "errno = 28" in text or "errno 28" in text or "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    return "inline_container.cc" in text and any(w in text for w in _TORCH_SHORT_WRITE)


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


def real_path(target: str | os.PathLike) -> Path:
    """Where a write to ``target`` lands: a symlink (or a symlinked folder) is followed, so the
    file is replaced where it lives and the link stays a link."""
    return Path(os.path.realpath(target))


def _short(name: str, keep: int = 40) -> str:
    return repr(name if len(name) <= keep else name[:keep] + "...")


def check_output_name(target: str | os.PathLike, what: str = "output") -> None:
    """One line, before any work, when a file cannot be created beside ``target`` under the longest
    name featcache will use there (the temporary ``.NAME.tmp-PID``, longer than NAME itself).

    A probe file of that name is created and removed at once: the filesystem itself answers, so a
    name too long (ENAMETOOLONG), a read-only folder or mount (EACCES, EPERM, EROFS), a missing
    folder or a file where the folder should be are found in milliseconds instead of after hours.

    Args:
        target: the output file or folder, as it will be written (see ``real_path``).
        what: how the message names it ("output", "run folder", "--csv").
    Raises:
        FeatcacheError: one line saying what is wrong and what to do.
    """
    target = Path(target)
    probe = temp_path(target)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return  # this very name exists already: it can be created there
    except OSError as e:
        raise _name_error(e, target, probe, what) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _name_error(e: OSError, target: Path, probe: Path, what: str) -> FeatcacheError:
    """The one-line error for a probe file that could not be created (check_output_name)."""
    parent = probe.parent
    if e.errno == errno.ENAMETOOLONG:
        try:
            limit = os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        extra = len(os.fsencode(probe.name)) - len(os.fsencode(target.name))
        return FeatcacheError(
            f"{what} name {_short(target.name)} is too long: {len(os.fsencode(target.name))} bytes, and featcache "
            f"also writes {_short(probe.name)} beside it ({extra} bytes more) where the filesystem allows "
            f"{limit} per name; use a name of at most {limit - extra} bytes")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FeatcacheError(f"{what} folder is not writable: {parent} ({e.strerror})")
    if e.errno == errno.ENOENT:
        return FeatcacheError(f"{what} folder does not exist: {parent}")
    if e.errno == errno.ENOTDIR:
        return FeatcacheError(f"{what} {target}: a part of {parent} is a file, not a folder")
    if e.errno in _FULL_ERRNOS:
        return disk_full_error(target, None)
    return FeatcacheError(f"cannot write {what} {target}: {e.strerror or e}")


def check_replaceable(target: str | os.PathLike, what: str = "output") -> None:
    """Refuse to replace an existing read-only file: a rename needs only the folder's permission,
    so without this a file the user made read-only (chmod 0444) would be replaced silently.

    Raises:
        FeatcacheError: ``target`` exists, is a file and has no write permission (for its owner, or
            for this process).
    """
    try:
        st = os.stat(target)
    except OSError:
        return  # nothing there (or unreadable: the write itself will say)
    if stat.S_ISREG(st.st_mode) and (not st.st_mode & 0o222 or not os.access(target, os.W_OK)):
        raise FeatcacheError(
            f"{what} {target} is read-only (mode {stat.S_IMODE(st.st_mode):04o}); featcache does not replace it: "
            "make it writable (chmod u+w) or choose another path")


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


def write_buffered(target: str | os.PathLike, save: Callable[[BinaryIO], None]) -> int:
    """Serialise with ``save(buffer)`` into memory, then write the bytes to ``target`` atomically.

    PyTorch's writers (torch.save, torch.jit.save, torch.export.save) report a full disk only as
    ``enforce fail at inline_container.cc`` and, in the writer's destructor, by a C++ ``terminate``
    that aborts the process (exit 134) and leaves the temporary file. In memory they cannot fail
    that way; the bytes then go to disk through ``write_bytes``, after a free-space check, so a full
    disk is one ``no space left`` line and nothing is left behind.

    Args:
        target: the final file; save: writes the whole file to the binary file object it is given.
    Returns:
        The number of bytes written.
    """
    buf = io.BytesIO()
    save(buf)
    data = buf.getbuffer()
    ensure_free_space(target, len(data))
    write_bytes(target, data)
    return len(data)


def write_json(target: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """JSON (``allow_nan=False`` is not forced: callers decide how non-finite numbers appear)."""
    write_text(target, json.dumps(obj, indent=indent))
