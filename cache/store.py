"""The HDF5 cache file: schema, an atomic writer and a validating reader.

Schema version 1 (one row per usable image, rows aligned across datasets):
  /features       (N, D) float32|float16, chunked by rows
  /labels         (N,)   int64, -1 = unlabeled
  /paths          (N,)   UTF-8, relative to the image folder
  /split          (N,)   UTF-8: train | val | test
  /file_size      (N,)   int64 bytes   \
  /file_mtime_ns  (N,)   int64         } what incremental extraction compares
  /file_sha256    (N,)   UTF-8 hex, empty unless --verify-content
  /skipped        (M,)   compound {path, reason}: files that could not be used
  /views          (N, V, D) same dtype as /features, only with ``extract --augment V``: V augmented
                  views of each labeled train-split row, aligned with /features; other rows hold
                  NaN, and chunks without any train row are never written (no disk space)
  attrs: format, schema_version, complete, fingerprint, class_names, backbone, weights, layer,
         pool, preprocess, image_policy, dtype, feature_dim, n_images, torch_version,
         torchvision_version, created, config (JSON of ExtractConfig), n_views, augment (the
         recipe, JSON, or absent), augment_fingerprint (covers /views; "" without views)
/features and /views carry HDF5 fletcher32 checksums per chunk: a corrupt chunk fails to read
(a one-line CacheError naming the cache) instead of feeding wrong numbers to a head.
A file is written under a temporary name and renamed into place only when complete, so the final
path always holds either the previous complete cache or the new complete one. A full disk is one
CacheError ("no space left on ..."), checked up front from the expected size and again on every
write; the temporary file is removed.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.atomic import disk_full_error, ensure_free_space, fsync_dir, is_disk_full
from featcache.cache.errors import CacheError

FORMAT = "featcache"
SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
SKIPPED_DTYPE = np.dtype([("path", STR), ("reason", STR)])
ROW_COLUMNS = ("labels", "paths", "split", "file_size", "file_mtime_ns", "file_sha256")
CHUNK_BYTES = 1 << 20  # ~1 MiB row-aligned chunks: whole rows per read, fits h5py's default chunk cache
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ROW_OVERHEAD = 256  # bytes per row beyond features: labels, sizes, mtimes, path and split strings (estimate)


def rows_per_chunk(feature_dim: int, itemsize: int, n_rows: int) -> int:
    return max(1, min(max(n_rows, 1), CHUNK_BYTES // max(1, feature_dim * itemsize)))


def estimated_bytes(n_rows: int, feature_dim: int, dtype: str, views: int = 0, view_rows: int = 0) -> int:
    """About how large a cache of this shape is on disk (features, views of ``view_rows`` rows, columns)."""
    itemsize = np.dtype(dtype).itemsize
    return n_rows * (feature_dim * itemsize + ROW_OVERHEAD) + view_rows * views * feature_dim * itemsize + (1 << 16)


class CacheWriter:
    """Write a complete cache to ``tmp_path`` and atomically rename it to ``final_path``.

    HDF5 after a failed write is fragile: with dirty chunks in its chunk cache, a full disk surfaces
    only at flush/close, and closing (or garbage-collecting) the file then crashes the interpreter
    (SIGSEGV, exit 139; h5py 3 / HDF5 1.14). So the chunk cache is off (every write here covers whole
    chunks, cache/featwrite.py, so it saves nothing): ENOSPC is raised by the write that hit it, and
    ``abort`` truncates the temporary file before closing it, so HDF5's last metadata flush has room.
    """

    def __init__(self, final_path: str | Path, n_rows: int, feature_dim: int, dtype: str, views: int = 0,
                 view_rows: int | None = None):
        self.final_path = Path(final_path)
        self.tmp_path = self.final_path.with_name(f"{self.final_path.name}.tmp-{os.getpid()}")
        self.expected_bytes = estimated_bytes(n_rows, feature_dim, dtype, views,
                                              n_rows if view_rows is None else view_rows)
        ensure_free_space(self.tmp_path, self.expected_bytes)
        self.f = h5py.File(self.tmp_path, "w", rdcc_nbytes=0)
        with self._writing():
            itemsize = np.dtype(dtype).itemsize
            self.f.create_dataset(
                "features", shape=(n_rows, feature_dim), dtype=dtype, fletcher32=bool(n_rows),
                chunks=(rows_per_chunk(feature_dim, itemsize, n_rows), feature_dim) if n_rows else None,
            )
            if views:
                self.f.create_dataset(
                    "views", shape=(n_rows, views, feature_dim), dtype=dtype, fillvalue=np.nan, fletcher32=bool(n_rows),
                    chunks=(rows_per_chunk(views * feature_dim, itemsize, n_rows), views, feature_dim) if n_rows else None,
                )
            for name, dt in (("labels", np.int64), ("paths", STR), ("split", STR), ("file_size", np.int64),
                             ("file_mtime_ns", np.int64), ("file_sha256", STR)):
                self.f.create_dataset(name, shape=(n_rows,), dtype=dt)
            self.f.attrs["format"] = FORMAT
            self.f.attrs["schema_version"] = SCHEMA_VERSION
            self.f.attrs["complete"] = False

    @contextmanager
    def _writing(self):
        """A full disk during any write becomes one CacheError (HDF5 may say it as RuntimeError)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.final_path, self.expected_bytes) from None
            raise

    def write_features(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Write features (len(rows), D) at sorted row indices ``rows``."""
        if len(rows) == 0:
            return
        rows = np.asarray(rows)
        with self._writing():
            if np.all(np.diff(rows) == 1):  # contiguous: one slab write
                self.f["features"][rows[0]: rows[-1] + 1] = features
            else:
                self.f["features"][rows] = features

    def write_views(self, r0: int, views: np.ndarray) -> None:
        """Write views (n, V, D) at rows r0..r0+n-1."""
        with self._writing():
            self.f["views"][r0: r0 + len(views)] = views

    def write_columns(self, columns: dict[str, list | np.ndarray]) -> None:
        with self._writing():
            for name in ROW_COLUMNS:
                self.f[name][...] = np.asarray(columns[name], dtype=object if self.f[name].dtype == STR else None)

    def finish(self, attrs: dict, skipped: list[tuple[str, str]]) -> None:
        with self._writing():
            self.f.create_dataset("skipped", data=np.array(skipped, dtype=SKIPPED_DTYPE), dtype=SKIPPED_DTYPE)
            json_keys = [k for k, v in attrs.items() if not isinstance(v, (str, int, float, bool))]
            for key, value in attrs.items():
                # str() turns str subclasses (torch.__version__ is a TorchVersion) into plain strings
                self.f.attrs[key] = json.dumps(value) if key in json_keys else (str(value) if isinstance(value, str) else value)
            self.f.attrs["json_attrs"] = json.dumps(json_keys)
            self.f.attrs["complete"] = True
            self.f.flush()
            self.f.close()
            with open(self.tmp_path, "rb+") as fh:  # data on disk before the rename makes it visible
                os.fsync(fh.fileno())
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)

    def abort(self) -> None:
        try:
            if self.f.id.valid and self.tmp_path.exists():
                os.truncate(self.tmp_path, 0)  # frees the disk, so closing after ENOSPC cannot crash HDF5
            self.f.close()
        except (OSError, RuntimeError):
            pass  # the file is being thrown away; what matters is that it is gone
        finally:
            self.tmp_path.unlink(missing_ok=True)


@dataclass
class FeatureCache:
    """A cache loaded into memory (features optional)."""

    path: Path
    attrs: dict
    labels: np.ndarray
    paths: list[str]
    split: np.ndarray  # (N,) str
    features: np.ndarray | None = None
    file_size: np.ndarray | None = None
    file_mtime_ns: np.ndarray | None = None
    file_sha256: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def n_rows(self) -> int:
        return len(self.paths)

    @property
    def n_views(self) -> int:
        """Augmented views per train row (0: the cache has none)."""
        return int(self.attrs.get("n_views", 0) or 0)


REQUIRED_ATTRS = ("fingerprint", "class_names")  # what every reader of a cache relies on


def _corrupt(path: str | Path, what: str) -> CacheError:
    return CacheError(f"{path} has corrupt metadata ({what}); re-extract it with --overwrite")


def _json(path: str | Path, key: str, value):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        raise _corrupt(path, f"attribute {key!r} is not valid JSON") from None


def _decode_attrs(raw: h5py.AttributeManager, path: str | Path = "cache") -> dict:
    """The cache's attributes as Python values (JSON ones decoded), checked: a malformed attribute
    is one CacheError naming it, not a traceback in whichever reader touches it first."""
    listed = raw.get("json_attrs", "[]")
    json_keys = _json(path, "json_attrs", listed.decode() if isinstance(listed, bytes) else listed)
    if not isinstance(json_keys, list) or not all(isinstance(k, str) for k in json_keys):
        raise _corrupt(path, "attribute 'json_attrs' is not a list of names")
    out = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = _json(path, key, value) if key in json_keys else value
    out.pop("json_attrs", None)
    missing = [k for k in REQUIRED_ATTRS if k not in out]
    if missing:
        raise _corrupt(path, f"attribute {missing[0]!r} is missing")
    names = out["class_names"]
    if isinstance(names, np.ndarray):
        names = out["class_names"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _corrupt(path, "attribute 'class_names' is not a list of names")
    return out


def _strs(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in ds[...]]


def _has_hdf5_signature(path: Path) -> bool:
    """HDF5's superblock signature sits at byte 0, 512, 1024, 2048, ... (a user block may precede it)."""
    try:
        with open(path, "rb") as fh:
            offset = 0
            while True:
                fh.seek(offset)
                head = fh.read(len(HDF5_SIGNATURE))
                if head == HDF5_SIGNATURE:
                    return True
                if len(head) < len(HDF5_SIGNATURE) or offset >= 1 << 20:
                    return False
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False


@contextmanager
def checked_reads(path: str | Path):
    """Reading datasets of a cache: a failed read (a fletcher32 checksum mismatch, a chunk HDF5
    cannot decode) is one CacheError naming the cache, not a traceback or wrong numbers."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, CacheError) or is_disk_full(e):
            raise
        text = str(e)  # HDF5 reports a fletcher32 mismatch as a filter failure during read
        why = ("checksum mismatch" if "Fletcher32" in text or "checksum" in text.lower() or "filter returned failure" in text
               else text.splitlines()[0] if text else type(e).__name__)
        raise CacheError(f"{path} is corrupt: stored data fails to read ({why}); "
                         "re-extract it with --overwrite") from None


def open_checked(path: str | Path) -> h5py.File:
    """Open a cache for reading, with one-line errors for files that are not complete caches."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"cache not found: {path}")
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        if _has_hdf5_signature(path):  # an HDF5 file that HDF5 cannot open: cut short or overwritten
            raise CacheError(f"{path} is truncated or corrupt (an HDF5 file HDF5 cannot open); "
                             "re-extract it with --overwrite") from None
        raise CacheError(f"{path} is not an HDF5 file (not a featcache cache)") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{path} is an HDF5 file but not a featcache cache")
    raw_version = f.attrs.get("schema_version", -1)
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        f.close()
        raise _corrupt(path, f"schema_version is {raw_version!r}, not a number") from None
    if version != SCHEMA_VERSION:
        f.close()
        raise CacheError(f"{path} has cache schema {version}; this featcache reads schema {SCHEMA_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        f.close()
        raise CacheError(f"{path} is an incomplete cache (an extract did not finish writing it); "
                         "re-extract it with --overwrite")
    return f


def read_cache(path: str | Path, features: bool = True) -> FeatureCache:
    """Load a cache. Args: features=False skips the (large) feature matrix."""
    with open_checked(path) as f, checked_reads(path):
        attrs = _decode_attrs(f.attrs, path)
        missing = [k for k in ("features", "skipped", *ROW_COLUMNS) if k not in f]
        if missing:
            raise _corrupt(path, f"dataset /{missing[0]} is missing")
        skipped = [(s["path"].decode() if isinstance(s["path"], bytes) else s["path"],
                    s["reason"].decode() if isinstance(s["reason"], bytes) else s["reason"])
                   for s in f["skipped"][...]]
        labels = f["labels"][...].astype(np.int64)
        if len(labels) and (labels.max() >= len(attrs["class_names"]) or labels.min() < -1):
            raise _corrupt(path, f"labels run to {labels.max()} but there are {len(attrs['class_names'])} class names")
        return FeatureCache(
            path=Path(path),
            attrs=attrs,
            labels=labels,
            paths=_strs(f["paths"]),
            split=np.array(_strs(f["split"]), dtype=object),
            features=f["features"][...] if features else None,
            file_size=f["file_size"][...],
            file_mtime_ns=f["file_mtime_ns"][...],
            file_sha256=_strs(f["file_sha256"]),
            skipped=skipped,
        )


def feature_shape(path: str | Path) -> tuple[int, int]:
    with open_checked(path) as f:
        return tuple(f["features"].shape)


def read_views(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Augmented views (len(rows), V, D) float32 of sorted ``rows`` (train-split rows of a cache
    extracted with --augment). Contiguous runs are read as slices: fancy indexing is slow in h5py."""
    with open_checked(path) as f, checked_reads(path):
        return views_from_open(f, rows, path)


def views_from_open(f: h5py.File, rows: np.ndarray, path: str | Path) -> np.ndarray:
    """``read_views`` from an already open cache (one open for features and views: one snapshot)."""
    rows = np.asarray(rows, dtype=np.int64)
    if "views" not in f:
        raise CacheError(f"{path} has no augmented views; extract with --augment N to store some")
    ds = f["views"]
    out = np.empty((len(rows), *ds.shape[1:]), np.float32)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        if len(run):  # straight into ``out`` (HDF5 converts float16): no temporary copy of the views
            ds.read_direct(out, np.s_[rows[run[0]]: rows[run[-1]] + 1], np.s_[run[0]: run[-1] + 1])
    return out


def read_feature_rows(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Features at sorted ``rows`` as float32 (used to reuse rows of an earlier cache)."""
    with open_checked(path) as f, checked_reads(path):
        if not len(rows):
            return np.zeros((0, f["features"].shape[1]), np.float32)
        return f["features"][np.asarray(rows)].astype(np.float32)
