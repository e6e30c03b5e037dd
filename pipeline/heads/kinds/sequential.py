"""What every head kind saved as an ``nn.Sequential`` of Linear [BatchNorm] ReLU Dropout layers shares
(linear, mlp, logreg): its head.pt architecture, its rebuild, and the epoch-trained stack's rows.

Not a kind itself (nothing registers it): the kinds subclass it.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from featcache.pipeline.errors import opt
from featcache.pipeline.heads.kinds import HeadKind

if TYPE_CHECKING:  # annotations only: kinds are imported by the CLI before torch is
    import torch
    from torch import nn

EPOCH_OPTIONS = ("lr", "weight_decay", "l1", "optimizer", "momentum", "epochs", "batch_size", "patience")


def with_views(X: torch.Tensor, y: torch.Tensor, views: torch.Tensor | None):
    """Solvers without epochs (logreg, the exact probe) fit the rows plus all their views as extra
    rows, each weighted 1/(1+V) so the data term (a sum over rows in sklearn) keeps its scale and C
    means what it means without views. Returns (X, y, sample_weight or None)."""
    if views is None:
        return X, y, None
    import torch

    k = 1 + views.shape[1]
    return (torch.cat([X, views.reshape(-1, X.shape[1])]), torch.cat([y, y.repeat_interleave(views.shape[1])]),
            np.full(len(y) * k, 1.0 / k))


def class_weights(cfg, y: torch.Tensor, class_names: list[str], weights: np.ndarray | None) -> np.ndarray | None:
    """Row weights with ``cfg.class_weight`` folded in (``class_weight_table`` of the labels ``y``,
    one per row), times the rows' own ``weights`` (views)."""
    table = class_weight_table(cfg, y, class_names)
    if table is None:
        return weights
    row = table[y.cpu().numpy()]
    return row if weights is None else row * weights


def loss_weights(cfg, class_names: list[str], y: torch.Tensor, *ys: torch.Tensor) -> list[torch.Tensor | None]:
    """The epoch trainer's float32 loss weights (``TrainData.sample_weight``, ``val_weight``) of the
    rows labelled ``y`` and of each of ``ys``, all with the class weights computed from ``y`` (the
    training rows' counts, for "balanced"); None each without ``cfg.class_weight``."""
    table = class_weight_table(cfg, y, class_names)
    if table is None:
        return [None] * (1 + len(ys))
    import torch

    per_class = torch.as_tensor(table, dtype=torch.float32, device=y.device)  # (C,)
    return [per_class[labels] for labels in (y, *ys)]


def class_weight_table(cfg, y: torch.Tensor, class_names: list[str]) -> np.ndarray | None:
    """(C,) loss weight of each class from ``cfg.class_weight``, or None without one: "balanced"
    weighs class c by n / (n_present_classes * n_c) over the labels ``y`` (scikit-learn's
    compute_class_weight), (name, weight) pairs by the given weight (1 for classes not named)."""
    if cfg.class_weight is None:
        return None
    from featcache.pipeline.errors import FeatcacheError

    labels = y.cpu().numpy()
    per_class = np.ones(len(class_names))
    if cfg.class_weight == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)
        per_class[present] = compute_class_weight("balanced", classes=present, y=labels)
    elif isinstance(cfg.class_weight, str):
        raise FeatcacheError(f"{opt('class_weight')} {cfg.class_weight!r}: give 'balanced' or class=weight pairs")
    else:
        for name, w in cfg.class_weight:
            if name not in class_names:
                raise FeatcacheError(f"{opt('class_weight')} names class {name!r}, which the cache does not have "
                                     f"(classes: {', '.join(class_names[:10])})")
            if not 0 < float(w) < float("inf"):
                raise FeatcacheError(f"{opt('class_weight')} {name}={w}: a weight must be positive and finite")
            per_class[class_names.index(name)] = float(w)
    return per_class


