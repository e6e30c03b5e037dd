"""Score a saved head on a cache, after checking that the two belong together.

A head is only meaningful on features from the backbone, layer, pooling, preprocessing and class
list it was trained on; ``check_head_cache`` refuses any mismatch with one clear line.
"""
from __future__ import annotations

import numpy as np
import torch

from featcache.cache.store import FeatureCache, read_cache
from featcache.pipeline.heads.data import labeled_split_rows
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.headio import StandardizedHead, input_dim, load_head
from featcache.pipeline.heads.metrics import score


def check_head_cache(meta: dict, cache: FeatureCache, head_path: str) -> None:
    """Raise FeatcacheError unless the head was trained on features like this cache's."""
    dim = int(cache.attrs.get("feature_dim", -1))
    if input_dim(meta) != dim:
        raise FeatcacheError(f"{head_path} expects {input_dim(meta)}-d features but {cache.path} has {dim}-d")
    if list(meta["class_names"]) != cache.class_names:
        raise FeatcacheError(
            f"{head_path} was trained on classes {meta['class_names']} but {cache.path} has {cache.class_names}"
        )
    if meta.get("cache_fingerprint") != cache.fingerprint:
        raise FeatcacheError(
            f"{head_path} was trained on a cache with another fingerprint (backbone, weights, layer, pool or "
            f"preprocessing differ) than {cache.path}"
        )


def run_evaluate(head_path: str, cache_path: str, device: str = "auto") -> dict:
    """Accuracy and loss of a saved head on every split of a matching cache."""
    head, meta = load_head(head_path)
    cache = read_cache(cache_path)
    check_head_cache(meta, cache, head_path)
    model = StandardizedHead.from_metadata(head, meta)
    dev = resolve_device(device)
    X = torch.from_numpy(cache.features.astype(np.float32)).to(dev)
    y = torch.from_numpy(cache.labels).to(dev)
    out: dict = {"head": str(head_path), "cache": str(cache_path)}
    for split, idx in labeled_split_rows(cache.split, cache.labels).items():
        rows = torch.as_tensor(idx, device=dev)
        s = score(model, X[rows], y[rows])
        if s:
            out[f"{split}_accuracy"], out[f"{split}_loss"], out[f"n_{split}"] = s["accuracy"], s["loss"], len(rows)
    return out
