"""Input sources behind one seam: ``open_source(SOURCE)`` picks a reader by what SOURCE is (as timm's
``create_reader`` does) and every reader returns the same :class:`~discover.Discovery` that planning,
extraction, the no-op check, predict and finetune consume.

Readers, tried in registration order (the first whose ``matches`` says yes reads):
  * ``manifest``: a ``.csv`` or ``.tsv`` file (:func:`read_manifest`);
  * ``folder``: anything else, an ImageFolder tree (discover.discover, which also words the errors
    for a missing path or a plain file).

A new input kind is one reader: ``register_reader("name", matches, read)`` where ``read(path)``
returns a Discovery.

Manifest format and the choices it makes:
  * UTF-8 text (a leading BOM, as Excel writes, is accepted); ``,`` separates fields in ``.csv``,
    a tab in ``.tsv`` (RFC 4180 quoting in both). The first line is a header; column names are
    matched without case or surrounding spaces. ``path`` is required; ``label`` and ``split``
    are optional; other columns are ignored.
  * ``path``: relative to the manifest's folder (stored in the cache as written, spaces kept,
    normalised: ``a/./b.png`` is ``a/b.png``). ``..`` and absolute paths are allowed (a manifest often sits
    beside, not above, its images) and stored as such, so a cache naming them names the same files
    on another machine only if they exist there at the same place.
  * ``label``: the class name; empty (or no ``label`` column) = unlabeled (-1). Class names are the
    sorted unique non-empty labels, as ImageFolder sorts its class folders.
  * ``split``: ``train``, ``val`` or ``test`` (case-insensitive); empty or no ``split`` column =
    ``train``. ``Discovery.has_splits`` is whether the column exists.
  * A malformed row (empty path, unknown split) or a repeated path (the first row wins) is skipped
    and recorded in ``Discovery.skipped`` under ``MANIFEST:LINE`` with its reason; a listed file
    that is missing or unreadable is skipped by extraction like any unreadable image.
  * Content and the no-op check: a manifest is re-read on every run (a text parse, no torch); the
    rows, labels, splits and class names it gives are compared with the cache's exactly as a
    folder's are, so a changed label re-labels the row without re-extracting its image (features
    are keyed by path + file size + mtime), and reordered rows or edited ignored columns
    re-extract no image. Its sha256 is recorded in ``Discovery.source`` (the cache's ``source`` attribute) and
    must match for the quick no-op answer, so any edit of the file (even an ignored column) takes
    the full path once, which re-extracts nothing unless an image changed and records the new hash.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.discover import SPLITS, UNLABELED, Discovery, ImageRecord, discover, quoted

MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t"}  # suffix -> field delimiter
# a parsed manifest: (path -> (label or None, split), skipped (MANIFEST:LINE, reason), has a split column)
Parsed = tuple[dict[str, tuple[str | None, str]], list[tuple[str, str]], bool]


@dataclass(frozen=True)
class Reader:
    name: str
    matches: Callable[[Path], bool]  # does this reader handle SOURCE?
    read: Callable[[Path], Discovery]


_READERS: list[Reader] = []  # tried in order; a SOURCE no reader matches is a folder tree (discover)
_FOLDER = Reader("folder", lambda path: True, discover)


def register_reader(name: str, matches: Callable[[Path], bool], read: Callable[[Path], Discovery]) -> None:
    """Add an input kind; readers registered earlier are tried first, the folder reader last.

    Args:
        name: what ``source_kind`` reports; matches: SOURCE -> whether ``read`` handles it;
        read: SOURCE -> Discovery (raising FeatcacheError with one line for bad input).
    """
    _READERS.append(Reader(name, matches, read))


def _reader(spec: str | os.PathLike) -> Reader:
    path = Path(spec)
    return next((r for r in _READERS if r.matches(path)), _FOLDER)


def source_kind(spec: str | os.PathLike) -> str:
    """The name of the reader ``open_source(spec)`` would use ("manifest", "folder", ...)."""
    return _reader(spec).name


def open_source(spec: str | os.PathLike) -> Discovery:
    """Read SOURCE with the reader its kind calls for.

    Args:
        spec: a folder tree, or a ``.csv``/``.tsv`` manifest (see the module docstring).
    Returns:
        The Discovery of its images (records sorted by path), classes, splits and skipped entries.
    """
    return _reader(spec).read(Path(spec))


def is_manifest(path: Path) -> bool:
    """A ``.csv``/``.tsv`` file name that is not a folder (a folder named x.csv is still a tree)."""
    return path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir()


def _text(path: Path) -> tuple[str, str]:
    """(the manifest's text, sha256 of its bytes); one-line errors for unreadable or non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FeatcacheError(f"manifest not found: {quoted(path)}") from None
    except OSError as e:
        raise FeatcacheError(f"manifest {quoted(path)} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FeatcacheError(f"manifest {quoted(path)} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}); save it as UTF-8") from None
    return text, hashlib.sha256(data).hexdigest()


