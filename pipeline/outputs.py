"""What an output may be: never one of the command's inputs, never a file inside a featcache output folder.

A fit-head run folder (head.pt + metrics.json) and a finetune folder (model.pt + model.json +
metrics.json) are featcache's own outputs: a later command may read them, but writes into them only
through the command that made them (fit-head --overwrite, finetune into its FT_DIR). Paths are
compared resolved (symlinks and ``..`` followed) and, where both exist, by inode identity, so a
second spelling of the same file or folder is still the same file or folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from featcache.pipeline.errors import FeatcacheError

# file names that mark a featcache output folder, and what made it
RUN_FILES = ("head.pt", "metrics.json")  # fit-head
FT_FILES = ("model.pt", "model.json")  # finetune (plus its metrics.json)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file or folder: equal resolved paths, or one inode."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): the resolved paths decided
        return False


def contains(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies anywhere below it (resolved paths)."""
    f, p = _real(folder), _real(path)
    return p == f or f in p.parents


def output_folder_kind(folder: str | os.PathLike) -> str | None:
    """"fit-head run" or "finetune folder" when ``folder`` is one of featcache's output folders, else None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if all((folder / n).exists() for n in RUN_FILES):
        return "fit-head run"
    if all((folder / n).exists() for n in FT_FILES):
        return "finetune folder"
    return None


def check_output_file(output: str | os.PathLike, inputs: list[tuple[str, str | os.PathLike]], what: str) -> None:
    """One-line error, before any work, when the file ``output`` would overwrite an input of the same
    command or be written into a fit-head run or finetune folder.

    Args:
        output: the file the command will write.
        inputs: (description, path) of everything the command reads (a model, images).
        what: how the user spelt the output (``--csv``, ``export output``), for the message.
    """
    for name, src in inputs:
        if same_path(output, src):
            raise FeatcacheError(f"{what} {output} would overwrite the {name} {src} this command reads; "
                                 "choose another path")
    kind = output_folder_kind(_real(output).parent)
    if kind:
        raise FeatcacheError(f"{what} {output} lies inside the {kind} {_real(output).parent}: featcache never "
                             "writes into another command's output folder; choose another path")


def check_output_folder(output: str | os.PathLike, inputs: list[tuple[str, str | os.PathLike]], what: str) -> None:
    """One-line error when the folder ``output`` is, contains or lies inside an input of the command."""
    for name, src in inputs:
        if contains(output, src) or contains(src, output):
            raise FeatcacheError(f"{what} {output} would overwrite or hold the {name} {src} this command reads; "
                                 "choose a folder outside it")


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
