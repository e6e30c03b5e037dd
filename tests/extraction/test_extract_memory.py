"""Extraction's memory does not grow with the number of images by their features.

Every batch's features are committed to the journal (``CACHE.h5.parts/part-*.npz``) as it finishes; the
final cache is assembled from the journal block by block (cache/featwrite.py), so a run never holds all
N x D features at once. Measured with tracemalloc, which traces numpy's buffers (torch's own allocator is
not traced, nor is HDF5's): the traced peak of an extraction of 4N images exceeds that of N images by far
less than the 3N extra feature rows would take. Sizes, not timings or rounding, decide the outcome.
"""
from __future__ import annotations

import gc
import tracemalloc

import h5py
import numpy as np
import pytest
from conftest import FAST, assert_one_line_error, invoke, noisy_image, save_image

from featcache.cache.featwrite import BLOCK_BYTES
from featcache.cache.journal import Journal
from featcache.cache.store import read_cache
from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.extraction.extract import run_extract

# A cheap backbone with wide features: random-init timm ResNet-18 at 32 px cut after its stem's ReLU,
# flattened: 64 x 16 x 16 = 16384 features (64 KiB of float32) per image, for a few MFLOPs.
WIDE = dict(backbone="timm:resnet18@32", weights="none", layer="act1", pool="flatten", device="cpu", workers=0,
            batch_size=16, compile="off")
D = 16384
N = 200  # the small run; the large one has 4N. N rows of features (12.5 MiB) already exceed a write block (8 MiB).


def make_images(root, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 190, 40)]
    for i in range(n):
        save_image(root / "train" / f"c{i % 2}" / f"img_{i:05d}.png", noisy_image(colours[i % 2], rng, size=(24, 24)))


def traced_peak(images, out, **kw) -> int:
    """Bytes the traced peak rose above what was traced when the extraction started."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        summary = run_extract(ExtractConfig(str(images), str(out), **{**WIDE, **kw}), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["feature_dim"] == D
    return peak - start


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    small, large = tmp_path_factory.mktemp("mem_small") / "images", tmp_path_factory.mktemp("mem_large") / "images"
    make_images(small, N, seed=1)
    make_images(large, 4 * N, seed=2)
    return small, large


def test_extraction_memory_does_not_hold_every_feature_row(trees, tmp_path):
    small, large = trees
    assert N * D * 4 > BLOCK_BYTES  # the small run is already past one write block
    warm = tmp_path / "warm"  # first-use costs (imports, timm's registry, caches) out of the measurement
    make_images(warm, 20, seed=3)
    traced_peak(warm, tmp_path / "warm.h5")
    peak_n = traced_peak(small, tmp_path / "n.h5")
    peak_4n = traced_peak(large, tmp_path / "4n.h5")
    growth = peak_4n - peak_n
    held = 3 * N * D * 4  # what 3N more feature rows take when every row is kept until the end (37.5 MiB)
    assert growth < held / 4, (f"traced peak {peak_n / 2**20:.1f} MiB at {N} images, {peak_4n / 2**20:.1f} MiB at "
                               f"{4 * N}: +{growth / 2**20:.1f} MiB, the 3N extra rows are {held / 2**20:.1f} MiB")
    big = read_cache(tmp_path / "4n.h5")  # and the cache is whole: every row, the backbone's values
    assert big.n_rows == 4 * N and big.features.shape == (4 * N, D)
    assert np.isfinite(big.features).all() and (np.abs(big.features).sum(axis=1) > 0).all()
    with h5py.File(tmp_path / "4n.h5", "r") as f:
        assert f["features"].fletcher32
    assert not (tmp_path / "4n.h5.parts").exists()


def test_incremental_update_reuses_rows_without_holding_them(trees, tmp_path):
    """An update of a 4N-image cache that adds N images between the old ones: the reused rows are copied
    block by block, the new ones read back from the journal (a batch's rows can span two blocks); the
    result equals a fresh extraction of the same folder."""
    import shutil

    _, large = trees
    images = tmp_path / "images"
    shutil.copytree(large, images)
    out = tmp_path / "c.h5"
    run_extract(ExtractConfig(str(images), str(out), **WIDE), progress=False)
    rng = np.random.default_rng(4)  # N new images, interleaved by name with the old ones
    for i in range(N):
        save_image(images / "train" / f"c{i % 2}" / f"img_{2 * i:05d}b.png", noisy_image((90, 90, 200), rng, size=(24, 24)))
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        s = run_extract(ExtractConfig(str(images), str(out), **WIDE), progress=False)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert (s["n_images"], s["reused"], s["extracted"]) == (5 * N, 4 * N, N)
    # A block being written and the previous cache's rows read into it, plus far less than the N new
    # rows (12.5 MiB), which are read back from the journal a batch at a time.
    bound = 2 * BLOCK_BYTES + N * D * 4 / 2
    assert peak < bound, f"traced peak {peak / 2**20:.1f} MiB for an update adding {N} rows, over {bound / 2**20:.1f} MiB"
    fresh = tmp_path / "fresh.h5"
    run_extract(ExtractConfig(str(images), str(fresh), **WIDE), progress=False)
    a, b = read_cache(out), read_cache(fresh)
    assert a.paths == b.paths
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)  # batches differ: not bit for bit


def test_a_part_that_cannot_be_read_back_fails_the_run_and_a_rerun_completes(small_tree_ro, tmp_path, monkeypatch):
    """The final cache is assembled from the journal: a part unreadable then is a one-line error, no cache
    is written, the journal stays, and the same command then finishes from it."""
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    args = [*FAST, "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    assert invoke("extract", small_tree_ro, "-o", ref, *args).exit_code == 0
    real = Journal.load_array
    monkeypatch.setattr(Journal, "load_array", lambda self, index, keys, name: None if index == 1 else
                        real(self, index, keys, name))
    assert_one_line_error(invoke("extract", small_tree_ro, "-o", out, *args), "batch 1", "c.h5.parts", "again")
    assert not out.exists() and not list(tmp_path.glob("c.h5.tmp-*"))
    assert len(list((tmp_path / "c.h5.parts").glob("part-*.npz"))) == 4  # 15 images, 4 per batch
    monkeypatch.setattr(Journal, "load_array", real)
    res = invoke("extract", small_tree_ro, "-o", out, *args, "--json")
    assert res.exit_code == 0, res.stderr
    assert res.json()["resumed_batches"] == 4
    a, b = read_cache(out), read_cache(ref)
    assert a.paths == b.paths
    np.testing.assert_array_equal(a.features, b.features)
    assert not (tmp_path / "c.h5.parts").exists()
