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


# ---- CUDA ranks (NCCL), checked without a GPU: the checks run before any CUDA call --------------

def _torchrun_env(monkeypatch, rank: int, world: int, per_node: int) -> None:
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % per_node, "LOCAL_WORLD_SIZE": per_node}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def _no_process_group(monkeypatch, calls: dict) -> None:
    import torch
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(init=kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.update(set_device=i))


def test_more_cuda_ranks_than_gpus_is_one_line_error_before_joining(monkeypatch):
    import torch

    from featcache.pipeline.errors import FeatcacheError
    from featcache.pipeline.extraction import distributed

    calls: dict = {}
    _torchrun_env(monkeypatch, rank=3, world=4, per_node=4)
    _no_process_group(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(FeatcacheError, match="torchrun started 4 processes on this node but it has 2 CUDA GPUs "
                                             r"\(local rank 3 has none\): use --nproc-per-node 2") as e:
        distributed.init("cuda")
    assert "\n" not in str(e.value) and calls == {}  # refused before set_device or joining the group


def test_too_many_ranks_reach_the_cli_as_one_line(monkeypatch, small_tree_ro, tmp_path):
    import torch

    from featcache.pipeline import device as device_mod

    calls: dict = {}
    _torchrun_env(monkeypatch, rank=1, world=2, per_node=2)
    _no_process_group(monkeypatch, calls)
    device_mod.cuda_probe.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    try:
        res = invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", *FAST, "--device", "cuda")
    finally:
        device_mod.cuda_probe.cache_clear()
    from conftest import assert_one_line_error

    assert_one_line_error(res, "torchrun started 2 processes", "1 CUDA GPU ", "--nproc-per-node 1")
    assert calls == {} and not (tmp_path / "c.h5").exists()


def test_nccl_group_is_bound_to_the_rank_gpu_so_barriers_need_not_guess(monkeypatch):
    import torch

    from featcache.pipeline.extraction import distributed

    calls: dict = {}
    _torchrun_env(monkeypatch, rank=5, world=8, per_node=4)
    _no_process_group(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    ctx = distributed.init("cuda")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    assert calls["set_device"] == 1
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda", 1)
    calls.clear()
    distributed.init("cpu")  # gloo: no GPU to bind
    assert calls["init"]["backend"] == "gloo" and "device_id" not in calls["init"] and "set_device" not in calls
