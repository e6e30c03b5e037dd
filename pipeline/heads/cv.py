"""fit-head's linear/mlp sweep as stacked heads: configurations x CV folds x training-set sizes x
(views or not), every one a head of the same pass, each with its own row mask (see ``masks``).

Folds and sizes share the stack's mini-batches: each epoch one shuffle of the train rows, every
head reads the same batch and weights the rows outside its own training set zero (a fold's
held-out rows, the rows beyond a size), so one matrix product serves them all. A head with fewer
rows thus takes the pool's number of steps, each on its share of the batch (``masks`` says how this
compares to a lone run). Heads that sample augmented views and heads that do not are two stacks.

- ``--cv K``: stratified K-fold over the train rows (scikit-learn ``StratifiedKFold``, shuffled,
  seeded). Each fold-head trains on its K-1 folds, is standardised with those rows' statistics only,
  and early-stops on its held-out fold (un-augmented features). A configuration's leaderboard row
  holds the mean and std of its held-out fold accuracies and losses; rows rank by the mean. The
  winner is then refitted on every train row (train+val with --refit) for the median of its folds'
  best epochs, without early stopping, and that refit is scored on the train/val/test splits.
- ``--train-sizes 10,50,all``: training-set sizes in images **per class** (nested, seeded subsets
  of the train rows: the 10 of each class are among the 50; a class with fewer images gives all it
  has). ``all`` is always included: the saved head is trained on all train rows. Without --cv each
  size is scored on the val split; with --cv each fold's training rows are subsampled.
  When the cache has augmented views (and --use-augmented is not given either way), every size is
  trained with and without them, so learning_curve.png answers "would more images help, and would
  augmentation?".
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from featcache.pipeline.config import HeadConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.data import Prepared
from featcache.pipeline.heads.kinds.sequential import loss_weights
from featcache.pipeline.heads.leaderboard import split_scores, torch_row
from featcache.pipeline.heads.masks import HeadTask
from featcache.pipeline.heads.result import Candidate
from featcache.pipeline.heads.sweep import configurations
from featcache.pipeline.heads.train import FitResult, TrainData, TrainSettings, train_many

ALL = 0  # train_sizes value meaning every train row


def fold_splits(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training positions, held-out positions) of each of ``k`` stratified folds over ``labels``."""
    counts = np.bincount(labels)
    if counts[counts > 0].min() < k:
        raise FeatcacheError(f"--cv {k}: every class needs at least {k} train rows; the smallest has "
                             f"{counts[counts > 0].min()}")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(ho)) for tr, ho in skf.split(np.zeros(len(labels)), labels)]