def _columns(path: Path, header: list[str] | None) -> dict[str, int]:
    """Column name (lower case) -> index; the header must name a ``path`` column, once."""
    if not header or not any(h.strip() for h in header):
        raise FeatcacheError(f"manifest {quoted(path)} is empty: its first line must be a header naming the "
                             "columns path,label[,split]")
    names = [h.strip().lower() for h in header]
    if "path" not in names:
        raise FeatcacheError(f"manifest {quoted(path)} has no 'path' column in its header line "
                             f"({', '.join(map(repr, header[:5]))}); the first line must name the columns "
                             "path,label[,split]")
    for col in ("path", "label", "split"):
        if names.count(col) > 1:
            raise FeatcacheError(f"manifest {quoted(path)} names the column {col!r} twice in its header line")
    return {n: i for i, n in enumerate(names) if n in ("path", "label", "split")}


def _norm(raw: str) -> str:
    """A manifest path as stored: POSIX-normalised (``a/./b`` -> ``a/b``), ``..`` and absolute kept."""
    return posixpath.normpath(raw.replace(os.sep, "/")) if raw else ""


def _rows(path: Path, text: str) -> Parsed:
    """Parse the manifest: (path -> (label or None, split), the first row winning; skipped rows as
    (MANIFEST:LINE, reason); whether it has a split column)."""
    # StringIO with newline="": quoted fields may hold newlines (RFC 4180); line_num counts them
    # strict: an unterminated quote is an error, not one field swallowing the rest of the file
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=MANIFEST_SUFFIXES[path.suffix.lower()], strict=True)
    try:
        col = _columns(path, next(rows, None))
        return _parse(rows, col, path.name)
    except csv.Error as e:  # bad quoting, a field over csv's size limit
        raise FeatcacheError(f"manifest {quoted(path)} is not valid {path.suffix[1:].upper()} at line "
                             f"{rows.line_num}: {e}") from None


def _parse(rows, col: dict[str, int], where: str) -> Parsed:
    """_rows after the header: ``rows`` a csv.reader, ``col`` the column indices, ``where`` the manifest's name."""
    raw: dict[str, tuple[str | None, str]] = {}  # path -> (label or None, split), first row wins
    first_line: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for row in rows:
        line = rows.line_num  # the row's last physical line (its first, but for quoted newlines)
        if not any(f.strip() for f in row):
            continue  # a blank line
        field = {name: row[i].strip() if i < len(row) else "" for name, i in col.items()}
        rel = _norm(row[col["path"]] if col["path"] < len(row) else "")
        split = field.get("split", "").lower() or "train"
        if not field["path"]:
            skipped.append((f"{where}:{line}", "row has no path"))
        elif split not in SPLITS:
            skipped.append((f"{where}:{line}", f"unknown split {field['split']!r} (expected train, val or test)"))
        elif rel in raw:
            skipped.append((f"{where}:{line}", f"path {rel!r} repeats line {first_line[rel]} (the first row wins)"))
        else:
            raw[rel], first_line[rel] = (field.get("label") or None, split), line
    return raw, skipped, "split" in col


def read_manifest(path: Path) -> Discovery:
    """Read a ``.csv``/``.tsv`` manifest (format and choices: the module docstring).

    Args:
        path: the manifest file; its rows' paths are relative to its folder.
    Returns:
        A Discovery rooted at the manifest's folder, with ``source`` = {kind, file, sha256}.
    """
    text, sha = _text(path)
    raw, skipped, has_splits = _rows(path, text)
    if not raw:
        why = f"; skipped {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise FeatcacheError(f"manifest {quoted(path)} lists no images{why}")
    class_names = tuple(sorted({c for c, _ in raw.values() if c is not None}))
    index = {c: i for i, c in enumerate(class_names)}
    records = tuple(ImageRecord(p, index[c] if c is not None else UNLABELED, s)
                    for p, (c, s) in sorted(raw.items()))
    source = {"kind": "manifest", "file": path.name, "sha256": sha}
    return Discovery(path.parent, records, class_names, has_splits, tuple(sorted(skipped)), source)


register_reader("manifest", is_manifest, read_manifest)
