"""Tiny feature caches written straight from numpy (no images, no CNN) for the fit-head sweep tests.

Features are Gaussian blobs around one centre per class, so a linear head separates them well and
every test runs in well under a second of training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from featcache.cache.store import CacheWriter


def write_cache(path: Path, n_per_class: dict[str, int | list[int]] | None = None, dim: int = 16, classes: int = 3,
                sep: float = 3.0, seed: int = 0, backbone: str = "synthetic") -> Path:
    """A complete schema-1 cache: ``n_per_class`` rows per class in each split (train/val/test),
    the same number for every class or a list of one count per class (imbalanced classes)."""
    n_per_class = n_per_class or {"train": 40, "val": 15, "test": 15}
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, sep, (classes, dim))
    labels, splits = [], []
    for split, n in n_per_class.items():
        for c in range(classes):
            count = n[c] if isinstance(n, (list, tuple)) else n
            labels += [c] * count
            splits += [split] * count
    y = np.array(labels, dtype=np.int64)
    X = (centres[y] + rng.normal(0.0, 1.0, (len(y), dim))).astype(np.float32)
    names = [f"class{c}" for c in range(classes)]
    w = CacheWriter(path, len(y), dim, "float32")
    w.write_features(np.arange(len(y)), X)
    w.write_columns({"labels": y, "paths": [f"{s}/{names[c]}/{i}.png" for i, (s, c) in enumerate(zip(splits, y))],
                     "split": splits, "file_size": np.zeros(len(y), np.int64),
                     "file_mtime_ns": np.zeros(len(y), np.int64), "file_sha256": [""] * len(y)})
    w.finish({"fingerprint": f"synthetic-{seed}-{dim}", "class_names": names, "backbone": backbone,
              "weights": "none", "layer": "synthetic", "pool": "avg", "preprocess": "none",
              "dtype": "float32", "feature_dim": dim, "n_images": len(y)}, [])
    return path


def run_cli(*args) -> tuple[int, str, str]:
    """``featcache ARGS`` in-process: (exit code, stdout, stderr)."""
    from featcache import cli

    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def fit(cache: Path, out: Path, *args) -> dict:
    """Run fit-head with ``--json`` and return its summary (fails the test on a non-zero exit)."""
    code, stdout, stderr = run_cli("fit-head", cache, "-o", out, "--device", "cpu", "--json", *args)
    assert code == 0, stderr
    return json.loads(stdout)
