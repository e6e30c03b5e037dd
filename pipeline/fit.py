"""``featcache fit-head``: cache -> configurations -> stacked training -> best head, metrics, files."""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cache.store import read_cache
from pipeline.config import HeadConfig
from pipeline.data import Prepared, prepare
from pipeline.device import resolve_device
from pipeline.errors import FeatcacheError
from pipeline.headio import save_head
from pipeline.metrics import score
from pipeline.optim import OPTIMIZERS
from pipeline.train import FitResult, HeadParams, TrainSettings, train_many

HEADS = ("linear", "mlp")


def check_config(cfg: HeadConfig) -> None:
    if cfg.head not in HEADS:
        raise FeatcacheError(f"unknown head {cfg.head!r}: choose from {', '.join(HEADS)}")
    for opt in cfg.optimizer:
        if opt not in OPTIMIZERS:
            raise FeatcacheError(f"unknown optimizer {opt!r}: choose from {', '.join(OPTIMIZERS)}")
    bad = [f"--dropout {d}" for d in cfg.dropout if not 0 <= d < 1] + [f"--lr {v}" for v in cfg.lr if v <= 0]
    bad += [f"--weight-decay {v}" for v in cfg.weight_decay if v < 0] + [f"--l1 {v}" for v in cfg.l1 if v < 0]
    bad += [f"--momentum {v}" for v in cfg.momentum if not 0 <= v < 1]
    bad += [f"--hidden {h}" for hs in cfg.hidden for h in hs if h < 1]
    if cfg.epochs < 1 or cfg.batch_size < 1:
        bad.append("--epochs and --batch-size must be at least 1")
    if bad:
        raise FeatcacheError(f"invalid value: {bad[0]}")
    if not all(len(v) for v in (cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer, cfg.lr, cfg.momentum, cfg.hidden)):
        raise FeatcacheError("every swept option needs at least one value")


def expand(cfg: HeadConfig) -> list[HeadParams]:
    """The grid of configurations; values that cannot matter (dropout of a linear head, momentum
    of Adam) are normalised so that the grid holds no duplicates."""
    hiddens = [()] if cfg.head == "linear" else list(dict.fromkeys(cfg.hidden))
    out: dict[HeadParams, None] = {}
    for h, d, wd, l1, opt, lr, mom in itertools.product(
            hiddens, cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer, cfg.lr, cfg.momentum):
        out[HeadParams(hidden=tuple(h), dropout=d if h else 0.0, batchnorm=cfg.batchnorm and bool(h),
                       weight_decay=wd, l1=l1, optimizer=opt, lr=lr,
                       momentum=mom if opt == "sgd" else 0.0, seed=cfg.seed)] = None
    return list(out)


def rank_key(r: dict) -> tuple:
    """Best first: highest val accuracy, then lowest val loss, then the earlier configuration."""
    return (-(r["val_accuracy"] if r["val_accuracy"] is not None else -1.0),
            r["val_loss"] if r["val_loss"] is not None else float("inf"), r["index"])


def summarise(i: int, res: FitResult, data: Prepared) -> dict:
    """One leaderboard row: hyperparameters, best epoch, train/val/test scores, seconds."""
    row = {"index": i, **asdict(res.params), "hidden": ",".join(map(str, res.params.hidden)) or "0",
           "best_epoch": res.best_epoch, "epochs_run": len(res.history), "seconds": round(res.seconds, 4)}
    for split in ("train", "val", "test"):
        s = score(res.head, *data.split(split))
        row[f"{split}_accuracy"] = s.get("accuracy")
        row[f"{split}_loss"] = s.get("loss")
    return row


def head_metadata(cfg: HeadConfig, res: FitResult, data: Prepared, cache) -> dict:
    return {
        "in_dim": int(data.X.shape[1]), "n_classes": len(data.class_names), "hidden": list(res.params.hidden),
        "batchnorm": res.params.batchnorm, "dropout": res.params.dropout, "class_names": data.class_names,
        "standardize": None if data.mean is None else {"mean": data.mean.tolist(), "scale": data.scale.tolist()},
        "cache": str(cfg.cache), "cache_fingerprint": cache.fingerprint,
        "backbone": {k: cache.attrs.get(k) for k in ("backbone", "weights", "layer", "pool", "preprocess", "feature_dim")},
        "config": asdict(cfg), "params": asdict(res.params), "best_epoch": res.best_epoch,
    }


def run_fit_head(cfg: HeadConfig, progress: bool = True) -> dict:
    """Train every configuration, save the best head and metrics; return the summary."""
    t0 = time.perf_counter()
    check_config(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"run folder {out} exists and is not a folder")
    cache = read_cache(cfg.cache)
    device = resolve_device(cfg.device)
    data = prepare(cache, cfg.val_fraction, cfg.seed, cfg.standardize, device)
    params = expand(cfg)
    Xv, yv = data.split("val")
    results = train_many(params, *data.split("train"), Xv if len(Xv) else None, yv if len(yv) else None,
                         len(data.class_names), TrainSettings(cfg.epochs, cfg.batch_size, cfg.patience))
    rows = sorted((summarise(i, r, data) for i, r in enumerate(results)), key=rank_key)
    best = results[rows[0]["index"]]
    out.mkdir(parents=True, exist_ok=True)
    save_head(out / "head.pt", best.head, head_metadata(cfg, best, data, cache))
    metrics = {
        **{k: rows[0][k] for k in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss",
                                   "test_loss", "best_epoch", "epochs_run")},
        "history": best.history, "params": asdict(best.params), "config": asdict(cfg),
        "n_train": len(data.rows["train"]), "n_val": len(data.rows["val"]), "n_test": len(data.rows["test"]),
        "val_source": data.val_source, "class_names": data.class_names, "cache": str(cfg.cache),
        "cache_fingerprint": cache.fingerprint, "backbone": cache.attrs.get("backbone"),
        "device": str(device), "n_configs": len(params), "seconds": round(time.perf_counter() - t0, 3),
    }
    if metrics["test_accuracy"] is None:
        del metrics["test_accuracy"], metrics["test_loss"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = {"run_dir": str(out), **{k: v for k, v in metrics.items() if k != "history"}, "leaderboard": rows}
    return summary
