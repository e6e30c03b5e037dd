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
    layers = _layers(attrs)
    if not layers:
        raise FeatcacheError(f"--layers: {path} records no layers (extract it with --layer a,b,c)")
    known = [r["name"] for r in layers]
    names = _aliased(names, known)
    for n in names:
        if n not in known:
            raise FeatcacheError(f"--layers: {path} has no layer {n!r}; it holds {', '.join(known)}")
    return np.concatenate([np.arange(r["start"], r["stop"]) for r in layers if r["name"] in names]).astype(np.int64)


def layer_set_label(names: tuple[str, ...] | None, attrs: dict) -> str | None:
    """The set as the leaderboard shows it: names in the cache's order, comma-joined."""
    if names is None:
        return None
    order = [r["name"] for r in _layers(attrs)]
    return ",".join(sorted(_aliased(names, order), key=order.index))


def _layers(attrs: dict) -> list[dict]:
    """The cache's layer records; a default-layer cache (no ``layers``) is its one layer."""
    layers = attrs.get("layers") or []
    if not layers and str(attrs.get("layer", "")).startswith("input of"):
        layers = [{"name": attrs["layer"], "start": 0, "stop": int(attrs["feature_dim"])}]
    return layers


def _aliased(names: tuple[str, ...], known: list[str]) -> tuple[str, ...]:
    """The default layer is recorded as "input of <classifier>", which `featcache layers` (and the
    docs) call pre_logits: that name reads it too."""
    default = next((n for n in known if n.startswith("input of")), None)
    return tuple(default if n == "pre_logits" and default else n for n in names)
