"""Benchmark: K-fold cross-validation as one stacked pass vs K sequential sweeps (issue 15).

    .venv/bin/python bench/cv.py [--cache digits.h5] [--folds 5] [--epochs 100] [--patience 10] [--mlp]

Both sides train the same heads with the same code (``train_many``): the demo's 8 linear
configurations (lr 1e-3,1e-2 x weight decay 0,1e-4,1e-3,1e-2; with --mlp also 4 MLP-512 heads) on
the un-augmented train rows of a cache (default: the make-demo digits, EfficientNet-Lite0 features).
(1) one pass: every configuration x fold is a masked head of one stack (per-fold standardisation
inside the trainer); (2) K sweeps: fold by fold, the fold's rows z-scored with their own statistics,
then one ordinary sweep of the configurations. It prints both wall-clock times, the speed-up and the
largest difference in held-out fold accuracy between the two (they train the same heads).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep import machine  # noqa: E402

from featcache.cache.store import read_cache  # noqa: E402
from featcache.pipeline.heads.cv import fold_splits  # noqa: E402
from featcache.pipeline.heads.data import prepare  # noqa: E402
from featcache.pipeline.heads.masks import HeadTask  # noqa: E402
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many  # noqa: E402


def configs(mlp: bool) -> list[HeadParams]:
    out = [HeadParams(lr=lr, weight_decay=wd) for lr in (1e-3, 1e-2) for wd in (0.0, 1e-4, 1e-3, 1e-2)]
    if mlp:
        out += [HeadParams(hidden=(512,), lr=lr, weight_decay=wd) for lr in (1e-3, 1e-2) for wd in (0.0, 1e-3)]
    return out


def held_out_accuracy(r) -> float:
    return r.history[r.best_epoch - 1]["val_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="demo-out/digits.h5")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--mlp", action="store_true", help="also 4 MLP-512 heads (no dropout)")
    args = ap.parse_args()
    data = prepare(read_cache(args.cache), 0.2, 0, True, torch.device("cpu"))
    pool = torch.as_tensor(data.rows["train"])
    X, y = data.X[pool], data.y[pool]
    folds = fold_splits(y.numpy(), args.folds, seed=0)
    params = configs(args.mlp)
    settings = TrainSettings(args.epochs, args.batch_size, args.patience)
    n_classes = len(data.class_names)
    print(f"machine: {machine()}; shared with other engineers' jobs while measured, so times carry their noise")
    print(f"cache: {args.cache}: {len(X)} train rows x {X.shape[1]} features, {n_classes} classes; "
          f"{len(params)} configurations x {args.folds} folds; epochs <= {args.epochs}, patience {args.patience}")

    tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for p in params for tr, ho in folds]
    t0 = time.perf_counter()
    together = train_many(tasks, data=TrainData(X, y, n_classes, X, y), settings=settings)
    t_one = time.perf_counter() - t0

    t0 = time.perf_counter()
    alone: list = [None] * len(tasks)
    for f, (tr, ho) in enumerate(folds):
        r = X[torch.as_tensor(tr)].double()
        mean, scale = r.mean(0).float(), r.std(0, unbiased=False).float()
        scale[scale < 1e-6] = 1.0
        Xs = (X - mean) / scale
        trt, hot = torch.as_tensor(tr), torch.as_tensor(ho)
        res = train_many(params, data=TrainData(Xs[trt], y[trt], n_classes, Xs[hot], y[hot]), settings=settings)
        for i, rr in enumerate(res):
            alone[i * len(folds) + f] = rr
    t_seq = time.perf_counter() - t0

    diff = max(abs(held_out_accuracy(a) - held_out_accuracy(b)) for a, b in zip(together, alone))
    means = [np.mean([held_out_accuracy(together[i * len(folds) + f]) for f in range(len(folds))])
             for i in range(len(params))]
    print(f"one stacked pass ({len(tasks)} masked heads): {t_one:8.1f} s")
    print(f"{args.folds} sequential sweeps ({len(params)} heads each): {t_seq:8.1f} s")
    print(f"speed-up: {t_seq / t_one:.2f}x; largest held-out fold accuracy difference: {diff:.4f}; "
          f"best mean CV accuracy {max(means):.4f}")
    k, n, d = len(tasks), len(X), X.shape[1]
    print(f"per-fold standardisation memory: {2 * k * d * 4 / 2**20:.2f} MiB of per-head statistics, where "
          f"{args.folds} standardised copies of the rows would take {args.folds * n * d * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
