"""Benchmark: featcache's k-NN head sweep vs scikit-learn's KNeighborsClassifier(metric="cosine").

    .venv/bin/python bench/knn.py [--cache demo-out/digits.h5] [--k 1,5,10,20,50] [--rounds 3]

Both sides see the same standardised train rows (the bank) and score the val rows with majority
voting (scikit-learn's ``weights="uniform"``) for every k. featcache computes the similarities once
and scores all k from one top-max(k) search (its fit also scores train leave-one-out and test,
which scikit-learn's side does not do: the comparison is not in featcache's favour); scikit-learn
fits and predicts once per k (brute force: the exact cosine neighbours). It prints both times
(best of ``--rounds``), the ratio, and how many val predictions differ per k (ties of equal vote
counts may break apart; anything else is a bug). Without --cache (or when it is missing) a
synthetic 1,797 x 1,280, 10-class problem of the demo's shape is used.
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

from sweep import load, machine  # noqa: E402

import featcache  # noqa: E402


def _data(cache: str | None) -> tuple[dict, str]:
    if cache and Path(cache).exists():
        c = featcache.open_cache(cache)
        return {s: c.arrays(s) for s in ("train", "val", "test") if c.splits.get(s)}, cache
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1797)
    X = (rng.normal(0, 1, (10, 1280))[y] * 0.4 + rng.normal(0, 1, (1797, 1280))).astype(np.float32)
    return {"train": (X[:1078], y[:1078]), "val": (X[1078:1437], y[1078:1437]),
            "test": (X[1437:], y[1437:])}, "synthetic 1,797 x 1,280"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(REPO / "demo-out" / "digits.h5"))
    ap.add_argument("--k", default="1,5,10,20,50")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    ks = [int(k) for k in args.k.split(",")]
    splits, source = _data(args.cache)
    (Xt, yt), (Xv, yv) = splits["train"], splits["val"]
    print(f"machine: {machine()}\n{load()}\ndata: {source}, train {len(Xt)} x {Xt.shape[1]}, val {len(Xv)}")
    ours, theirs = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        s = featcache.fit_heads(splits, head="knn", k=ks, knn_voting="majority")
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scaler = StandardScaler().fit(Xt)
        St, Sv = scaler.transform(Xt), scaler.transform(Xv)
        ref = {k: KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(St, yt).predict(Sv)
               for k in ks}
        theirs.append(time.perf_counter() - t0)
    print(f"featcache k-NN sweep ({len(ks)} k, train/val/test scored): best {min(ours):.3f} s")
    print(f"scikit-learn, one fit+predict per k (val only):      best {min(theirs):.3f} s")
    print(f"ratio (scikit-learn / featcache): {min(theirs) / min(ours):.2f}x")
    for k in ks:
        c = next(c for c in s.candidates if c.row["k"] == k)
        with torch.no_grad():
            mean, scale = s.data.mean, s.data.scale
            pred = c.head(torch.from_numpy((Xv - mean) / scale)).argmax(1).numpy()
        print(f"  k={k:<3d} val accuracy featcache {np.mean(pred == yv):.4f}  scikit-learn "
              f"{np.mean(ref[k] == yv):.4f}  predictions differing: {int((pred != ref[k]).sum())} of {len(yv)}")


if __name__ == "__main__":
    main()
