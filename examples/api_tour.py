"""The Python API, notebook style, on the make-demo digits (its output is pasted in the README).

    python examples/api_tour.py [--out demo-out]

Each block below is one notebook cell: extract once, open the cache, sweep heads in memory, save
the winner, load it back, predict, and put a HeadClassifier into scikit-learn's GridSearchCV.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from digits_demo import write_digits  # examples/ is on sys.path when this file runs
from sklearn.model_selection import GridSearchCV

import featcache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out")
    out = Path(ap.parse_args().out)
    if not (out / "digits").exists():
        write_digits(out / "digits", scale=4)

    print(">>> r = featcache.extract('demo-out/digits', 'demo-out/digits.h5', backbone='efficientnet_lite0')")
    r = featcache.extract(out / "digits", out / "digits.h5", backbone="efficientnet_lite0")
    print(f"{r.n_images} images x {r.feature_dim} features: extracted {r.extracted}, reused {r.reused}, "
          f"{r.seconds:.1f}s")

    print(">>> cache = featcache.open_cache('demo-out/digits.h5'); X, y = cache.arrays('train')")
    cache = featcache.open_cache(out / "digits.h5")
    X, y = cache.arrays("train")
    print(cache)
    print(X.shape, X.dtype, y.shape, cache.class_names[:3], "...")

    print(">>> sweep = featcache.fit_heads(cache, head='mlp', hidden=[256, 512], dropout=[0.2, 0.5])")
    t0 = time.perf_counter()
    sweep = featcache.fit_heads(cache, head="mlp", hidden=[256, 512], dropout=[0.2, 0.5])
    print(f"({time.perf_counter() - t0:.1f}s, nothing written)")
    print(">>> sweep.leaderboard.to_pandas()[[...]]")
    cols = ["rank", "hidden", "dropout", "best_epoch", "val_accuracy", "test_accuracy", "seconds"]
    print(sweep.leaderboard.to_pandas()[cols].to_string(index=False))
    print(">>> sweep.plot_curves()  # a matplotlib Figure: shown inline in a notebook")
    print(type(sweep.plot_curves()).__name__)
    print(">>> sweep.save('demo-out/runs/api-mlp')")
    print(sweep.save(out / "runs" / "api-mlp"))

    print(">>> model = featcache.load('demo-out/runs/api-mlp')")
    model = featcache.load(out / "runs" / "api-mlp")
    Xt, yt = cache.arrays("test")
    acc = np.mean(model.predict_features(Xt) == yt)  # class indices, as cache.arrays() returns them
    print(f">>> (model.predict_features(Xt) == yt).mean()\n{acc:.4f}")
    first = out / "digits" / cache.paths("test")[0]
    print(f">>> model.predict(['{first.relative_to(out.parent) if out.is_absolute() else first}'], top_k=2)")
    print(model.predict([first], top_k=2))

    print(">>> GridSearchCV(featcache.HeadClassifier(), {'weight_decay': [1e-4, 1e-2], 'lr': [1e-3, 1e-2]}, cv=5)")
    t0 = time.perf_counter()
    grid = GridSearchCV(featcache.HeadClassifier(), {"weight_decay": [1e-4, 1e-2], "lr": [1e-3, 1e-2]}, cv=5)
    grid.fit(X, y)
    print(f"best {grid.best_params_}, 5-fold accuracy {grid.best_score_:.4f} ({time.perf_counter() - t0:.1f}s)")
    print(f">>> grid.score(Xt, yt)\n{grid.score(Xt, yt):.4f}")


if __name__ == "__main__":
    main()
