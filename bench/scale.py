"""Benchmark: fit-head on large caches — peak memory (from the OS) and time, next to the I/O floor.

    .venv/bin/python bench/scale.py [--n 100000,320000] [--dim 2048] [--dtype float32] \
        [--heads linear,mlp] [--budgets none,1G] [--dir /tmp/featcache-scale] [--keep]

For each N it writes a synthetic cache in featcache's own format (rows from a noisy linear teacher,
10 classes, splits 80/10/10, each split one range of rows as a folder tree gives), then runs in a
child process, each measured by the kernel (``os.wait4``: the child's own peak RSS):
- ``featcache fit-head CACHE --head linear`` (the exact probe's 10-C path, the default);
- ``featcache fit-head CACHE --head mlp --hidden 512 --lr 1e-3,1e-2 --weight-decay 0,1e-4,1e-3,1e-2
  --epochs 2 --patience 0`` (a sweep of 8 MLP heads for 2 epochs);
- ``--head mlp2``: 2 MLP heads (512 hidden, lr 1e-3 and 1e-2) for 1 epoch;
and a plain sequential h5py read of the same features (the I/O floor: GB/s from the page cache or
the disk, whichever holds the file). Each head runs once per ``--budgets`` entry: ``none`` = no
--max-memory (in memory when it fits), a size = ``--max-memory SIZE`` (streamed when the features
do not fit it). It prints one row per run: mode, peak RSS, peak / features, wall time, fit-head's
own plan (metrics.json's ``work``: what the budget bounds), the streamed passes' throughput (GB/s of
stored features read, averaged over every pass), the share of their time the solver waited for
data and the number of passes (``wait/n``), and the best val accuracy. Caches are written under
--dir and removed afterwards unless --keep
(they are tens of GB at the largest N: never commit them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep import load, machine  # noqa: E402

from featcache.cache.store import CacheWriter  # noqa: E402
from featcache.pipeline.heads.memory import available_bytes  # noqa: E402

CLASSES = 10
BLOCK = 50_000  # rows generated and written per step (bounded memory while writing)
HEADS = {
    "linear": ["--head", "linear"],
    "mlp": ["--head", "mlp", "--hidden", "512", "--lr", "1e-3,1e-2", "--weight-decay", "0,1e-4,1e-3,1e-2",
            "--epochs", "2", "--patience", "0"],
    "mlp2": ["--head", "mlp", "--hidden", "512", "--lr", "1e-3,1e-2", "--epochs", "1", "--patience", "0"],
}


def write_synthetic(path: Path, n: int, dim: int, dtype: str, seed: int = 0) -> None:
    """N rows of a noisy linear teacher: x ~ N(0, I), label = argmax(x W + noise)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(0, 1, (dim, CLASSES)).astype(np.float32) / np.sqrt(dim)
    n_test, n_val = n // 10, n // 10
    split = np.array(["test"] * n_test + ["train"] * (n - n_test - n_val) + ["val"] * n_val, dtype=object)
    labels = np.empty(n, np.int64)
    w = CacheWriter(path, n, dim, dtype)
    for s in range(0, n, BLOCK):
        x = rng.standard_normal((min(BLOCK, n - s), dim), dtype=np.float32)
        labels[s: s + len(x)] = np.argmax(x @ teacher + 0.5 * rng.standard_normal((len(x), CLASSES)), axis=1)
        w.write_features(np.arange(s, s + len(x)), x)
    paths = [f"{sp}/c{y}/{i:08d}.png" for i, (sp, y) in enumerate(zip(split, labels))]
    w.write_columns({"labels": labels, "paths": paths, "split": split, "file_size": np.zeros(n, np.int64),
                     "file_mtime_ns": np.zeros(n, np.int64), "file_sha256": [""] * n})
    w.finish({"fingerprint": f"scale-{n}-{dim}-{dtype}", "class_names": [f"c{c}" for c in range(CLASSES)],
              "backbone": "synthetic", "weights": "none", "layer": "synthetic", "pool": "avg", "preprocess": "none",
              "dtype": dtype, "feature_dim": dim, "n_images": n}, [])


