"""The memory plan of fit-head, and the in-memory data path that holds the features once."""
from __future__ import annotations

import json
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from synthcache import write_cache

import featcache
from featcache.cache.store import read_cache
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads import memory
from featcache.pipeline.heads.data import prepare, zscore_stats


@pytest.mark.parametrize(("text", "size"), [("4G", 4 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29),
                                            ("2048", 2048), ("64KiB", 64 << 10), (123, 123)])
def test_parse_size(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["four", "-1G", "0", "4X"])
def test_parse_size_refuses_what_is_not_a_size_naming_the_parameter(text):
    with pytest.raises(FeatcacheError, match=r"^max_memory takes a size"):
        memory.parse_size(text)


def test_plan_adds_its_parts_and_counts_gathers_only_for_interleaved_splits():
    a = memory.plan(n_rows=1000, dim=256, contiguous=True, view_rows=0, n_views=0, solver=10)
    b = memory.plan(n_rows=1000, dim=256, contiguous=False, view_rows=100, n_views=4, solver=10)
    assert a.features == 1000 * 256 * 4 and a.gathers == 0 and a.views == 0
    assert b.gathers == a.features and b.views == 100 * 4 * 256 * 4
    assert b.total == a.total + b.gathers + b.views


def test_a_run_over_the_budget_is_refused_before_any_training(tmp_path, monkeypatch):
    from featcache.pipeline.heads import kinds

    cache = write_cache(tmp_path / "c.h5", {"train": 20, "val": 5, "test": 5}, dim=64)
    monkeypatch.setattr(kinds.get("linear"), "fit", lambda *a: pytest.fail("trained despite the plan"))
    with pytest.raises(FeatcacheError, match=r"fit-head needs about .* MB .*max_memory 0\.0 MB"):
        featcache.fit_heads(cache, max_memory="1K")


def test_the_plan_and_the_peak_are_recorded(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 20, "val": 5, "test": 5}, dim=64)
    featcache.fit_heads(cache, head="logreg", C=1.0, output=tmp_path / "run", max_memory="8G")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["memory"]
    assert m["plan"]["features"] == 90 * 64 * 4 and m["plan"]["budget"] == 8 << 30
    assert m["plan"]["total"] <= m["plan"]["limit"] and m["peak_rss_bytes"] > 0


def test_zscore_stats_match_numpy_on_rows_and_runs():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (500, 7)).astype(np.float32)
    X[:, 2] = 5.0  # constant: scale 1
    rows = np.r_[0:100, 150:170, 300:301]
    mean, scale = zscore_stats(X, rows)
    np.testing.assert_allclose(mean, X[rows].astype(np.float64).mean(0), rtol=1e-6)
    ref = X[rows].astype(np.float64).std(0)
    ref[ref < 1e-6] = 1.0
    np.testing.assert_allclose(scale, ref, rtol=1e-5)


@pytest.fixture
def big(tmp_path):
    """~11 MB of features in a train/val/test layout (each split one range of rows, as a folder tree gives)."""
    return write_cache(tmp_path / "big.h5", {"train": 2400, "val": 300, "test": 300}, dim=320, classes=3)


def _sorted_by_split(path):
    """The synthetic cache interleaves classes but not splits: rows are train, then val, then test."""
    c = read_cache(path, features=False)
    return [np.flatnonzero(c.split == s) for s in ("train", "val", "test")]


def test_prepare_holds_the_features_once(big, monkeypatch):
    """No full-size temporary: the traced peak stays near one float32 matrix (tracemalloc sees numpy).
    Blocks are 1 MB here (64 MB in use) so that the matrix is many blocks."""
    from featcache.pipeline.heads import data as data_mod

    monkeypatch.setattr(data_mod, "READ_BYTES", 1 << 20)
    meta = read_cache(big, features=False)
    n_bytes = len(meta.labels) * 320 * 4
    tracemalloc.start()
    data = prepare(meta, 0.2, 0, True, torch.device("cpu"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= 1.1 * n_bytes + (8 << 20), f"peak {peak / 1e6:.1f} MB for {n_bytes / 1e6:.1f} MB of features"
    Xtr, _ = data.split("train")
    assert Xtr.untyped_storage().data_ptr() == data.X.untyped_storage().data_ptr()  # a view, not a copy
    full = read_cache(big).features
    tr = _sorted_by_split(big)[0]
    ref = (full - full[tr].mean(0)) / full[tr].std(0)
    np.testing.assert_allclose(data.X.numpy(), ref, atol=1e-4)


def test_prepare_never_changes_features_it_was_handed(big):
    c = featcache.open_cache(big)
    X0 = c.features.features.copy()
    prepare(c.features, 0.2, 0, True, torch.device("cpu"))
    np.testing.assert_array_equal(c.features.features, X0)


def test_a_cache_replaced_between_metadata_and_features_is_refused(big, tmp_path):
    meta = read_cache(big, features=False)
    with h5py.File(big, "r+") as f:  # another extract rewrote the rows meanwhile
        labels = f["labels"][...]
        f["labels"][...] = labels[::-1]
    with pytest.raises(FeatcacheError, match="changed while fit-head was reading it"):
        prepare(meta, 0.2, 0, True, torch.device("cpu"))
