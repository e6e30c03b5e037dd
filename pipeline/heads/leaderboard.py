"""One row per trained configuration: hyperparameters, best epoch, scores, seconds; ranking and files.

Rows are plain JSON-ready dicts so that leaderboard.json, leaderboard.csv, the printed table, the
sweep plot and ``featcache runs`` all read the same thing.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from featcache.pipeline.heads.data import Prepared
from featcache.pipeline.heads.exact import ExactResult
from featcache.pipeline.heads.logreg import LogregResult
from featcache.pipeline.heads.metrics import score
from featcache.pipeline.heads.train import FitResult

SPLITS = ("train", "val", "test")


METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1")


def split_scores(head: nn.Module, data: Prepared | None) -> dict:
    """train/val/test accuracy, mean cross-entropy, balanced accuracy and macro-F1 of ``head``;
    None for a split with no rows, and for every split when ``data`` is None (a row not scored)."""
    row: dict = {}
    for split in SPLITS:
        s = {} if data is None else score(head, *data.split(split))
        for m in METRICS:
            row[f"{split}_{m}"] = s.get(m)
    return row


def torch_row(i: int, res: FitResult, data: Prepared | None) -> dict:
    """Leaderboard row of a linear/mlp configuration (``hidden`` as "512,256", "0" for linear);
    ``data`` None: the split scores are None (a cross-validated row, scored on its folds)."""
    p = asdict(res.params)
    return {"index": i, "head": "mlp" if res.params.hidden else "linear", **p,
            "hidden": ",".join(map(str, res.params.hidden)) or "0",
            "best_epoch": res.best_epoch, "epochs_run": len(res.history),
            **split_scores(res.head, data), "seconds": round(res.seconds, 4)}


def logreg_row(i: int, res: LogregResult, data: Prepared, seed: int) -> dict:
    """Leaderboard row of one scikit-learn LogisticRegression fit (no epochs: L-BFGS iterations)."""
    return {"index": i, "head": "logreg", "C": res.C, "seed": seed, "n_iter": res.n_iter, "converged": res.converged,
            **split_scores(res.head, data), "seconds": round(res.seconds, 4)}


def exact_row(i: int, res: ExactResult, data: Prepared, seed: int) -> dict:
    """Leaderboard row of one C of the exact linear probe (heads/exact.py): L-BFGS iterations, no epochs."""
    return {"index": i, "head": "linear", "solver": "exact", "hidden": "0", "C": res.C, "seed": seed,
            "n_iter": res.n_iter, "converged": res.converged, "objective": res.objective, "note": res.note,
            **split_scores(res.head, data), "seconds": round(res.seconds, 4)}


def rank_key(r: dict, select_by: str = "accuracy") -> tuple:
    """Best first: highest val ``select_by`` (accuracy, balanced_accuracy or macro_f1), then lowest
    val loss, then the earlier configuration. Without a validation split the same order is taken on
    the training scores; with --cv on the mean held-out fold scores. Failed (diverged)
    configurations come last, and learning-curve rows of a smaller training set after those
    trained on all train rows."""
    if "cv_folds" in r:
        acc, loss = r.get(f"cv_{select_by}_mean"), r.get("cv_loss_mean")
    else:
        split = "val" if r.get("val_accuracy") is not None else "train"
        acc, loss = r.get(f"{split}_{select_by}"), r.get(f"{split}_loss")
    return (r.get("status") == "failed", r.get("train_size", "all") != "all", -(acc if acc is not None else -1.0),
            loss if loss is not None else float("inf"), r["index"])


def rank(rows: list[dict], select_by: str = "accuracy") -> list[dict]:
    """Rows sorted best first (``rank_key``), each given its 1-based ``rank``."""
    return [{"rank": n, **r} for n, r in enumerate(sorted(rows, key=lambda r: rank_key(r, select_by)), start=1)]


def write_leaderboard(out: Path, rows: list[dict]) -> list[str]:
    """leaderboard.json (a list of rows, best first) and leaderboard.csv (same rows, union of
    columns; test columns only when a test split exists). Returns the file names written."""
    if all(r.get("test_accuracy") is None for r in rows):
        rows = [{k: v for k, v in r.items() if not k.startswith("test_")} for r in rows]
    (out / "leaderboard.json").write_text(json.dumps(rows, indent=2))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return ["leaderboard.json", "leaderboard.csv"]
