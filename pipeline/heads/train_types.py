"""The trainer's small frozen inputs and its result: one head's hyperparameters, the loop's settings,
the tensors a stack trains on, and what one trained head is (``train.py`` re-exports them)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class HeadParams:
    """Hyperparameters of one head (one row of a sweep)."""

    hidden: tuple[int, ...] = ()  # () = linear head (multinomial logistic regression)
    dropout: float = 0.0
    batchnorm: bool = False
    weight_decay: float = 1e-4
    l1: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    seed: int = 0

    def group_key(self) -> tuple:
        """Configurations with equal keys can be stacked into one model."""
        return (self.hidden, self.batchnorm, self.optimizer, self.seed)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 100
    batch_size: int = 256
    patience: int = 10  # <= 0: no early stopping, keep the last epoch


@dataclass(frozen=True, eq=False)
class TrainData:
    """What a stack trains and is scored on, all on the training device.

    Attributes:
        X, y: the training pool (N, D) float32 and labels (N,) int64; heads train on all of it or
            on their own rows of it (``HeadTask.rows``).
        n_classes: C.
        Xv, yv: evaluation rows (early stopping, history), or None (then no early stopping).
        views: (N, V, D) augmented views of the pool rows, or None. Each epoch a view-sampling head
            trains on one view per row, drawn uniformly (seeded, shared by the group).
        keep_original: probability that a row's draw is its un-augmented features instead of a view.
        sample_weight: (N,) float32 loss weight of each pool row (``--class-weight``), or None = all 1.
            Each head's loss is the weighted mean over its rows of a batch (see ``train._step``);
            a constant weight trains exactly as None.
        val_weight: (Nv,) float32 weight of each evaluation row in the validation loss (early
            stopping, history), or None = all 1; the same per-class weights as ``sample_weight``.
    """

    X: torch.Tensor
    y: torch.Tensor
    n_classes: int
    Xv: torch.Tensor | None = None
    yv: torch.Tensor | None = None
    views: torch.Tensor | None = None
    keep_original: float = 0.0
    sample_weight: torch.Tensor | None = None
    val_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, w, rows in (("sample_weight", self.sample_weight, self.X), ("val_weight", self.val_weight, self.Xv)):
            n = 0 if rows is None else len(rows)
            if w is not None and tuple(w.shape) != (n,):
                raise ValueError(f"{name} must be one weight per row: shape ({n},), got {tuple(w.shape)}")


@dataclass
class FitResult:
    params: HeadParams
    head: nn.Sequential  # best-epoch weights, CPU, eval mode
    best_epoch: int  # 1-based
    history: list[dict] = field(default_factory=list)  # per epoch, up to this head's own stop
    seconds: float = 0.0  # this head's share of its group's wall-clock time (epoch time / heads alive)
    failed: bool = False  # its training loss or weight norm became non-finite: the configuration diverged