def rows_of(data, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) of ``rows`` of the prepared data, on its device."""

    return data.take(rows)


class SequentialKind(HeadKind):
    """Heads saved as ``nn.Sequential`` (stacked.build_sequential): linear, mlp, logreg."""

    def architecture(self, best, head: nn.Module) -> dict:
        p = best.params
        return {"hidden": list(p.hidden) if p else [], "batchnorm": bool(p and p.batchnorm),
                "dropout": float(p.dropout) if p else 0.0}

    def build(self, meta: dict) -> nn.Module:
        from featcache.pipeline.heads.stacked import build_sequential

        return build_sequential(meta["in_dim"], tuple(meta["hidden"]), meta["n_classes"], meta["batchnorm"],
                                meta["dropout"])


class EpochKind(SequentialKind):
    """Heads trained by epochs as stacks (heads/train.py, heads/cv.py): --cv and --train-sizes work."""

    selection = True
    curves = True
    streams = True
    options = ("hidden", "dropout", "batchnorm", *EPOCH_OPTIONS)

    def by_epochs(self, cfg) -> bool:
        return True

    def fit(self, cfg, data):
        from featcache.pipeline.heads.cv import train_torch

        return train_torch(cfg, data)

    def cv_refit(self, cfg, data, best):
        from featcache.pipeline.heads.cv import refit_cv_winner

        return refit_cv_winner(cfg, data, best)

    def refit(self, cfg, data, best, rows):
        from featcache.pipeline.heads.train import TrainData, TrainSettings, train_many

        X, y = rows_of(data, rows)
        epochs = best.row["best_epoch"]
        (weight,) = loss_weights(cfg, data.class_names, y)  # "balanced": from the refit rows' own counts
        td = TrainData(X, y, len(data.class_names), None, None, views=data.views_of(rows), sample_weight=weight)
        head = train_many([best.params], data=td, settings=TrainSettings(epochs, cfg.batch_size, patience=0))[0].head
        return head, epochs

    def params(self, best) -> dict:
        return asdict(best.params)

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int, pass_rows: int | None = None) -> int:
        """Per head: parameters x 5 (weights, gradient, two Adam moments, the best epoch's copy); per
        stack: the (B, K, width) activations and the (chunk, C, K) evaluation logits; plus the
        training pool gathered out of the matrix (heads/cv.py) and a sampled views copy per epoch
        (streamed, ``pass_rows`` set: no pool, the shuffle window is the stream's).
        --class-weight adds (N,) float32 loss weights of the pool and of the evaluation rows (at
        most the pool's again): 8 bytes a row, 2/D of the pool's own copy, counted anyway."""
        from featcache.pipeline.heads.masks import EVAL_BUDGET
        from featcache.pipeline.heads.sweep import configurations

        heads = len(configurations(cfg)) * max(cfg.cv, 1) * (1 + len(cfg.train_sizes))
        widest = max([n_classes, *(w for h in self.architectures(cfg) for w in h)])
        params = max(sum(a * b + b for a, b in zip([dim, *h], [*h, n_classes])) for h in self.architectures(cfg))
        widths = max(sum(h) + n_classes for h in self.architectures(cfg))
        evaluation = min(n_train * heads * widths * 4, EVAL_BUDGET) * 2  # masks.eval_chunk_rows caps it
        folded = heads * dim * n_classes * 4 * 2 if cfg.cv >= 2 and cfg.standardize else 0  # linear: W/sigma + grad
        # per row set: a batch standardised with its statistics, its (N,) masks (float + bool), and an
        # MLP's epoch plan of gathered rows (masks.BatchRows: long rows + float mask, 12 bytes a row,
        # as much again of CPU temporaries while it is built)
        per_fold = max(cfg.cv, 1) * (1 + len(cfg.train_sizes)) * (cfg.batch_size * dim * 4 + n_train * (5 + 24))
        weights = n_train * 4 * 2 if cfg.class_weight is not None else 0
        return (heads * params * 4 * 5 + heads * cfg.batch_size * widest * 4 * 4 + evaluation + folded + per_fold
                + (n_train * dim * 4 if pass_rows is None else 0) + weights)

    def label(self, row: dict) -> str:
        hidden = row.get("hidden")
        if isinstance(hidden, (list, tuple)):  # recorded params hold a list, leaderboard rows "512,256"
            hidden = ",".join(map(str, hidden)) or "0"
        arch = "linear" if hidden in (None, "0", "") else f"mlp {hidden}"
        text = (f"{arch} {row.get('optimizer', '?')} lr={row.get('lr', 0):g} wd={row.get('weight_decay', 0):g} "
                f"l1={row.get('l1', 0):g}")
        return text + (f" do={row.get('dropout', 0):g}" if arch != "linear" else "")

    def describe(self, params: dict) -> str:
        arch = "linear" if not params.get("hidden") else "mlp " + "x".join(map(str, params["hidden"]))
        extra = f" momentum={params['momentum']:g}" if params.get("optimizer") == "sgd" else ""
        return (f"{arch}, {params['optimizer']} lr={params['lr']:g} weight_decay={params['weight_decay']:g} "
                f"l1={params['l1']:g}{extra}" + (f" dropout={params['dropout']:g}" if params.get("hidden") else ""))
