"""Streaming a cache larger than memory: the reader, its passes and epochs, and fit-head on a stream."""
from __future__ import annotations

import json
import os
import threading

import h5py
import numpy as np
import pytest
import torch
from synthcache import write_cache

import featcache
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning
from featcache.pipeline.heads import stream
from featcache.pipeline.heads.data import zscore_stats
from featcache.pipeline.heads.exact import fit_exact, objective
from featcache.pipeline.heads.stream import H5Rows, streamed_moments


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "c.h5", {"train": 300, "val": 60, "test": 60}, dim=24, classes=3, sep=1.0)


def _features(path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["features"][...]


def test_chunks_are_the_rows_columns_and_standardisation_asked_for(cache):
    X = _features(cache)
    rows = np.sort(np.random.default_rng(0).choice(len(X), 700, replace=False))  # interleaved, not one range
    cols = np.array([1, 5, 6, 20])
    mean, scale = np.arange(4, dtype=np.float32), np.full(4, 2.0, np.float32)
    src = H5Rows(cache, rows, chunk_rows=50, piece_rows=23, columns=cols, mean=mean, scale=scale)
    parts = list((r, x.clone()) for r, x in src.chunks())
    assert len(parts) > 10 and all(len(x) <= 50 for _, x in parts)
    assert [r.start for r, _ in parts[1:]] == [r.stop for r, _ in parts[:-1]] and parts[-1][0].stop == len(rows)
    got = torch.cat([x for _, x in parts]).numpy()
    np.testing.assert_allclose(got, (X[rows][:, cols] - mean) / scale, rtol=1e-6)
    assert src.shape == (700, 4) and len(src.subset(np.arange(10, 20))) == 10


def test_streamed_statistics_match_the_in_memory_ones_and_find_non_finite_rows(tmp_path):
    path = write_cache(tmp_path / "c.h5", {"train": 200, "val": 20, "test": 20}, dim=8)
    with h5py.File(path, "r+") as f:  # shift far from 0 (cancellation) and plant a NaN in a train row
        f["features"][...] = f["features"][...] * 3 + 1e4
        f["features"][7, 2] = np.nan
    X = _features(path)
    train = np.setdiff1d(np.arange(600), [7])
    src = H5Rows(path, np.arange(len(X)), chunk_rows=64, piece_rows=16)
    mean, scale, bad = streamed_moments(src, train)
    ref_mean, ref_scale = zscore_stats(X, train)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-5)
    assert np.flatnonzero(bad).tolist() == [7]


