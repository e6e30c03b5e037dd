"""``fit-head --layers b,c``: train on some of a multi-layer cache's layers, without re-extracting.

A multi-layer cache (``extract --layer a,b,c``) records each layer's column range of /features in
its ``layers`` attribute; a layer set picks those columns, in the cache's order. Each set is one
more swept option: its configurations get their own standardisation statistics, and the saved head
records the columns it reads, so predict/export/evaluate feed it exactly those.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from featcache.pipeline.errors import FeatcacheError


def parse_layer_sets(values: str | Iterable) -> tuple[tuple[str, ...], ...]:
    """``"b,c"`` or ``["c", "b,c"]`` or ``[["c"], ["b", "c"]]`` -> (("c",), ("b", "c")); () = all columns."""
    if isinstance(values, str):
        values = [values]
    sets = []
    for v in values:
        names = tuple(n.strip() for n in (v.split(",") if isinstance(v, str) else v) if str(n).strip())
        if not names:
            raise FeatcacheError(f"--layers {v!r} names no layer")
        if len(set(names)) != len(names):
            raise FeatcacheError(f"--layers {','.join(names)} names a layer more than once")
        sets.append(names)
    return tuple(dict.fromkeys(sets))


def layer_columns(attrs: dict, names: tuple[str, ...], path) -> np.ndarray:
    """Column indices of ``names`` in the cache's /features, in the cache's layer order.

    Args:
        attrs: the cache's attributes (its ``layers`` list: name, start, stop per layer).
        names: the layer set.
        path: the cache, for messages.
    Returns:
        (K,) int64 column indices.
    """
    layers = attrs.get("layers") or []
    if not layers:
        raise FeatcacheError(f"--layers: {path} records no layers (extract it with --layer a,b,c)")
    known = [r["name"] for r in layers]
    for n in names:
        if n not in known:
            raise FeatcacheError(f"--layers: {path} has no layer {n!r}; it holds {', '.join(known)}")
    return np.concatenate([np.arange(r["start"], r["stop"]) for r in layers if r["name"] in names]).astype(np.int64)


def layer_set_label(names: tuple[str, ...] | None, attrs: dict) -> str | None:
    """The set as the leaderboard shows it: names in the cache's order, comma-joined."""
    if names is None:
        return None
    order = [r["name"] for r in attrs.get("layers") or []]
    return ",".join(sorted(names, key=order.index))
