"""Score a saved head on a cache, after checking that the two belong together.

A head is only meaningful on features from the backbone, layer, pooling, preprocessing and class
list it was trained on; ``check_head_cache`` refuses any mismatch with one clear line. The features
are streamed split by split in chunks (heads/stream.py): evaluate holds a few chunks and the
(N, C) probabilities, never the matrix, whatever the cache's size.
"""
from __future__ import annotations

import torch

from featcache.cache.store import FeatureCache, read_cache
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.data import labeled_split_rows
from featcache.pipeline.heads.headio import StandardizedHead, input_dim, load_head
from featcache.pipeline.heads.metrics import per_class, predict_proba, proba_scores
from featcache.pipeline.heads.stream import H5Rows, file_identity


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
    cache = read_cache(cache_path, features=False)
    check_head_cache(meta, cache, head_path)
    model = StandardizedHead.from_metadata(head, meta)
    dev = resolve_device(device)
    identity = file_identity(cache.path)
    y = torch.from_numpy(cache.labels).to(dev)
    out: dict = {"head": str(head_path), "cache": str(cache_path)}
    # a folder without train/val/test sub-folders puts every row in "train": say "all", not "train"
    no_splits = not any(p.startswith(("train/", "val/", "test/")) for p in cache.paths)
    for split, idx in labeled_split_rows(cache.split, cache.labels).items():
        split = "all" if no_splits and split == "train" else split
        if not len(idx):
            continue
        X = H5Rows(cache.path, idx, device=dev, identity=identity)
        proba, yi = predict_proba(model, X), y[torch.as_tensor(idx, device=dev)]
        s = proba_scores(proba, yi)
        out.update({f"{split}_{m}": s[m] for m in ("accuracy", "loss", "balanced_accuracy", "macro_f1")})
        out[f"n_{split}"] = len(idx)
        out[f"{split}_per_class"] = per_class(yi.cpu().numpy(), proba.argmax(1).cpu().numpy(),
                                              list(meta["class_names"]))
    return out
