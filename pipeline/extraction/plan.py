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
from featcache.cache.store import estimated_bytes
from featcache.pipeline.errors import FeatcacheError
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
    root: Path = Path(".")  # the image folder (for messages)

    def key(self, i: int) -> str:
        s = self.states[i]
        return "\0".join([self.records[i].path, str(s.size), str(s.mtime_ns), s.sha256])


def file_states(disc: Discovery, verify_content: bool) -> tuple[list[FileState | None], dict[int, str]]:
    states: list[FileState | None] = []
    errors: dict[int, str] = {}
    root = str(disc.root)
    for i, rec in enumerate(disc.records):
        path = os.path.join(root, rec.path)  # not pathlib: its objects cost more than the stat itself
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
    return Plan(list(disc.records), states, reuse, compute, removed, errors, disc.root)


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


PRUNE_FRACTION = 0.5  # an update removing more than this share of the cache's rows needs --prune


def check_consent(plan: Plan, old, out, *, old_views: int, new_views: int, prune: bool) -> int:
    """Refuse a destructive update unless the user consented (``--prune``); one line saying why.

    Destructive: removing more than PRUNE_FRACTION of the old cache's rows, or all of them (the
    folder shares no file with the cache: a mistyped IMAGE_DIR), or dropping its augmented views
    (a run without ``--augment`` on a cache that has them).

    Args:
        old: the previous FeatureCache at ``out`` (None: nothing to lose).
        old_views / new_views: augmented views per train image in the old cache / in this run.
    Returns:
        The views per image being dropped (0: none), for the summary.
    """
    if old is None or prune:
        return old_views if old is not None and old_views and not new_views else 0
    n_old = old.n_rows
    if n_old and plan.removed == n_old:
        raise FeatcacheError(
            f"{out} holds {n_old} images and none of them is in {plan.root}: updating would remove them all "
            "(a mistyped folder?); pass --prune to replace the cache's contents")
    if plan.removed > PRUNE_FRACTION * n_old:
        raise FeatcacheError(
            f"updating {out} would remove {plan.removed} of its {n_old} images (their files are gone from "
            f"{plan.root}), more than {PRUNE_FRACTION:.0%}; pass --prune to remove them")
    if old_views and not new_views:
        raise FeatcacheError(
            f"{out} holds {old_views} augmented views per train image and this run has no --augment: it would "
            f"drop /views; pass --augment {old_views} (same recipe flags) to keep them, or --prune to drop them")
    return 0


def space_needed(plan: Plan, n_rows: int, feature_dim: int, dtype: str, rows_of=None) -> int:
    """Bytes an extract writes beside the cache at its peak: the journal parts of the images to
    compute (float32, with their views) plus the new cache file (cache/store.estimated_bytes).

    Args:
        rows_of: record index -> backbone rows (1 + its views); None: 1 each.
    """
    rows = rows_of or (lambda i: 1)
    journal_rows = sum(rows(i) for i in plan.compute)
    view_rows = [rows(i) - 1 for i in range(len(plan.records)) if plan.states[i] is not None and rows(i) > 1]
    views = max(view_rows, default=0)
    return journal_rows * feature_dim * 4 + estimated_bytes(n_rows, feature_dim, dtype, views, len(view_rows))
