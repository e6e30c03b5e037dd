"""The GPU path on a real GPU (issue 26); every test here is skipped without one.

Tolerances, not equality, between the CPU and a GPU: autocast rows agree with fp32 rows to cosine
>= 0.999 (tests/extraction/test_accel.py's faithful tolerance), fp32 rows (--amp off, TF32 off) to 1e-3
relative; heads trained on each device agree in validation accuracy within 1 point (the same
arithmetic up to rounding) or 5 points with dropout (the two devices draw different masks).
Equality is asserted only where it is promised: a resumed or repeated GPU extraction on the same
GPU is bit-equal to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, invoke, noisy_image, save_image
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIN_COSINE = 0.999
FULL = ["--backbone", "resnet18", "--weights", "none", "--batch-size", "8"]  # 512-d, BN folded on the GPU


def _amp() -> str:
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def _extract(tree, out, *extra):
    res = invoke("extract", tree, "-o", out, *FULL, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def _cache(path):
    from featcache.cache.store import read_cache

    return read_cache(path)


def _cosines(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.from_numpy(a).double(), torch.from_numpy(b).double(), dim=1)


@pytest.fixture(scope="module")
def cpu_cache(split_tree_ro, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_ref") / "cpu.h5"
    _extract(split_tree_ro, out, "--device", "cpu", "--workers", "0")
    return out


# ---- extraction ------------------------------------------------------------------------------------

def test_default_gpu_extraction_records_its_precision_and_agrees_with_the_cpu(split_tree_ro, cpu_cache, tmp_path):
    s = _extract(split_tree_ro, tmp_path / "gpu.h5", "--device", "cuda")  # default decoding: workers, pinned
    amp = _amp()
    assert ("autocast bfloat16" if amp == "bf16" else "autocast float16") in s["inference"]
    gpu, cpu = _cache(tmp_path / "gpu.h5"), _cache(cpu_cache)
    assert gpu.attrs["description"]["precision"] == {"device_type": "cuda", "amp": amp}
    assert gpu.fingerprint != cpu.fingerprint and gpu.paths == cpu.paths
    assert float(_cosines(gpu.features, cpu.features).min()) >= MIN_COSINE
    s = _extract(split_tree_ro, tmp_path / "fp32.h5", "--device", "cuda", "--amp", "off")
    assert "fp32" in s["inference"] and "channels_last" in s["inference"] and "BN folded" in s["inference"]
    fp32 = _cache(tmp_path / "fp32.h5")
    assert fp32.attrs["description"]["precision"] == {"device_type": "cuda", "amp": "off"}
    np.testing.assert_allclose(fp32.features, cpu.features, rtol=1e-3, atol=1e-4)  # TF32 off: fp32 rounding only


def _sub_extract(tree, out, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("FEATCACHE_TEST_CRASH_AFTER_BATCHES", None)
    if crash_after is not None:
        env["FEATCACHE_TEST_CRASH_AFTER_BATCHES"] = str(crash_after)
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(tree), "-o", str(out), *FULL, "--device", "cuda",
           "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)


def test_a_resumed_or_repeated_gpu_extraction_is_bit_equal(split_tree_ro, tmp_path):
    """The README's promise on CUDA: deterministic cuDNN algorithms, no per-process autotuning."""
    p = _sub_extract(split_tree_ro, tmp_path / "whole.h5")
    assert p.returncode == 0, p.stderr
    p = _sub_extract(split_tree_ro, tmp_path / "again.h5")  # another process: cuDNN may not pick otherwise
    assert p.returncode == 0, p.stderr
    p = _sub_extract(split_tree_ro, tmp_path / "resumed.h5", crash_after=2)
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = _sub_extract(split_tree_ro, tmp_path / "resumed.h5")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["resumed_batches"] >= 2
    whole = _cache(tmp_path / "whole.h5")
    for name in ("again.h5", "resumed.h5"):
        other = _cache(tmp_path / name)
        assert other.paths == whole.paths and other.fingerprint == whole.fingerprint
        np.testing.assert_array_equal(other.features, whole.features)