def test_every_epoch_visits_every_row_once_in_a_new_order(cache):
    X = _features(cache)
    src = H5Rows(cache, np.arange(len(X)), chunk_rows=60, piece_rows=20)
    gen = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(3):
        pos = []
        for p, xb in src.epoch_batches(32, gen, window_rows=200):
            np.testing.assert_array_equal(xb.numpy(), X[p.numpy()])
            assert len(p) == 32 or len(pos) * 32 + len(p) == len(X)  # only the last batch is short
            pos.append(p)
        pos = torch.cat(pos)
        assert torch.equal(pos.sort().values, torch.arange(len(X)))
        orders.append(pos)
    assert not torch.equal(orders[0], orders[1])
    # rows of one piece are spread: the first batch draws from several pieces, not one
    first = next(iter(src.epoch_batches(32, torch.Generator().manual_seed(1), window_rows=200)))[0]
    assert len(set((first // 20).tolist())) > 3


def test_a_reader_abandoned_midway_stops_and_a_replaced_cache_is_an_error(cache, tmp_path):
    src = H5Rows(cache, np.arange(900), chunk_rows=50, piece_rows=25)
    it = src.chunks()
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "featcache-reader"]
    other = write_cache(tmp_path / "other.h5", {"train": 300, "val": 60, "test": 60}, dim=24, classes=3, seed=1)
    os.replace(other, cache)  # what an extract --overwrite does
    with pytest.raises(FeatcacheError, match="changed while featcache was reading it"):
        list(src.chunks())


def test_exact_probe_on_a_stream_equals_the_in_memory_solve(cache):
    """The C path on H5Rows in small chunks: the same optimum as on the tensor (objective within
    1e-6 relative, same val accuracy up to near-tie rows)."""
    X, y = _features(cache), torch.from_numpy(h5py.File(cache)["labels"][...].astype(np.int64))
    train, val = np.arange(900), np.arange(900, 1080)
    mean, scale = zscore_stats(X, train)
    Xs = torch.from_numpy((X - mean) / scale)
    cs = [0.01, 1.0, 100.0]
    mem = fit_exact(cs, Xs[train], y[train], 3)
    src = H5Rows(cache, train, chunk_rows=70, piece_rows=35, mean=mean, scale=scale)
    got = fit_exact(cs, src, y[train], 3)
    for a, b, c in zip(mem, got, cs):
        fa, fb = objective(a.head, Xs[train], y[train], c), objective(b.head, Xs[train], y[train], c)
        assert abs(fa - fb) <= 1e-6 * abs(fa)
        pa, pb = (h(Xs[val]).argmax(1) for h in (a.head, b.head))
        logits = a.head(Xs[val]).detach()
        margin = logits.topk(2, 1).values.diff(dim=1).abs().squeeze(1)
        assert torch.equal(pa[margin > 1e-3], pb[margin > 1e-3])


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 rows and pieces of 4 rows (64 float32 columns): many chunks from a small cache."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 8 << 10)
    monkeypatch.setattr(stream, "PIECE_BYTES", 1 << 10)


@pytest.fixture
def wide(tmp_path):
    return write_cache(tmp_path / "w.h5", {"train": 1000, "val": 200, "test": 200}, dim=64, classes=3, sep=0.4)


def _streamed(cache, tmp_path, name, **options):
    with pytest.warns(FeatcacheWarning, match=r"the features need .* more than max_memory .*: streaming them"):
        result = featcache.fit_heads(cache, output=tmp_path / name, **options)
    memory = json.loads((tmp_path / name / "metrics.json").read_text())["memory"]
    assert memory["plan"]["mode"] == "stream" and memory["plan"]["work"] <= memory["plan"]["limit"]
    return result, memory


def test_the_exact_probe_streamed_under_a_budget_finds_the_in_memory_c_path(wide, tmp_path, small_chunks):
    mem = featcache.fit_heads(wide)
    st, memory = _streamed(wide, tmp_path, "st", max_memory="700K")
    assert memory["plan"]["features"] == 0 and memory["stream_io"]["passes"] > 10
    assert memory["stream_io"]["stored_bytes"] > 10 * 2400 * 64 * 4  # every pass reads the train rows again
    by_c = {r["C"]: r for r in mem.leaderboard}
    assert len(st.leaderboard) == len(by_c) == 10
    for r in st.leaderboard:
        m = by_c[r["C"]]
        assert abs(r["objective"] - m["objective"]) <= 1e-6 * abs(m["objective"])
        assert abs(r["val_accuracy"] - m["val_accuracy"]) <= 1 / 600 + 1e-12  # a near-tie row at most
        assert r["test_accuracy"] == pytest.approx(m["test_accuracy"], abs=1 / 600 + 1e-12)
    assert st.best.row["C"] == mem.best.row["C"] or abs(st.best.row["val_accuracy"] - mem.best.row["val_accuracy"]) < 2e-3
    np.testing.assert_allclose(st.predict_proba(_features(wide)[:50]), mem.predict_proba(_features(wide)[:50]),
                               atol=2e-3)


def test_epoch_trained_heads_stream_with_every_row_once_and_match_in_memory_accuracy(wide, tmp_path, small_chunks):
    opts = {"head": "mlp", "hidden": [32, 0], "lr": 1e-2, "epochs": 6, "patience": 0, "refit": True}
    mem = featcache.fit_heads(wide, **opts)
    st, memory = _streamed(wide, tmp_path, "st", max_memory="3M", **opts)
    window = memory["plan"]["window_rows"]
    assert 0 < window < 3000  # a bounded shuffle window, smaller than the train split
    for kind in ("mlp", "linear"):
        a = next(r for r in mem.leaderboard if r["head"] == kind)
        b = next(r for r in st.leaderboard if r["head"] == kind)
        assert b["epochs_run"] == 6 and abs(a["val_accuracy"] - b["val_accuracy"]) < 0.06  # same data, other order
    assert st.refit["n_rows"] == 3600 and st.refit["test_accuracy"] is not None


@pytest.mark.parametrize(("options", "why"), [({"cv": 3}, "cv"), ({"train_sizes": [5]}, "train_sizes"),
                                              ({"head": "knn"}, "head knn")])
def test_what_cannot_stream_is_refused_in_one_line_naming_why(wide, small_chunks, options, why):
    with pytest.raises(FeatcacheError, match=rf"in memory .* streaming the cache instead is not built for {why}"):
        featcache.fit_heads(wide, max_memory="700K", **options)


def test_a_run_that_does_not_fit_even_streamed_is_refused_before_training(wide, small_chunks):
    with pytest.raises(FeatcacheError, match=r"needs about .* even when streaming the cache .*max_memory"):
        featcache.fit_heads(wide, max_memory="100K")


def test_the_cli_streams_with_max_memory_and_says_so_in_one_line(wide, tmp_path, small_chunks):
    from synthcache import run_cli

    code, out, err = run_cli("fit-head", str(wide), "-o", str(tmp_path / "run"), "--max-memory", "700K", "--no-plots")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "streaming them" in ln]
    assert len(lines) == 1 and lines[0].startswith("featcache: warning: the features need")
    code, out, err = run_cli("evaluate", str(tmp_path / "run" / "head.pt"), str(wide))
    assert code == 0 and "test" in out


def test_a_pass_holds_a_few_chunks_never_the_matrix(tmp_path):
    """numpy's allocations (the reader's ring of 3 buffers, the statistics' temporaries), traced over
    whole passes: about 10 chunks, whatever the matrix's size (10 MB here, 80 chunks)."""
    import tracemalloc

    path = write_cache(tmp_path / "m.h5", {"train": 6000, "val": 500, "test": 500}, dim=128)
    src = H5Rows(path, np.arange(21000), chunk_rows=256)
    chunk_bytes, feature_bytes = 256 * 128 * 4, 21000 * 128 * 4
    tracemalloc.start()
    try:
        for _ in src.chunks():
            pass
        streamed_moments(src, np.arange(18000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * chunk_bytes < feature_bytes / 8, f"peak {peak} bytes, chunks of {chunk_bytes}"


def _float16_copy(src, dst):
    """``src``'s cache with its features stored as float16 (as extract --dtype float16 writes)."""
    from featcache.cache.store import CacheWriter, read_cache

    c = read_cache(src)
    w = CacheWriter(dst, len(c.labels), c.features.shape[1], "float16")
    w.write_features(np.arange(len(c.labels)), c.features.astype(np.float16))
    w.write_columns({"labels": c.labels, "paths": list(c.paths), "split": list(c.split),
                     "file_size": np.zeros(len(c.labels), np.int64), "file_mtime_ns": np.zeros(len(c.labels), np.int64),
                     "file_sha256": [""] * len(c.labels)})
    w.finish({**{k: c.attrs[k] for k in ("class_names", "backbone", "weights", "layer", "pool", "preprocess",
                                          "feature_dim", "n_images")}, "fingerprint": "f16", "dtype": "float16"}, [])
    return dst


def test_a_float16_cache_that_fits_only_as_float16_stays_float16_in_memory(wide, tmp_path, small_chunks):
    """Features 4200 x 64: 1.1 MB as float32, 0.5 MB as stored. With 1M the float32 plan (1.5 MB) does not fit but
    float16 does: held at float16, upcast chunk by chunk, the file read once; the same C path."""
    half = _float16_copy(wide, tmp_path / "half.h5")
    mem = featcache.fit_heads(half)
    with pytest.warns(FeatcacheWarning, match=r"keeping them at float16 \(0\.5 MB\) and upcasting"):
        kept = featcache.fit_heads(half, output=tmp_path / "kept", max_memory="1M")
    memory = json.loads((tmp_path / "kept" / "metrics.json").read_text())["memory"]
    assert memory["plan"]["mode"] == "memory16" and memory["plan"]["features"] == 4200 * 64 * 2
    assert memory["plan"]["work"] <= memory["plan"]["limit"] and memory["stream_io"]["passes"] > 10
    for a, b in zip(sorted(mem.leaderboard, key=lambda r: r["C"]), sorted(kept.leaderboard, key=lambda r: r["C"])):
        assert abs(a["objective"] - b["objective"]) <= 1e-6 * abs(a["objective"])
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / 600 + 1e-12
