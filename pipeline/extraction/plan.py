"""Decide, per discovered image, whether to reuse a row of the existing cache or run the backbone.

An image is identified by its relative path plus (size, mtime_ns), or plus its sha256 with
``--verify-content`` (then the bytes decide, and a touched-but-identical file is reused).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from featcache.cache.fingerprint import file_sha256
from featcache.pipeline.extraction.discover import Discovery, ImageRecord


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    sha256: str = ""


@dataclass
class Plan:
    records: list[ImageRecord]
    states: list[FileState | None]  # None: could not stat/read the file
    reuse: dict[int, int]  # record index -> row of the old cache
    compute: list[int]  # record indices that need the backbone, sorted
    removed: int  # rows of the old cache whose image is gone
    stat_errors: dict[int, str] = field(default_factory=dict)

    def key(self, i: int) -> str:
        s = self.states[i]
        return "\0".join([self.records[i].path, str(s.size), str(s.mtime_ns), s.sha256])


def file_states(disc: Discovery, verify_content: bool) -> tuple[list[FileState | None], dict[int, str]]:
    states: list[FileState | None] = []
    errors: dict[int, str] = {}
    for i, rec in enumerate(disc.records):
        path = disc.root / rec.path
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.jpg would block a reader forever
                states.append(None)
                errors[i] = "not a regular file"
                continue
            states.append(FileState(st.st_size, st.st_mtime_ns, file_sha256(path) if verify_content else ""))
        except OSError as e:
            states.append(None)
            errors[i] = f"{type(e).__name__}: {e.strerror or e}"
    return states, errors


def make_plan(disc: Discovery, old, verify_content: bool, wants_views=None, old_views_match: bool = True) -> Plan:
    """Args:
        old: a FeatureCache (features not loaded) built with the same fingerprint, or None.
        wants_views: record index -> whether this run stores augmented views for it (None: no views).
        old_views_match: ``old`` holds views made by the same recipe; if not, images that want views
            are recomputed (their features too: one decode serves both), the others are reused.
    """
    states, errors = file_states(disc, verify_content)
    reuse: dict[int, int] = {}
    removed = 0
    if old is not None:
        old_rows = {p: r for r, p in enumerate(old.paths)}
        for i, rec in enumerate(disc.records):
            r = old_rows.get(rec.path)
            s = states[i]
            if r is None or s is None or int(old.file_size[r]) != s.size:
                continue
            if verify_content:  # the bytes decide; a row recorded without a hash is re-extracted
                same = bool(old.file_sha256[r]) and old.file_sha256[r] == s.sha256
            else:
                same = int(old.file_mtime_ns[r]) == s.mtime_ns
            if same and wants_views is not None and wants_views(i) and not old_views_match:
                same = False
            if same:  # only features are reused; labels and splits come from this discovery
                reuse[i] = r
        current = {rec.path for rec in disc.records}
        removed = sum(1 for p in old.paths if p not in current)
    compute = [i for i in range(len(disc.records)) if i not in reuse and states[i] is not None]
    return Plan(list(disc.records), states, reuse, compute, removed, errors)


def batches_of(indices: list[int], size: int, rows=None) -> list[list[int]]:
    """Consecutive batches of ``indices``; each holds at most ``size`` backbone rows, where image i
    costs ``rows(i)`` rows (1 + its augmented views; default 1) and a batch holds at least one image.
    Deterministic, so a resumed run re-derives the same batches."""
    if rows is None:
        return [indices[k: k + size] for k in range(0, len(indices), size)]
    out: list[list[int]] = []
    used = 0
    for i in indices:
        cost = rows(i)
        if not out or used + cost > size:
            out.append([])
            used = 0
        out[-1].append(i)
        used += cost
    return out
