"""Find images in an ImageFolder tree: ``ROOT/<class>/...`` or ``ROOT/{train,val,test}/<class>/...``.

Discovery is deterministic (sorted), ignores hidden files and folders, follows symlinked folders
once (a loop is visited only once) and keeps paths relative to ROOT as POSIX strings, so a cache
built on one machine names the same files on another.

Names: any name the filesystem allows is handled. A name that is not valid UTF-8 (e.g.
``b'bad\\xff\\xfe.png'``) cannot be stored in the cache's UTF-8 columns or shown in JSON, so its file
is skipped and recorded (``Discovery.skipped``) under its ``display_name`` (invalid bytes as
``\\xff``), never an error for the whole folder. A folder that cannot be read is recorded the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from featcache.pipeline.errors import FeatcacheError

SPLITS = ("train", "val", "test")
UNLABELED = -1
# torchvision.datasets.folder.IMG_EXTENSIONS, written out so that discovery (and the no-op check,
# quickcheck.py) need no torchvision import, which costs seconds; tests/extraction/test_discover.py checks
# that the two tuples are equal.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# torchvision's ImageFolder set plus GIF (first frame) and AVIF, which Pillow decodes: extract,
# ``predict DIR`` and ``predict FILE`` all accept exactly these.
IMAGE_EXTENSIONS = IMG_EXTENSIONS + (".gif", ".avif")
BAD_NAME = "file name is not valid UTF-8 (rename it to cache it)"


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the image root, POSIX separators
    label: int  # index into class_names, or UNLABELED
    split: str  # train | val | test


@dataclass(frozen=True)
class Discovery:
    root: Path
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    has_splits: bool
    skipped: tuple[tuple[str, str], ...] = ()  # (display path relative to root, reason): bad names, unreadable folders
    # where the records came from, beyond ``root``: {} for a folder tree; a manifest's
    # {"kind": "manifest", "file": name, "sha256": of its bytes} (sources.py), recorded in the cache
    source: dict = field(default_factory=dict)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def display_name(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by Python) become
    ``\\xNN``; every other character, tabs and newlines included, is kept (callers escape for TSV)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def valid_name(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _unreadable(e: OSError) -> str:
    return f"folder cannot be read: {type(e).__name__}: {e.strerror or e}"


def walk_images(top: Path, exclude: set[str] | None = None,
                errors: list[tuple[str, str]] | None = None) -> list[Path]:
    """All image files under ``top``, sorted, skipping hidden entries and symlink loops.

    Args:
        exclude: real paths of folders never to enter (e.g. the root and the other classes).
        errors: receives (folder, reason) for every folder that could not be listed (os.walk
            would otherwise skip it without a word).
    """
    return [Path(p) for p in _walk(str(top), exclude, errors)]


def _walk(top: str, exclude: set[str] | None, errors: list[tuple[str, str]] | None) -> list[str]:
    """walk_images as path strings (``top`` + separator + relative part): discovery of 100,000
    files spent two thirds of its time building and relativising pathlib objects."""
    found: list[str] = []
    seen_dirs: set[str] = set(exclude or ())

    def onerror(e: OSError) -> None:
        if errors is not None:
            errors.append((e.filename, _unreadable(e)))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and is_image(f):
                found.append(os.path.join(dirpath, f))
    return found


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise FeatcacheError(f"image folder {quoted(path)} cannot be read ({e.strerror or e})") from None


def _subdirs(path: Path) -> list[str]:
    return [e.name for e in _scandir(path) if e.is_dir() and not e.name.startswith(".")]


def quoted(path: str | os.PathLike) -> str:
    """A path for a message, quoted so leading/trailing spaces and control characters show."""
    return repr(display_name(path))


def _check_one_folder_per_class(root: Path, base: Path, class_dirs: dict[str, str], above: set[str],
                                owner: dict[str, str]) -> None:
    """One line of error when a class folder is the image folder itself, or is the same real folder
    as another class folder (``ln -s digit_1 digit_9``): its images would need two labels, or two
    splits, and walking each class without entering its siblings would silently drop both.

    Args:
        class_dirs: class name -> real path, for the class folders of ``base``.
        above: real paths of the root and of ``base``.
        owner: real path -> relative spelling of the class folders seen so far (updated).
    """
    for name, real in class_dirs.items():
        rel = Path(os.path.relpath(base / name, root)).as_posix()
        if real in above:
            raise FeatcacheError(f"class folder {quoted(rel)} under {quoted(root)} is a link to "
                                 f"{quoted(real)}, the image folder itself; remove the link")
        if real in owner:
            raise FeatcacheError(
                f"class folders {quoted(owner[real])} and {quoted(rel)} under {quoted(root)} are one folder "
                f"({quoted(real)}), so its images would have two labels; remove the link or copy the folder")
        owner[real] = rel


def discover(root: str | os.PathLike) -> Discovery:
    """Scan ``root`` and return its images with labels and splits.

    Args:
        root: an ImageFolder tree, optionally with ``train``/``val``/``test`` subfolders.
    Returns:
        A Discovery; classes are the sorted class folders that hold at least one usable image.
        Images directly inside ROOT (or a split folder) are kept with label -1 (unlabeled).
        Files whose name is not UTF-8 and folders that cannot be read are in ``skipped``.
    """
    root = Path(root)
    if not root.exists():
        raise FeatcacheError(f"image folder not found: {quoted(root)}")
    if not root.is_dir():
        raise FeatcacheError(f"image folder {quoted(root)} is not a folder")
    top_dirs = _subdirs(root)
    split_dirs = [s for s in SPLITS if s in top_dirs]
    groups = [(s, root / s) for s in split_dirs] if split_dirs else [("train", root)]

    raw: list[tuple[str, str | None, str]] = []  # (relpath, class name or None, split)
    unreadable: list[tuple[str, str]] = []  # (folder, reason)
    owner: dict[str, str] = {}  # real path of each class folder -> its first spelling, relative to root
    for split, base in groups:
        entries = [e for e in _scandir(base) if not e.name.startswith(".")]
        class_dirs = {e.name: os.path.realpath(e.path) for e in entries if e.is_dir()}
        above = {os.path.realpath(root), os.path.realpath(base)}
        _check_one_folder_per_class(root, base, class_dirs, above, owner)
        for entry in entries:
            if entry.is_dir():
                # Each class is walked on its own and never enters the root or a sibling class, so a
                # symlink into another class neither steals nor duplicates that class's images.
                others = {real for name, real in class_dirs.items() if name != entry.name}
                # walked paths start with entry.path; its part relative to root is computed once
                # (not from root's string: Path(".") / "train" is spelt "train", without "./")
                prefix, n = Path(entry.path).relative_to(root).as_posix(), len(entry.path)
                for path in _walk(entry.path, above | others, unreadable):
                    raw.append((prefix + path[n:].replace(os.sep, "/"), entry.name, split))
            elif is_image(entry.name):
                raw.append((Path(entry.path).relative_to(root).as_posix(), None, split))
    skipped = [(display_name(os.path.relpath(d, root)) + "/", r) for d, r in unreadable]
    skipped += [(display_name(p), BAD_NAME) for p, _, _ in raw if not valid_name(p)]
    raw = [r for r in raw if valid_name(r[0])]
    if not raw:
        why = f"; skipped {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise FeatcacheError(
            f"no images found under {quoted(root)} (expected {display_name(root)}/<class>/<image>, "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}){why}"
        )
    class_names = tuple(sorted({c for _, c, _ in raw if c is not None}))
    index = {c: i for i, c in enumerate(class_names)}
    records = tuple(
        ImageRecord(p, index[c] if c is not None else UNLABELED, s) for p, c, s in sorted(raw)
    )
    return Discovery(root, records, class_names, bool(split_dirs), tuple(sorted(skipped)))
