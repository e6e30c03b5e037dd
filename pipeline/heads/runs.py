"""``featcache runs EXPERIMENTS_DIR``: every fit-head run below a folder, as one comparable table.

A run is a folder holding a fit-head metrics.json; runs over different caches (backbones, layers)
and heads sit side by side, so the question "which backbone + head is best" is one command.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from featcache.pipeline.config import HeadConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.report import fmt, table

RUN_REQUIRED = ("val_accuracy", "train_accuracy", "config")  # what makes a metrics.json a fit-head run
SORTS = {"val": "val_accuracy", "test": "test_accuracy", "train": "train_accuracy"}


def _best(m: dict, cfg: HeadConfig) -> str:
    """The winning configuration in a few words, as its head kind says it."""
    from featcache.pipeline.heads import kinds

    try:
        return kinds.get(m.get("winner_kind") or cfg.head).label(m.get("params") or {})
    except (FeatcacheError, KeyError, TypeError, ValueError):  # a run of an unknown kind, or damaged params
        return "?"


def _row(root: Path, path: Path, m: dict, cfg: HeadConfig) -> dict:
    info = m.get("backbone_info") or {}
    return {
        "run": str(path.parent.relative_to(root)) if path.parent != root else ".",
        "backbone": m.get("backbone") or info.get("backbone"), "weights": info.get("weights"),
        "layer": info.get("layer"), "feature_dim": info.get("feature_dim"),
        "cache": cfg.cache, "head": cfg.head,
        "best": _best(m, cfg), "n_configs": m.get("n_configs", 1), "search": m.get("search", "grid"),
        "best_epoch": m.get("best_epoch"), "refit": "refit" in m,
        "train_accuracy": m.get("train_accuracy"), "val_accuracy": m.get("val_accuracy"),
        "test_accuracy": m.get("test_accuracy"), "n_train": m.get("n_train"), "n_val": m.get("n_val"),
        "n_test": m.get("n_test"), "seconds": m.get("seconds"),
        "cv_folds": cfg.cv or None, "cv_accuracy_mean": (m.get("cv") or {}).get("cv_accuracy_mean"),
        "cv_accuracy_std": (m.get("cv") or {}).get("cv_accuracy_std"),
        "train_sizes": ",".join("all" if v == 0 else str(v) for v in cfg.train_sizes) or None,
        "views_keep_original": cfg.views_keep_original,
        "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime)),
    }


def find_runs(root: str | Path, sort: str = "val") -> dict:
    """Every fit-head metrics.json below ``root`` as rows, best first by ``sort`` (val|test|train|run);
    JSON files that are not fit-head runs are listed under ``skipped`` with the reason."""
    root = Path(root)
    if not root.exists():
        raise FeatcacheError(f"experiments folder not found: {root}")
    if not root.is_dir():
        raise FeatcacheError(f"{root} is not a folder (give the folder that holds run folders)")
    if sort not in (*SORTS, "run"):
        raise FeatcacheError(f"unknown --sort {sort!r}: choose from {', '.join([*SORTS, 'run'])}")
    runs, skipped = [], []
    for path in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
            continue  # a save's temporary or replaced folder (.RUN.tmp-PID, .RUN.old-PID), never a run
        try:
            m = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skipped.append({"path": str(path), "reason": f"unreadable ({type(e).__name__})"})
            continue
        try:  # a finetune FT_DIR's metrics.json has another config: not a fit-head run
            cfg = HeadConfig.from_dict(m["config"]) if isinstance(m, dict) and all(k in m for k in RUN_REQUIRED) else None
        except FeatcacheError:
            cfg = None
        if cfg is None:
            skipped.append({"path": str(path), "reason": "not a fit-head metrics.json"})
            continue
        runs.append(_row(root, path, m, cfg))
    if sort in SORTS:  # best first, runs without that score last, ties by folder name
        key = SORTS[sort]
        runs.sort(key=lambda r: (r[key] is None, -(r[key] or 0.0), r["run"]))
    return {"experiments_dir": str(root), "sort": sort, "runs": runs, "skipped": skipped}


def _cv(r: dict) -> str:
    """Mean ± std of the winner's held-out fold accuracies, "-" for a run without --cv."""
    if r["cv_accuracy_mean"] is None:
        return "-"
    return f"{r['cv_accuracy_mean']:.4f}±{r['cv_accuracy_std']:.3f} ({r['cv_folds']}-fold)"


def runs_lines(data: dict) -> list[str]:
    """The comparison table for people, plus one line per skipped file."""
    runs = data["runs"]
    if not runs:
        lines = [f"no fit-head runs (metrics.json) under {data['experiments_dir']}"]
    else:
        cols = ["run", "backbone", "dim", "cache", "head", "configs", "best", "cv_acc", "train_acc", "val_acc",
                "test_acc", "seconds"]
        body = [[r["run"], str(r["backbone"] or "-"), fmt(r["feature_dim"]),
                 Path(r["cache"]).name if r["cache"] else "(arrays)",
                 r["head"] + (" +refit" if r["refit"] else ""), str(r["n_configs"]), r["best"], _cv(r),
                 fmt(r["train_accuracy"], "accuracy"), fmt(r["val_accuracy"], "accuracy"),
                 fmt(r["test_accuracy"], "accuracy"), fmt(r["seconds"], "seconds")] for r in runs]
        lines = table(cols, body, left=("run", "backbone", "cache", "head", "best"))
        lines.append(f"{len(runs)} run(s) under {data['experiments_dir']}, sorted by "
                     + ("folder" if data["sort"] == "run" else f"{data['sort']} accuracy"))
    lines += [f"skipped {s['path']}: {s['reason']}" for s in data["skipped"]]
    return lines
