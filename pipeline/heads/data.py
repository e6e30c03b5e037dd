"""Cached features -> training tensors: splits, z-score standardisation, device placement.

Features are read from HDF5 once into one float32 tensor on the training device; every epoch of
every head then indexes that tensor (no DataLoader over files). Memory is designed, not
discovered: the matrix is held once. It is read block by block straight into its final array
(``read_direct``: no temporary of the whole matrix), its statistics are accumulated per block in
float64, it is standardised in place block by block, and a split whose rows are one contiguous
range (every split of a train/val/test folder tree: paths sort by their split folder) is a view
of it, not a gathered copy. Features and augmented views come from one open of the file, checked
against the metadata the caller read, so an extract that replaces the cache meanwhile is caught.

Streamed (``prepare(..., stream=...)``, when the matrix does not fit the memory plan): X stays in
the file as a heads.stream.H5Rows source over every row, standardised chunk by chunk as it is
read; one streaming pass computes the training statistics and finds non-finite rows; a split is
a source over its rows (``Prepared.take``), which the exact probe, the epoch trainer and the
scores read chunk by chunk.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from featcache.cache.store import FeatureCache, checked_reads, open_checked, read_views, views_from_open
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning
from featcache.pipeline.heads.stream import H5Rows, StreamSettings, file_identity, streamed_moments


@dataclass
class Prepared:
    X: torch.Tensor | H5Rows  # (N, D) float32, standardised with train statistics when asked; a source when streamed
    y: torch.Tensor  # (N,) int64, -1 = unlabeled
    rows: dict[str, np.ndarray]  # train | val | test -> row indices into X
    mean: np.ndarray | None  # (D,) float32, None without standardisation
    scale: np.ndarray | None
    class_names: list[str]
    val_source: str  # "cache" (the folder's val/ split) | "held out N% of train" | "none"
    views: torch.Tensor | None = None  # (M, V, D) augmented views, standardised like X; None = not used
    view_pos: np.ndarray | None = None  # (N,) int64: row -> index into views, -1 = row has none
    feature_dtype: str = "float32"  # the cache's dtype (a k-NN head keeps its bank in it)

    @property
    def streamed(self) -> bool:
        """X stays in the cache file and is read chunk by chunk (heads/stream.py)."""
        return isinstance(self.X, H5Rows)

    def split(self, name: str) -> tuple[torch.Tensor | H5Rows, torch.Tensor]:
        """(X, y) of a split (see ``take``)."""
        return self.take(self.rows[name])

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor | H5Rows, torch.Tensor]:
        """(X, y) of sorted ``rows``: views when they are one contiguous range, else gathered
        copies; streamed, a source over those rows (nothing read yet)."""
        rows = np.asarray(rows)
        if self.streamed:
            return self.X.subset(rows), self.y[torch.as_tensor(rows, device=self.y.device)]
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # sorted and contiguous
            return self.X[rows[0]: rows[-1] + 1], self.y[rows[0]: rows[-1] + 1]
        idx = torch.as_tensor(rows, device=self.X.device)
        return self.X[idx], self.y[idx]

    def views_of(self, rows: np.ndarray) -> torch.Tensor | None:
        """(len(rows), V, D) training views of ``rows``: their augmented views where the cache has
        them, else the un-augmented row repeated V times (so every row can be sampled alike).
        None when views are not used."""
        if self.views is None:
            return None
        rows = np.asarray(rows)
        pos = self.view_pos[rows]
        if np.array_equal(pos, np.arange(len(self.views))):
            return self.views  # the usual case (rows = the training rows, all with views): no copy
        out = self.X[torch.as_tensor(rows, device=self.X.device)].unsqueeze(1).repeat(1, self.views.shape[1], 1)
        has = np.flatnonzero(pos >= 0)
        if len(has):
            dev = self.X.device
            out[torch.as_tensor(has, device=dev)] = self.views[torch.as_tensor(pos[has], device=dev)]
        return out


def labeled_split_rows(split: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """train | val | test -> indices of the labeled rows in that split."""
    return {s: np.flatnonzero((split == s) & (labels >= 0)) for s in ("train", "val", "test")}


def hold_out(train: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Split ``train`` (row indices, ``labels`` their labels) into sorted (train, val, description):
    ``round(val_fraction * n)`` validation rows, stratified when every class has 2+ rows and both
    parts can hold every class, seeded. fit-head and finetune share it, so on the same images they
    hold out the same ones. A hold-out that cannot be stratified says so (FeatcacheWarning)."""
    counts = np.bincount(labels)
    n_classes = int((counts > 0).sum())
    n_val = int(round(val_fraction * len(train)))
    if n_val < 1 or n_val >= len(train):
        raise FeatcacheError(f"--val-fraction {val_fraction} leaves no training or no validation rows ({len(train)} labeled)")
    if len(train) - n_val < n_classes:
        raise FeatcacheError(f"--val-fraction {val_fraction} leaves {len(train) - n_val} training rows for "
                             f"{n_classes} classes; use a smaller fraction")
    stratify = labels
    if counts[counts > 0].min() < 2:
        small = [str(c) for c in np.flatnonzero(counts == 1)]
        warnings.warn(f"class index(es) {', '.join(small[:5])} have a single training image: the validation hold-out "
                      "is not stratified (some classes may be missing from it)", FeatcacheWarning, stacklevel=2)
        stratify = None
    elif n_val < n_classes:
        warnings.warn(f"{n_val} validation rows cannot hold all {n_classes} classes: the hold-out is not "
                      "stratified", FeatcacheWarning, stacklevel=2)
        stratify = None
    tr, va = train_test_split(train, test_size=n_val, stratify=stratify, random_state=seed)
    how = "stratified, " if stratify is not None else ""
    return np.sort(tr), np.sort(va), f"held out {val_fraction:.0%} of train ({how}seed {seed})"