def read_floor(path: Path) -> float:
    """GB/s of a plain sequential h5py read of /features, in 64 MB blocks."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        step = max(1, (64 << 20) // (ds.shape[1] * ds.dtype.itemsize))
        t0 = time.perf_counter()
        for s in range(0, ds.shape[0], step):
            ds[s: s + step]
        dt = time.perf_counter() - t0
    return ds.shape[0] * ds.shape[1] * ds.dtype.itemsize / dt / 1e9


def run_child(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes of that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    if proc.returncode:
        print(f"    exit {proc.returncode}: {err[-1] if err else ''}")
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def row(n: int, args, head: str, budget: str, run: Path | None, feat_bytes: int, floor: float, peak: int,
        wall: float) -> str:
    """One printed row; the plan, the passes' throughput and the val accuracy from metrics.json."""
    mode = work = gbps = wait = acc = "-"
    if run is not None:
        metrics = json.loads((run / "metrics.json").read_text())
        plan, io = metrics["memory"]["plan"], metrics["memory"].get("stream_io")
        mode, work = plan.get("mode", "memory"), f"{plan['work'] / 2**30:.2f}G"
        acc = f"{metrics['val_accuracy']:.4f}" if metrics.get("val_accuracy") is not None else "-"
        if io and io["gb_per_s"]:
            gbps = f"{io['gb_per_s']:.2f}GB/s"
            wait = f"{io['wait_seconds'] / io['seconds']:.0%}/{io['passes']}"
    return (f"{n:>9} {args.dim:>5} {args.dtype:>7} {head:>6} {budget:>6} {mode:>6} {feat_bytes / 2**30:>8.2f}G "
            f"{floor:>6.2f}GB/s {gbps:>9} {wait:>8} {peak / 2**30:>8.2f}G {peak / feat_bytes:>9.2f} {work:>7} "
            f"{wall:>6.0f}s {acc:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="100000,320000")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--heads", default="linear,mlp")
    ap.add_argument("--budgets", default="none", help="comma list: none (no --max-memory) or sizes such as 1G")
    ap.add_argument("--dir", default="/tmp/featcache-scale")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\n{load()}; memory available {available_bytes() / 2**30:.1f} GiB")
    print(f"{'N':>9} {'D':>5} {'dtype':>7} {'head':>6} {'budget':>6} {'mode':>6} {'features':>9} {'floor':>9} "
          f"{'pass':>9} {'wait/n':>8} {'peak RSS':>9} {'peak/feat':>9} {'work':>7} {'wall':>7} {'val acc':>7}")
    for n in (int(v) for v in args.n.split(",")):
        cache = root / f"scale-{n}-{args.dim}-{args.dtype}.h5"
        if not cache.exists():
            t0 = time.perf_counter()
            write_synthetic(cache, n, args.dim, args.dtype)
            print(f"    wrote {cache} ({cache.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        feat_bytes = n * args.dim * np.dtype(args.dtype).itemsize
        floor = read_floor(cache)
        for head in args.heads.split(","):
            for budget in args.budgets.split(","):
                run = root / f"run-{n}-{head}"
                shutil.rmtree(run, ignore_errors=True)
                limit = [] if budget == "none" else ["--max-memory", budget]
                code, wall, peak = run_child([sys.executable, str(REPO / "cli.py"), "fit-head", str(cache), "-o",
                                              str(run), "--device", "cpu", "--no-plots", *HEADS[head], *limit])
                print(row(n, args, head, budget, run if code == 0 else None, feat_bytes, floor, peak, wall)
                      + ("" if code == 0 else f"  (exit {code})"), flush=True)
                shutil.rmtree(run, ignore_errors=True)
        if not args.keep:
            cache.unlink()


if __name__ == "__main__":
    main()