def test_a_cpu_cache_is_not_updated_with_gpu_rows(split_tree, tmp_path):
    out = tmp_path / "c.h5"
    _extract(split_tree, out, "--device", "cpu", "--workers", "0")
    save_image(split_tree / "train" / "red" / "new.png", noisy_image((200, 40, 40), np.random.default_rng(5)))
    assert_one_line_error(invoke("extract", split_tree, "-o", out, *FULL, "--device", "cuda"),
                          "on the CPU in fp32", "on CUDA", "--device cpu")
    s = _extract(split_tree, out, "--device", "cpu", "--workers", "0")
    assert (s["extracted"], s["reused"]) == (1, 42)


def test_more_ranks_than_gpus_is_one_line_per_rank(split_tree_ro, tmp_path):
    n = torch.cuda.device_count() + 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(REPO / "cli.py"), "extract", str(split_tree_ro), "-o", str(tmp_path / "c.h5"), *FULL, "--device", "cuda"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert p.returncode != 0
    ours = [ln for ln in p.stderr.splitlines() if ln.startswith("featcache: error:")]
    assert any(f"torchrun started {n} processes on this node but it has {n - 1} CUDA GPU" in ln for ln in ours), \
        p.stderr[-3000:]
    assert "invalid device ordinal" not in p.stderr  # the raw CUDA error never reaches the user


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_nccl_ranks_equal_one_gpu_process_without_barrier_warnings(split_tree_ro, tmp_path):
    p = _sub_extract(split_tree_ro, tmp_path / "one.h5")
    assert p.returncode == 0, p.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "cli.py"), "extract", str(split_tree_ro), "-o", str(tmp_path / "two.h5"), *FULL,
           "--device", "cuda", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "using the device under current context" not in p.stderr, p.stderr[-3000:]  # torch's barrier warning
    one, two = _cache(tmp_path / "one.h5"), _cache(tmp_path / "two.h5")
    assert one.paths == two.paths
    np.testing.assert_array_equal(one.features, two.features)  # same GPU model, deterministic algorithms


# ---- fine-tuning ------------------------------------------------------------------------------------

def test_finetune_on_cuda_decodes_in_workers_into_pinned_memory(fast_run, split_tree_ro, tmp_path):
    from featcache.pipeline.use.finetune import FinetuneConfig, run_finetune

    s = run_finetune(FinetuneConfig(str(split_tree_ro), str(fast_run), str(tmp_path / "ft"), epochs=3,
                                    batch_size=8, device="cuda"), progress=False)  # workers: the default
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert s["decode_workers"] >= 1 and m["precision"] == "bf16 autocast" and m["device"].startswith("cuda")
    assert torch.backends.cudnn.benchmark is False  # autotuning was on for fine-tuning only
    res = invoke("predict", tmp_path / "ft", split_tree_ro / "val", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    preds = res.json()["predictions"]
    if m["best_epoch"]:  # scored on the GPU in bf16, like the history: the same up to cuDNN's algorithm pick
        assert abs(m["val_accuracy"] - m["history"][m["best_epoch"] - 1]["val_accuracy"]) <= 1 / len(preds)
    acc = np.mean([p["label"] == os.path.basename(os.path.dirname(p["path"])) for p in preds])
    assert abs(acc - m["val_accuracy"]) <= 2 / len(preds)  # fp32 on the CPU vs bf16 on the GPU


def test_a_finetune_step_makes_no_host_sync():
    from featcache.pipeline.use.finetune import train_epoch

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.backbone(x))

    dev = torch.device("cuda")
    model = Model().to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    batches = [(torch.randn(8, 3, 32, 32).pin_memory(), torch.randint(0, 3, (8,)).pin_memory()) for _ in range(6)]
    train_epoch(model, batches, opt, dev, amp)  # warm-up: allocator, cuDNN handles, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = train_epoch(model, batches, opt, dev, amp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]  # the epoch's one read of its sums
    assert np.isfinite(rec["train_loss"])