def size_subset(pos: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The first ``per_class`` rows of each class of ``pos`` in a seeded order of the whole pool, so
    subsets of one pool are nested (sizes 10 within 50); ``ALL`` = ``pos`` itself."""
    if per_class == ALL:
        return pos
    order = np.random.default_rng(seed).permutation(len(labels))  # one order of the pool, every size
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels))
    keep = []
    for c in np.unique(labels[pos]):
        mine = pos[labels[pos] == c]
        keep.append(mine[np.argsort(rank[mine])][:per_class])
    return np.sort(np.concatenate(keep))


def _sizes(cfg: HeadConfig) -> list[int]:
    sizes = sorted({s for s in cfg.train_sizes if s != ALL})
    return [*sizes, ALL]


def _variants(cfg: HeadConfig, data: Prepared) -> list[bool]:
    """Train with views, without, or both (a learning curve on a cache with views, unless told)."""
    if data.views is None:
        return [False]
    return [True, False] if cfg.train_sizes and cfg.use_augmented is None else [True]


def train_torch(cfg: HeadConfig, data: Prepared) -> list[Candidate]:
    """Every configuration x fold x size x views variant in one stacked pass; one Candidate per
    configuration x size x variant (its folds folded into mean/std when --cv)."""
    params = configurations(cfg)
    pool = data.rows["train"]
    Xp, yp = data.take(pool)  # streamed: a source over the pool rows (plain configurations only)
    labels = yp.cpu().numpy()
    folds = fold_splits(labels, cfg.cv, cfg.seed) if cfg.cv >= 2 else [(np.arange(len(pool)), None)]
    views = data.views_of(pool)
    # --class-weight: one set of class weights from the whole pool's counts for every head. Stratified
    # folds hold the pool's class shares, so per-fold "balanced" weights would differ only by
    # rounding; learning-curve sizes share them too, as the exact probe's (_exact_selection) do.
    if cfg.cv >= 2:  # held-out folds are scored on the un-augmented pool rows, weighted as in training
        (w,) = loss_weights(cfg, data.class_names, yp)
        td = TrainData(Xp, yp, len(data.class_names), Xp, yp, views, cfg.views_keep_original, w, w)
    else:
        Xv, yv = data.split("val")
        w, wv = loss_weights(cfg, data.class_names, yp, yv)
        has_val = len(Xv) > 0
        td = TrainData(Xp, yp, len(data.class_names), Xv if has_val else None, yv if has_val else None, views,
                       cfg.views_keep_original, w, wv if has_val else None)
    entries, tasks = [], []  # entry = (config index, size, views) -> its task positions
    for i, p in enumerate(params):
        for size in _sizes(cfg):
            for use in _variants(cfg, data):
                slots = []
                for tr, ho in folds:
                    rows = size_subset(tr, labels, size, cfg.seed)
                    whole = ho is None and size == ALL
                    slots.append(len(tasks))
                    tasks.append(HeadTask(p, rows=None if whole else rows, eval_rows=ho,
                                          standardize=cfg.standardize and ho is not None, views=use))
                entries.append((i, size, use, slots))
    results = train_many(tasks, data=td, settings=TrainSettings(cfg.epochs, cfg.batch_size, cfg.patience))
    out = []
    for n, (_, size, use, slots) in enumerate(entries):
        res = [results[s] for s in slots]
        n_rows = [tasks[s].n_rows(len(pool)) for s in slots]
        extra = {"train_size": "all" if size == ALL else size, "n_train_rows": round(float(np.mean(n_rows)), 1),
                 "views": use}
        if cfg.cv >= 2:
            row = _cv_row(n, res, cfg.cv)
        else:
            row = _plain_row(n, res[0], data)
        out.append(Candidate({**row, **extra}, res[0].head, res[0].history, res[0].params))
    return out


def _plain_row(n: int, r: FitResult, data: Prepared) -> dict:
    row = torch_row(n, r, data)
    if r.failed:  # diverged: no score is a score
        row.update({k: None for k in row if k.endswith(("_accuracy", "_loss"))})
    return {**row, "status": "failed" if r.failed else "ok"}


def _cv_row(n: int, res: list[FitResult], k: int) -> dict:
    """Mean/std over folds of the held-out accuracy and loss at each fold's kept epoch. No split is
    scored: a fold head saw 1/k fewer rows than the head fit-head saves, so only the winner's refit
    gets train/val/test scores (``refit_cv_winner``)."""
    row = torch_row(n, res[0], None)
    failed = any(r.failed for r in res)
    acc = [r.history[r.best_epoch - 1]["val_accuracy"] for r in res if r.best_epoch]
    loss = [r.history[r.best_epoch - 1]["val_loss"] for r in res if r.best_epoch]
    epochs = [r.best_epoch for r in res]
    ok = not failed and len(acc) == k
    row.update({
        "cv_folds": k, "cv_accuracy_mean": float(np.mean(acc)) if ok else None,
        "cv_accuracy_std": float(np.std(acc)) if ok else None, "cv_loss_mean": float(np.mean(loss)) if ok else None,
        "cv_loss_std": float(np.std(loss)) if ok else None, "fold_accuracies": acc if ok else None,
        "fold_best_epochs": epochs, "best_epoch": max(1, round(statistics.median(epochs))),
        "epochs_run": max(len(r.history) for r in res), "seconds": round(sum(r.seconds for r in res), 4),
        "status": "failed" if failed else "ok",
    })
    return row


def refit_cv_winner(cfg: HeadConfig, data: Prepared, best: Candidate) -> Candidate:
    """The CV winner retrained on every train row (and val with --refit) for the median of its folds'
    best epochs, no early stopping, then scored on train/val/test: its row gains those scores."""
    t0 = time.perf_counter()
    names = ("train", "val") if cfg.refit else ("train",)
    rows = np.sort(np.concatenate([data.rows[s] for s in names]))
    idx = torch.as_tensor(rows, device=data.X.device)
    views = data.views_of(rows) if best.row["views"] else None
    y = data.y[idx]
    (w,) = loss_weights(cfg, data.class_names, y)  # "balanced": from the refit rows' own class counts
    td = TrainData(data.X[idx], y, len(data.class_names), views=views, keep_original=cfg.views_keep_original,
                   sample_weight=w)
    epochs = best.row["best_epoch"]
    (r,) = train_many([best.params], data=td, settings=TrainSettings(epochs, cfg.batch_size, patience=0))
    row = {**best.row, **split_scores(r.head, data), "refit_rows": len(rows), "refit_epochs": epochs,
           "refit_seconds": round(time.perf_counter() - t0, 3)}
    if r.failed:
        raise FeatcacheError(f"the cross-validated winner diverged when refitted on {len(rows)} rows "
                             f"(non-finite training loss or weights); try a smaller --lr")
    return Candidate(row, r.head, r.history, r.params)
