"""``featcache info``: what a cache holds, as a dict (``--json``) or as lines for people."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from featcache.cache.store import feature_shape, read_cache


def cache_info(path: str) -> dict:
    cache = read_cache(path, features=False)
    n, d = feature_shape(path)
    names = cache.class_names
    counts: dict[str, dict[str, int]] = {}
    for label, split in zip(cache.labels, cache.split):
        cls = names[label] if label >= 0 else "(unlabeled)"
        counts.setdefault(cls, Counter())[split] += 1
    return {
        "cache": str(path), "size_bytes": Path(path).stat().st_size, "n_images": n, "feature_dim": d,
        "classes": {c: dict(v) for c, v in counts.items()}, "splits": dict(Counter(cache.split.tolist())),
        "skipped": [{"path": p, "reason": r} for p, r in cache.skipped], "attrs": cache.attrs,
    }


def info_lines(info: dict) -> list[str]:
    a = info["attrs"]
    lines = [
        f"cache      {info['cache']} ({info['size_bytes'] / 1e6:.1f} MB, schema {a.get('schema_version')})",
        f"features   {info['n_images']} x {info['feature_dim']} {a.get('dtype')}",
        *([f"views      {a['n_views']} augmented per train image: crop scale {a['augment']['scale']}, flip "
             f"{a['augment']['hflip']}, rotate {a['augment']['rotate']}, seed {a['augment']['seed']}"]
          if a.get("n_views") else []),
        f"backbone   {a.get('backbone')}  weights={a.get('weights')}  layer={a.get('layer')}  pool={a.get('pool')}",
        *layer_lines(a.get("layers") or []),
        "splits     " + ", ".join(f"{s}={n}" for s, n in sorted(info["splits"].items())),
        f"classes    {len(info['classes'])}",
    ]
    for cls, per in info["classes"].items():
        lines.append(f"  {cls:<24} " + "  ".join(f"{s}={n}" for s, n in sorted(per.items())))
    lines.append(f"skipped    {len(info['skipped'])}")
    for s in info["skipped"][:10]:
        lines.append(f"  {s['path']}: {s['reason']}")
    lines.append("attributes")
    for key in sorted(a):
        if key not in ("class_names", "layers"):
            lines.append(f"  {key}: {a[key]}")
    return lines


def layer_lines(layers: list[dict]) -> list[str]:
    """One line per stored layer: its columns [start, stop) of /features, shape and reduction."""
    if not layers:  # caches written before layers were recorded
        return []
    width = max(len(str(r["name"])) for r in layers)
    return [f"layers     {len(layers)}, columns of /features:"] + [
        f"  {r['name']:<{width}}  [{r['start']}:{r['stop']})  {'x'.join(map(str, r['shape']))} pool={r['pool']}"
        for r in layers]