# ---- heads: dropout, early stopping, CPU-vs-GPU agreement ------------------------------------------

@pytest.fixture(scope="module")
def overlap_cache(tmp_path_factory):
    from synthcache import write_cache

    # classes overlap (best val accuracy ~0.8), so training curves plateau and early stopping acts
    return write_cache(tmp_path_factory.mktemp("cuda_heads") / "c.h5", {"train": 200, "val": 100, "test": 100},
                       dim=32, sep=0.3)


def _fit(cache, out, device, *args) -> dict:
    """fit-head's --json summary."""
    res = invoke("fit-head", cache, "-o", out, "--device", device, "--json", *args)
    assert res.exit_code == 0, res.stderr
    return res.json()


@pytest.mark.parametrize("args,tolerance", [
    (("--head", "mlp", "--hidden", "64", "--dropout", "0.5", "--epochs", "300", "--patience", "5", "--lr", "1e-2"),
     0.05),
    (("--head", "linear", "--solver", "epochs", "--epochs", "100", "--lr", "1e-2"), 0.01),
    (("--head", "linear", "--solver", "exact"), 0.01),
])
def test_heads_on_cuda_agree_with_the_cpu_within_tolerance(overlap_cache, tmp_path, args, tolerance):
    gpu = _fit(overlap_cache, tmp_path / "gpu", "cuda", *args)
    cpu = _fit(overlap_cache, tmp_path / "cpu", "cpu", *args)
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert abs(gpu["val_accuracy"] - cpu["val_accuracy"]) <= tolerance
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= tolerance + 0.02
    if "--patience" in args:  # early stopping acted on the GPU too: 5 epochs past the best, well short of 300
        assert gpu["epochs_run"] == gpu["best_epoch"] + 5 < 300


def test_a_head_evaluates_alike_on_both_devices(overlap_cache, tmp_path):
    _fit(overlap_cache, tmp_path / "run", "cpu", "--head", "linear", "--solver", "epochs", "--epochs", "30")
    a = invoke("evaluate", tmp_path / "run", overlap_cache, "--device", "cpu", "--json").json()
    b = invoke("evaluate", tmp_path / "run", overlap_cache, "--device", "cuda", "--json").json()
    for split in ("val", "test"):
        assert abs(a[f"{split}_accuracy"] - b[f"{split}_accuracy"]) <= 1 / a[f"n_{split}"]  # a near-tie may flip
        assert b[f"{split}_loss"] == pytest.approx(a[f"{split}_loss"], rel=1e-4)


def test_predict_on_cuda_agrees_with_the_cpu(fast_run, split_tree_ro):
    """bf16 features on the GPU: probabilities within 0.05, labels equal where the CPU's margin is clear."""
    cpu = invoke("predict", fast_run, split_tree_ro / "val", "--device", "cpu", "--top-k", "2", "--json").json()
    gpu = invoke("predict", fast_run, split_tree_ro / "val", "--device", "cuda", "--top-k", "2", "--json").json()
    for c, g in zip(cpu["predictions"], gpu["predictions"]):
        assert c["path"] == g["path"]
        assert g["top"][0]["probability"] == pytest.approx(c["top"][0]["probability"], abs=0.05)
        if c["top"][0]["probability"] - c["top"][1]["probability"] > 0.1:
            assert g["label"] == c["label"]


def test_a_copy_of_the_tree_is_reused_not_re_extracted_on_the_same_gpu(split_tree_ro, tmp_path):
    """Same device, same precision: an update reuses every row (nothing is refused)."""
    tree = tmp_path / "images"
    shutil.copytree(split_tree_ro, tree)
    _extract(tree, tmp_path / "c.h5", "--device", "cuda")
    save_image(tree / "val" / "blue" / "new.png", noisy_image((40, 40, 210), np.random.default_rng(6)))
    s = _extract(tree, tmp_path / "c.h5", "--device", "cuda")
    assert (s["extracted"], s["reused"]) == (1, 42)
