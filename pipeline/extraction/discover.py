"""Find images in an ImageFolder tree: ``ROOT/<class>/...`` or ``ROOT/{train,val,test}/<class>/...``.

Discovery is deterministic (sorted), ignores hidden files and folders, follows symlinked folders
once (a loop is visited only once) and keeps paths relative to ROOT as POSIX strings, so a cache
built on one machine names the same files on another.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from featcache.pipeline.errors import FeatcacheError

SPLITS = ("train", "val", "test")
UNLABELED = -1


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


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def walk_images(top: Path, exclude: set[str] | None = None) -> list[Path]:
    """All image files under ``top``, sorted, skipping hidden entries and symlink loops.

    Args:
        exclude: real paths of folders never to enter (e.g. the root and the other classes).
    """
    found: list[Path] = []
    seen_dirs: set[str] = set(exclude or ())
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and is_image(f):
                found.append(Path(dirpath) / f)
    return found


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def discover(root: str | os.PathLike) -> Discovery:
    """Scan ``root`` and return its images with labels and splits.

    Args:
        root: an ImageFolder tree, optionally with ``train``/``val``/``test`` subfolders.
    Returns:
        A Discovery; classes are the sorted class folders that hold at least one image.
        Images directly inside ROOT (or a split folder) are kept with label -1 (unlabeled).
    """
    root = Path(root)
    if not root.exists():
        raise FeatcacheError(f"image folder not found: {root}")
    if not root.is_dir():
        raise FeatcacheError(f"not a folder: {root}")
    top_dirs = _subdirs(root)
    split_dirs = [s for s in SPLITS if s in top_dirs]
    groups = [(s, root / s) for s in split_dirs] if split_dirs else [("train", root)]

    raw: list[tuple[str, str | None, str]] = []  # (relpath, class name or None, split)
    for split, base in groups:
        entries = [e for e in sorted(os.scandir(base), key=lambda e: e.name) if not e.name.startswith(".")]
        class_dirs = {e.name: os.path.realpath(e.path) for e in entries if e.is_dir()}
        above = {os.path.realpath(root), os.path.realpath(base)}
        for entry in entries:
            if entry.is_dir():
                # Each class is walked on its own and never enters the root or a sibling class, so a
                # symlink into another class neither steals nor duplicates that class's images.
                others = {real for name, real in class_dirs.items() if name != entry.name}
                for path in walk_images(Path(entry.path), exclude=above | others):
                    raw.append((path.relative_to(root).as_posix(), entry.name, split))
            elif is_image(entry.name):
                raw.append((Path(entry.path).relative_to(root).as_posix(), None, split))
    if not raw:
        raise FeatcacheError(
            f"no images found under {root} (expected {root}/<class>/<image>, "
            f"extensions {', '.join(IMG_EXTENSIONS)})"
        )
    class_names = tuple(sorted({c for _, c, _ in raw if c is not None}))
    index = {c: i for i, c in enumerate(class_names)}
    records = tuple(
        ImageRecord(p, index[c] if c is not None else UNLABELED, s) for p, c, s in sorted(raw)
    )
    return Discovery(root, records, class_names, bool(split_dirs))
