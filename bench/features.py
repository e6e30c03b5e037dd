"""Synthetic CNN-like features for the head benchmarks, in memory or written as a featcache cache.

Real pooled CNN features are non-negative (post-ReLU), correlated (low-rank class structure) and
noisy. These mimic that: class centres in a 64-d latent space, a random linear map to D dims, a
ReLU and per-dimension noise, tuned so a linear probe lands well short of 100% (regularisation and
learning rate then matter, as they do on real data).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.cache.store import CacheWriter, FeatureCache

LATENT = 64


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (n, dim) float32 >= 0 and balanced labels y (n,) int64."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % classes
    rng.shuffle(y)
    centres = rng.normal(0.0, 0.45, (classes, LATENT)).astype(np.float32)
    z = centres[y] + rng.standard_normal((n, LATENT), dtype=np.float32)
    proj = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    X = z @ proj
    X += rng.standard_normal((n, dim), dtype=np.float32)
    np.maximum(X, 0.0, out=X)  # post-ReLU, like pooled CNN activations
    return X, y


def as_cache(X: np.ndarray, y: np.ndarray, path: str = "synthetic") -> FeatureCache:
    """An in-memory FeatureCache (all rows in the train split) for featcache.pipeline.heads.data.prepare."""
    classes = int(y.max()) + 1
    return FeatureCache(path=Path(path), attrs={"class_names": [f"c{i}" for i in range(classes)],
                                                "fingerprint": "synthetic", "backbone": "synthetic"},
                        labels=y, paths=[f"{i}.png" for i in range(len(y))],
                        split=np.full(len(y), "train", dtype=object), features=X)


def write_cache(path: Path, X: np.ndarray, y: np.ndarray, split: np.ndarray | None = None) -> Path:
    """Write X, y as a complete schema-1 cache file (split: per-row train/val/test, default train)."""
    n, dim = X.shape
    split = np.full(n, "train", dtype=object) if split is None else split
    names = [f"c{i}" for i in range(int(y.max()) + 1)]
    w = CacheWriter(path, n, dim, "float32")
    w.write_features(np.arange(n), X)
    w.write_columns({"labels": y, "paths": [f"{s}/{names[c]}/{i}.png" for i, (s, c) in enumerate(zip(split, y))],
                     "split": list(split), "file_size": np.zeros(n, np.int64),
                     "file_mtime_ns": np.zeros(n, np.int64), "file_sha256": [""] * n})
    w.finish({"fingerprint": f"synthetic-{n}x{dim}", "class_names": names, "backbone": "synthetic",
              "weights": "none", "layer": "synthetic", "pool": "avg", "preprocess": "none", "dtype": "float32",
              "feature_dim": dim, "n_images": n}, [])
    return path
