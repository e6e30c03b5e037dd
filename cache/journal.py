"""Crash-safe progress for one extraction: one small file per finished batch.

Layout beside the cache: ``CACHE.h5.parts/manifest.json`` (the fingerprint the parts belong to) and
``part-<batch index>.npz`` (keys, features, augmented views, skipped reasons). Each part is written under a
temporary name and renamed (cache/atomic.py), so after a SIGKILL every part present is whole; a re-run with the same
fingerprint and the same batch keys reuses it instead of running the backbone again.

The journal is also where the final cache's new rows come from: extraction keeps no features in memory,
and assembling reads each part back (``load_array``) when its rows are written, so memory does not grow
with the number of images.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache.atomic import atomic_open, write_json

MANIFEST = "manifest.json"


@dataclass
class Part:
    keys: list[str]  # "relpath\0size\0mtime_ns[\0sha256]" of each image in the batch
    features: np.ndarray  # (n_ok, D) float32, rows for keys whose reason is ""
    reasons: list[str]  # "" for a usable image, else why it was skipped
    views: np.ndarray | None = None  # (n_ok with views, V, D) float32 with --augment, in batch order


class Journal:
    def __init__(self, cache_path: str | Path, fingerprint: str):
        self.dir = Path(f"{cache_path}.parts")
        self.fingerprint = fingerprint

    def open(self) -> None:
        """Start or continue a journal; parts made under another fingerprint are discarded."""
        manifest = self.dir / MANIFEST
        if self.dir.exists():
            try:
                same = json.loads(manifest.read_text())["fingerprint"] == self.fingerprint
            except (OSError, ValueError, KeyError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(exist_ok=True)
        if not manifest.exists():
            write_json(manifest, {"fingerprint": self.fingerprint}, indent=None)

    def _path(self, index: int) -> Path:
        return self.dir / f"part-{index:08d}.npz"

    def _read(self, index: int, keys: list[str], names: tuple[str, ...], optional: tuple[str, ...] = ()):
        """(meta, {name: array}) of the committed part for batch ``index`` if it holds exactly ``keys``
        (``names`` must be there, ``optional`` may be), else None. Only the named arrays are read."""
        path = self._path(index)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta["keys"] != keys:
                    return None
                arrays = {n: z[n] for n in (*names, *(o for o in optional if o in z.files))}
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            return None  # torn or foreign: recompute this batch
        return meta, arrays

    def load(self, index: int, keys: list[str]) -> Part | None:
        """The committed part for batch ``index`` if it holds exactly ``keys``, else None."""
        got = self._read(index, keys, ("features",), ("views",))
        if got is None:
            return None
        meta, arrays = got
        return Part(meta["keys"], arrays["features"], meta["reasons"], arrays.get("views"))

    def load_reasons(self, index: int, keys: list[str]) -> list[str] | None:
        """Only the skip reasons of the committed part for batch ``index`` (its arrays are not read)."""
        got = self._read(index, keys, ())
        return None if got is None else list(got[0]["reasons"])

    def load_array(self, index: int, keys: list[str], name: str) -> np.ndarray | None:
        """One array of the committed part for batch ``index``: "features" or "views" (None: unreadable).
        The final cache is assembled from these, one part at a time, instead of from memory."""
        got = self._read(index, keys, (name,))
        return None if got is None else got[1][name]

    def save(self, index: int, part: Part) -> None:
        # Keys and reasons go in as JSON bytes: numpy 'U' arrays drop trailing NULs, which would
        # make a loaded key never equal the computed one.
        meta = np.frombuffer(json.dumps({"keys": part.keys, "reasons": part.reasons}).encode(), dtype=np.uint8)
        arrays = {"meta": meta, "features": part.features.astype(np.float32)}
        if part.views is not None:
            arrays["views"] = part.views.astype(np.float32)
        size = sum(a.nbytes for a in arrays.values())
        with atomic_open(self._path(index), "wb", expected_bytes=size) as fh:  # ENOSPC: one line, no temporary left
            np.savez(fh, **arrays)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