def make_splits(cache: FeatureCache, val_fraction: float, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """Use the cache's own val split when it has one, else a stratified, seeded hold-out of train."""
    rows = labeled_split_rows(cache.split, cache.labels)
    if len(rows["val"]):
        return rows, "cache"
    if val_fraction <= 0:
        return rows, "none"
    if len(rows["train"]) == 0:
        raise FeatcacheError(f"fit-head needs labeled training images of at least two classes; {cache.path} has "
                             "none (images must sit in class folders)")
    rows["train"], rows["val"], source = hold_out(rows["train"], cache.labels[rows["train"]], val_fraction, seed)
    return rows, source


READ_BYTES = 64 << 20  # features per block (read, statistics, standardisation): bounds every temporary


def _blocks(n: int, row_bytes: int):
    """Consecutive row ranges of about READ_BYTES each."""
    step = max(1, READ_BYTES // max(row_bytes, 1))
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def _row_runs(rows: np.ndarray):
    """Sorted ``rows`` as (start, stop) runs of consecutive indices, each at most a block long."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        yield int(run[0]), int(run[-1]) + 1


def _nonfinite(X: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of X holding NaN or Inf, checked block by block (no (N, D) boolean temporary)."""
    bad = np.zeros(len(X), bool)
    for b in _blocks(len(X), X.shape[1] * X.itemsize):
        bad[b] = ~np.isfinite(X[b]).all(axis=1)
    return bad


def _finite_rows(cache: FeatureCache, bad_mask: np.ndarray, rows: dict[str, np.ndarray], drop: bool) -> dict[str, np.ndarray]:
    """Refuse (or with ``drop`` leave out) labeled rows whose features hold NaN or Inf (``bad_mask``,
    (N,) bool): one such row would turn every head trained with it into NaN, and in val/test it
    skews the scores."""
    used = np.concatenate(list(rows.values()))
    bad = used[bad_mask[used]]
    if not len(bad):
        return rows
    first = ", ".join(cache.paths[i] for i in np.sort(bad)[:3])
    if not drop:
        raise FeatcacheError(f"{cache.path}: {len(bad)} row(s) have non-finite features (NaN or Inf), first: {first}; "
                             "re-extract those images, or pass --drop-nonfinite to leave them out")
    warnings.warn(f"left out {len(bad)} row(s) with non-finite features (first: {first})", FeatcacheWarning,
                  stacklevel=3)
    return {s: np.setdiff1d(r, bad) for s, r in rows.items()}


def zscore_stats(train: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale), each (D,) float32, of training rows (N, D) (or of ``rows`` of them), summed in
    float64 per block (two passes: no float64 copy of the matrix). Constant features (dead ReLUs)
    get scale 1, so they stay at zero instead of exploding."""
    runs = [(0, len(train))] if rows is None else list(_row_runs(np.asarray(rows)))
    n = sum(b - a for a, b in runs)
    total = np.zeros(train.shape[1], np.float64)
    for a, b in runs:
        for blk in _blocks(b - a, train.shape[1] * 8):
            total += train[a + blk.start: a + blk.stop].sum(0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros(train.shape[1], np.float64)
    for a, b in runs:
        for blk in _blocks(b - a, train.shape[1] * 8):
            sq += np.square(train[a + blk.start: a + blk.stop] - mean).sum(0, dtype=np.float64)
    scale = np.sqrt(sq / max(n, 1)).astype(np.float32)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale


def _standardize_in_place(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
    for b in _blocks(len(X), X.shape[1] * X.itemsize):
        X[b] -= mean
        X[b] /= scale


def _read_features(f, columns: np.ndarray | None, dtype=np.float32) -> np.ndarray:
    """/features (or ``columns`` of it) as one (N, D) array of ``dtype``, read block by block straight
    into it (HDF5 converts float16 to float32 on the way when asked)."""
    ds = f["features"]
    n, d = ds.shape
    if columns is None:
        out = np.empty((n, d), dtype)
        for b in _blocks(n, d * 4):
            ds.read_direct(out, b, b)
        return out
    out = np.empty((n, len(columns)), np.float32)
    for b in _blocks(n, d * 4):  # whole rows per read (HDF5 chunks are rows), then the columns
        out[b] = ds[b][:, columns]
    return out


def _same_cache(f, cache: FeatureCache) -> None:
    """The open file must be the cache whose metadata the caller read (an extract may have replaced it)."""
    labels = f["labels"][...]
    if (f["features"].shape[0] != len(cache.labels) or f.attrs.get("fingerprint") != cache.fingerprint
            or not np.array_equal(labels, cache.labels)):
        raise FeatcacheError(f"{cache.path} changed while fit-head was reading it (another extract updated it); "
                             "run fit-head again once the extract has finished")


def prepare(cache: FeatureCache, val_fraction: float, seed: int, standardize: bool, device: torch.device,
            use_views: bool = False, val_views: bool = False, drop_nonfinite: bool = False,
            columns: np.ndarray | None = None, stream: StreamSettings | None = None) -> Prepared:
    """Args:
        columns: train on these columns of /features only (fit-head --layers); None = all.
        drop_nonfinite: leave out rows whose features are not all finite (default: refuse).
        use_views: also load the cache's augmented views of the training rows that have them.
        val_views: and of the validation rows that have them (a hold-out of the train split):
            only --refit trains on those rows; validation itself never uses views.
        stream: read X from the file chunk by chunk with these settings (no views), or None =
            hold it in memory.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise FeatcacheError("--val-fraction must be in [0, 1)")
    rows, val_source = make_splits(cache, val_fraction, seed)
    train_classes = np.unique(cache.labels[rows["train"]])
    if len(train_classes) < 2:
        raise FeatcacheError(
            f"fit-head needs labeled training images of at least two classes; {cache.path} has "
            f"{len(train_classes)} ({', '.join(cache.class_names) or 'no class folders'})"
        )
    unseen = sorted({cache.class_names[c] for s in ("val", "test") for c in np.unique(cache.labels[rows[s]])}
                    - {cache.class_names[c] for c in train_classes})
    if unseen:
        warnings.warn(f"class(es) {', '.join(unseen[:5])} have validation/test images but no training images: "
                      "no head can predict them", FeatcacheWarning, stacklevel=2)
    if stream is not None:
        return _prepare_streamed(cache, rows, val_source, standardize, device, drop_nonfinite, columns, stream)
    view_rows = None
    if use_views:  # /views holds rows of the cache's train split only (extract --augment)
        wanted = np.concatenate([rows["train"], rows["val"]]) if val_views else rows["train"]
        view_rows = np.intersect1d(np.flatnonzero(cache.split == "train"), wanted)
    X, v = _load(cache, columns, view_rows)
    rows = _finite_rows(cache, _nonfinite(X), rows, drop_nonfinite)
    mean = scale = None
    if standardize:
        mean, scale = zscore_stats(X, rows["train"])
        _standardize_in_place(X, mean, scale)
    views = view_pos = None
    if v is not None:
        if not np.isfinite(v).all():
            n_bad = int((~np.isfinite(v).all(axis=(1, 2))).sum())
            raise FeatcacheError(f"{cache.path}: augmented views of {n_bad} row(s) are not finite (NaN or Inf); "
                                 "re-extract, or train without them (--no-use-augmented)")
        if standardize:
            _standardize_in_place(v.reshape(-1, v.shape[-1]), mean, scale)
        views = torch.from_numpy(v).to(device)
        view_pos = np.full(len(cache.labels), -1, np.int64)
        view_pos[view_rows] = np.arange(len(view_rows))
    return Prepared(torch.from_numpy(X).to(device), torch.from_numpy(cache.labels).to(device),
                    rows, mean, scale, cache.class_names, val_source, views, view_pos, str(_dtype(cache)))


def _prepare_streamed(cache: FeatureCache, rows: dict[str, np.ndarray], val_source: str, standardize: bool,
                      device: torch.device, drop_nonfinite: bool, columns: np.ndarray | None,
                      stream: StreamSettings) -> Prepared:
    """``prepare`` for a cache that stays in its file (or, ``stream.in_memory``, in memory at its
    float16 dtype): one pass over the labeled rows for the training statistics and the non-finite
    check, then X as a source over every row, upcast to float32 chunk by chunk."""
    if cache.features is not None:
        raise FeatcacheError("streaming reads a cache file; these features are already in memory")
    identity = file_identity(cache.path)  # every later pass checks the file is still this one
    array = None
    with open_checked(cache.path) as f, checked_reads(cache.path):
        _same_cache(f, cache)
        if stream.in_memory:  # the matrix at its stored dtype (float16), once; chunks are upcast from it
            array = _read_features(f, None, f["features"].dtype)
    used = np.unique(np.concatenate(list(rows.values())))
    raw = H5Rows(cache.path, used, chunk_rows=stream.chunk_rows, columns=columns, identity=identity, array=array)
    mean, scale, bad_used = streamed_moments(raw, np.searchsorted(used, rows["train"]))
    bad = np.zeros(len(cache.labels), bool)
    bad[used] = bad_used
    rows = _finite_rows(cache, bad, rows, drop_nonfinite)  # the statistics left non-finite rows out already
    if not standardize:
        mean = scale = None
    X = H5Rows(cache.path, np.arange(len(cache.labels)), chunk_rows=stream.chunk_rows, device=device,
               columns=columns, mean=mean, scale=scale, identity=identity, window_rows=stream.window_rows,
               stats=raw.stats, array=array)
    return Prepared(X, torch.from_numpy(cache.labels).to(device), rows, mean, scale, cache.class_names, val_source,
                    feature_dtype=str(_dtype(cache)))


def _dtype(cache: FeatureCache) -> str:
    return str(cache.features.dtype) if cache.features is not None else str(cache.attrs.get("dtype", "float32"))


def _load(cache: FeatureCache, columns: np.ndarray | None, view_rows: np.ndarray | None):
    """(X (N, D') float32 that prepare owns and may standardise in place, views or None).

    A cache loaded without features (read_cache(path, features=False), what fit-head does) is read
    here, features and views from one open of the file; features already in memory (arrays, an
    open Cache) are copied once, since they belong to the caller."""
    if cache.features is None:
        with open_checked(cache.path) as f, checked_reads(cache.path):
            _same_cache(f, cache)
            X = _read_features(f, columns)
            v = views_from_open(f, view_rows, cache.path) if view_rows is not None else None
        if v is not None and columns is not None:
            v = np.ascontiguousarray(v[:, :, columns])
        return X, v
    X = np.array(cache.features if columns is None else cache.features[:, columns], dtype=np.float32)
    v = None
    if view_rows is not None:
        v = read_views(cache.path, view_rows)
        if columns is not None:
            v = np.ascontiguousarray(v[:, :, columns])
    return X, v
