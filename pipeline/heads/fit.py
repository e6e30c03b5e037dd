"""``featcache fit-head``: cache -> configurations -> stacked training -> best head, metrics, files.

RUN_DIR receives head.pt (the winner, or its refit), metrics.json, leaderboard.json/.csv (every
configuration, best first) and the PNG plots of pipeline/plots.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.cache.store import read_cache
from featcache.pipeline.config import HeadConfig
from featcache.pipeline.heads.data import Prepared, prepare
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.headio import save_head
from featcache.pipeline.heads.leaderboard import logreg_row, rank, rank_key, torch_row, write_leaderboard
from featcache.pipeline.heads.logreg import fit_logreg
from featcache.pipeline.heads.metrics import score
from featcache.pipeline.heads.optim import OPTIMIZERS
from featcache.pipeline.heads.sweep import c_values, check_search, configurations, expand, swept
from featcache.pipeline.heads.train import HeadParams, TrainSettings, train_many

HEADS = ("linear", "mlp", "logreg")
__all__ = ["HEADS", "check_config", "expand", "rank_key", "run_fit_head"]


@dataclass
class Candidate:
    """One trained configuration: its leaderboard row, its head and what is needed to retrain it."""

    row: dict
    head: nn.Sequential
    history: list[dict] = field(default_factory=list)  # per epoch; empty for logreg
    params: HeadParams | None = None  # None for logreg (its C is in the row)


def check_config(cfg: HeadConfig) -> None:
    """One-line errors for option values no configuration could train with."""
    if cfg.head not in HEADS:
        raise FeatcacheError(f"unknown head {cfg.head!r}: choose from {', '.join(HEADS)}")
    check_search(cfg)
    for opt in cfg.optimizer:
        if opt not in OPTIMIZERS:
            raise FeatcacheError(f"unknown optimizer {opt!r}: choose from {', '.join(OPTIMIZERS)}")
    bad = [f"--dropout {d}" for d in cfg.dropout if not 0 <= d < 1] + [f"--lr {v}" for v in cfg.lr if v <= 0]
    bad += [f"--weight-decay {v}" for v in cfg.weight_decay if v < 0] + [f"--l1 {v}" for v in cfg.l1 if v < 0]
    bad += [f"--momentum {v}" for v in cfg.momentum if not 0 <= v < 1] + [f"--C {v}" for v in cfg.C if v <= 0]
    bad += [f"--hidden {h}" for hs in cfg.hidden for h in hs if h < 1]
    if cfg.epochs < 1 or cfg.batch_size < 1:
        bad.append("--epochs and --batch-size must be at least 1")
    if cfg.batchnorm and cfg.batch_size < 2 and cfg.head == "mlp":
        bad.append("--batchnorm needs --batch-size of at least 2 (batch norm cannot normalise one row)")
    if bad:
        raise FeatcacheError(f"invalid value: {bad[0]}")
    lists = (cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer, cfg.lr, cfg.momentum, cfg.hidden, cfg.C)
    if not all(len(v) for v in lists):
        raise FeatcacheError("every swept option needs at least one value")


def _val(data: Prepared) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    Xv, yv = data.split("val")
    return (Xv, yv) if len(Xv) else (None, None)


def _train_torch(cfg: HeadConfig, data: Prepared) -> list[Candidate]:
    params = configurations(cfg)
    results = train_many(params, *data.split("train"), *_val(data), len(data.class_names),
                         TrainSettings(cfg.epochs, cfg.batch_size, cfg.patience), data.views_of(data.rows["train"]))
    return [Candidate(torch_row(i, r, data), r.head, r.history, r.params) for i, r in enumerate(results)]


def _with_views(X: torch.Tensor, y: torch.Tensor, views: torch.Tensor | None):
    """logreg has no epochs to sample views in: it fits the rows plus all their views as extra rows,
    each weighted 1/(1+V) so the data term (a sum over rows in sklearn) keeps its scale and C means
    what it means without views. Returns (X, y, sample_weight or None)."""
    if views is None:
        return X, y, None
    k = 1 + views.shape[1]
    return (torch.cat([X, views.reshape(-1, X.shape[1])]), torch.cat([y, y.repeat_interleave(views.shape[1])]),
            np.full(len(y) * k, 1.0 / k))


def _train_logreg(cfg: HeadConfig, data: Prepared) -> list[Candidate]:
    X, y, weights = _with_views(*data.split("train"), data.views_of(data.rows["train"]))
    results = fit_logreg(c_values(cfg), X, y, len(data.class_names), cfg.seed, weights)
    return [Candidate(logreg_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]


def _refit(cfg: HeadConfig, data: Prepared, best: Candidate) -> tuple[nn.Sequential, dict]:
    """Retrain the winner's exact configuration on train+val (its best epoch count, no early
    stopping; logreg: its C) and score it. Standardisation keeps the train-only statistics."""
    t0 = time.perf_counter()
    rows = np.sort(np.concatenate([data.rows["train"], data.rows["val"]]))
    idx = torch.as_tensor(rows, device=data.X.device)
    X, y = data.X[idx], data.y[idx]
    n_classes = len(data.class_names)
    views = data.views_of(rows)
    if best.params is None:
        Xr, yr, weights = _with_views(X, y, views)
        head = fit_logreg([best.row["C"]], Xr, yr, n_classes, cfg.seed, weights)[0].head
        epochs = None
    else:
        epochs = best.row["best_epoch"]
        head = train_many([best.params], X, y, None, None, n_classes,
                          TrainSettings(epochs, cfg.batch_size, patience=0), views)[0].head
    fitted, test = score(head, X, y), score(head, *data.split("test"))
    info = {"n_rows": len(rows), "epochs": epochs, "train_val_accuracy": fitted["accuracy"],
            "train_val_loss": fitted["loss"], "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
            "seconds": round(time.perf_counter() - t0, 3)}
    return head, info


def _head_metadata(cfg: HeadConfig, best: Candidate, data: Prepared, cache) -> dict:
    p = best.params or HeadParams()  # logreg: a linear head without dropout or batch norm
    return {
        "in_dim": int(data.X.shape[1]), "n_classes": len(data.class_names), "hidden": list(p.hidden),
        "batchnorm": p.batchnorm, "dropout": p.dropout, "class_names": data.class_names,
        "standardize": None if data.mean is None else {"mean": data.mean.tolist(), "scale": data.scale.tolist()},
        "cache": str(cfg.cache), "cache_fingerprint": cache.fingerprint, "backbone": _backbone(cache),
        "extract_config": cache.attrs.get("config"),  # predict/export/finetune rebuild the backbone from it
        "config": asdict(cfg), "head_type": cfg.head,
        "params": asdict(best.params) if best.params else {"C": best.row["C"]},
        "best_epoch": best.row.get("best_epoch"), "refit": cfg.refit, "augmented": _augmented(cache, data),
    }


def _augmented(cache, data: Prepared) -> dict:
    """What the training rows were: views sampled per epoch, or the un-augmented features."""
    if data.views is None:
        return {"used": False, "views_in_cache": cache.n_views}
    n_train = len(data.rows["train"])
    with_views = int((data.view_pos[data.rows["train"]] >= 0).sum())
    return {"used": True, "views_in_cache": cache.n_views, "train_rows_with_views": with_views,
            "train_rows": n_train, "augment": cache.attrs.get("augment"),
            "augment_fingerprint": cache.attrs.get("augment_fingerprint")}


def _backbone(cache) -> dict:
    return {k: cache.attrs.get(k) for k in ("backbone", "weights", "layer", "pool", "preprocess", "feature_dim")}


def _plots(out: Path, cfg: HeadConfig, ranked: list[dict], by_index: dict[int, Candidate], head: nn.Sequential,
           data: Prepared) -> list[str]:
    from featcache.pipeline.heads import plots  # matplotlib is imported only when pictures are asked for
    from featcache.pipeline.heads.metrics import confusion

    best = by_index[ranked[0]["index"]]
    files = []
    if best.history:
        files.append(plots.training_curves(best.history, out / "curves.png", f"best head: {_label(best.row)}",
                                           best.row["best_epoch"]))
        curves = [(_label(r), by_index[r["index"]].history) for r in ranked]
        files.append(plots.weight_norm_curves(curves, out / "weight_norm.png"))
    split = "test" if len(data.rows["test"]) else "val"
    X, y = data.split(split)
    if len(X):
        title = f"{split} split, {'refit of ' if cfg.refit else ''}best head\n{_label(best.row)}"
        files.append(plots.confusion_plot(confusion(head, X, y, len(data.class_names)), data.class_names,
                                          out / "confusion.png", title))
    fields = swept(ranked)
    if fields:
        metric = "val_accuracy" if ranked[0].get("val_accuracy") is not None else "train_accuracy"
        files.append(plots.sweep_plot(ranked, fields, out / "sweep.png", metric))
    return files


def _label(row: dict) -> str:
    """Short description of a configuration for legends: the swept-looking values."""
    if row["head"] == "logreg":
        return f"logreg C={row['C']:g}"
    arch = "linear" if row["hidden"] == "0" else f"mlp {row['hidden']}"
    return f"{arch} {row['optimizer']} lr={row['lr']:g} wd={row['weight_decay']:g} l1={row['l1']:g}" + (
        f" do={row['dropout']:g}" if row["hidden"] != "0" else "")


def run_fit_head(cfg: HeadConfig, progress: bool = True) -> dict:
    """Train every configuration, save the best head, metrics, leaderboard and plots; return the summary."""
    t0 = time.perf_counter()
    check_config(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"run folder {out} exists and is not a folder")
    cache = read_cache(cfg.cache)
    device = resolve_device(cfg.device)
    if cfg.use_augmented and not cache.n_views:
        raise FeatcacheError(f"--use-augmented: {cfg.cache} has no augmented views (extract with --augment N)")
    use_views = cache.n_views > 0 and cfg.use_augmented is not False
    data = prepare(cache, cfg.val_fraction, cfg.seed, cfg.standardize, device, use_views, val_views=cfg.refit)
    if cfg.refit and not len(data.rows["val"]):
        raise FeatcacheError("--refit retrains on train+val, but this run has no validation split (--val-fraction 0)")
    candidates = _train_logreg(cfg, data) if cfg.head == "logreg" else _train_torch(cfg, data)
    ranked = rank([c.row for c in candidates])
    by_index = {c.row["index"]: c for c in candidates}
    best = by_index[ranked[0]["index"]]
    win = ranked[0]
    head, refit = _refit(cfg, data, best) if cfg.refit else (best.head, None)
    out.mkdir(parents=True, exist_ok=True)
    save_head(out / "head.pt", head, _head_metadata(cfg, best, data, cache))
    files = ["head.pt", "metrics.json", *write_leaderboard(out, ranked)]
    if cfg.plots:
        files += _plots(out, cfg, ranked, by_index, head, data)
    metrics = {
        "head": cfg.head, **{k: win.get(k) for k in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss",
                                                      "val_loss", "test_loss", "best_epoch", "epochs_run")},
        "history": best.history, "params": asdict(best.params) if best.params else {"C": win["C"]},
        "config": asdict(cfg), "search": cfg.search, "n_configs": len(candidates),
        "n_train": len(data.rows["train"]), "n_val": len(data.rows["val"]), "n_test": len(data.rows["test"]),
        "val_source": data.val_source, "class_names": data.class_names, "cache": str(cfg.cache),
        "cache_fingerprint": cache.fingerprint, "backbone": cache.attrs.get("backbone"),
        "backbone_info": _backbone(cache), "device": str(device), "files": files,
        "augmented": _augmented(cache, data),
    }
    if refit is not None:
        metrics.update(refit=refit, test_accuracy_before_refit=win.get("test_accuracy"),
                       test_accuracy=refit["test_accuracy"], test_loss=refit["test_loss"])
    if metrics["test_accuracy"] is None:
        for key in ("test_accuracy", "test_loss", "test_accuracy_before_refit"):
            metrics.pop(key, None)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"run_dir": str(out), **{k: v for k, v in metrics.items() if k != "history"}, "leaderboard": ranked}
