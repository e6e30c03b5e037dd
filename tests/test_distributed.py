"""extract under torchrun (gloo on CPU): the merged cache equals a single-process cache row for row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST, REPO, invoke


def _torchrun(tree, out, env_extra=None, nproc=2, extra=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "cli.py"), "extract", str(tree), "-o", str(out), *FAST, "--device", "cpu",
           "--batch-size", "4", "--workers", "0", "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)


def _rows(path):
    from featcache.cache.store import read_cache

    c = read_cache(path)
    return c.paths, c.labels, c.split.tolist(), c.features, c.attrs["fingerprint"]


@pytest.fixture(scope="module")
def single(split_tree_ro, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "c.h5"
    res = invoke("extract", split_tree_ro, "-o", out, *FAST, "--device", "cpu", "--batch-size", "4", "--workers", "0")
    assert res.exit_code == 0, res.stderr
    return _rows(out)


def _assert_same(a, b):
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[4] == b[4]
    np.testing.assert_array_equal(a[3], b[3])


def test_torchrun_two_ranks_equals_single_process(split_tree_ro, tmp_path, single):
    out = tmp_path / "dist.h5"
    p = _torchrun(split_tree_ro, out)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout  # only rank 0 prints
    summary = json.loads(lines[0])
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["extracted"] > 0 for r in ranks)  # the work was really split
    assert sum(r["extracted"] for r in ranks) == summary["n_images"]
    _assert_same(_rows(out), single)
    assert not (tmp_path / "dist.h5.parts").exists()


def test_torchrun_killed_rank_rerun_completes(split_tree_ro, tmp_path, single):
    out = tmp_path / "dist.h5"
    p = _torchrun(split_tree_ro, out, {"FEATCACHE_TEST_CRASH_AFTER_BATCHES": "2", "FEATCACHE_TEST_CRASH_RANK": "1"})
    assert p.returncode != 0
    assert not out.exists()  # no partial cache at the final path
    parts = list((tmp_path / "dist.h5.parts").glob("part-*.npz"))
    assert parts  # committed batches survive the crash
    p = _torchrun(split_tree_ro, out)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["resumed_batches"] >= 2
    _assert_same(_rows(out), single)


def test_torchrun_with_augmented_views_equals_single_process(small_tree_ro, tmp_path):
    import h5py

    args = ["--augment", "2"]
    ref = tmp_path / "one.h5"
    res = invoke("extract", small_tree_ro, "-o", ref, *FAST, "--device", "cpu", "--batch-size", "4", "--workers", "0",
                 *args)
    assert res.exit_code == 0, res.stderr
    p = _torchrun(small_tree_ro, tmp_path / "dist.h5", extra=args)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same(_rows(tmp_path / "dist.h5"), _rows(ref))
    with h5py.File(ref, "r") as a, h5py.File(tmp_path / "dist.h5", "r") as b:
        np.testing.assert_array_equal(a["views"][...], b["views"][...])
        assert a.attrs["augment_fingerprint"] == b.attrs["augment_fingerprint"] != ""
