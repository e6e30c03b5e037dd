"""Train heads on in-memory feature tensors: many configurations per pass over the data.

Configurations that share a shape, an optimizer and a seed train together as one ``StackedHead``:
each mini-batch is read once for all of them, while every configuration keeps its own learning
rate, weight decay, L1, momentum, dropout, early stopping and best epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads import StackedHead
from pipeline.optim import StackedOptimizer

EVAL_CHUNK = 8192  # rows per evaluation forward, bounds (K, rows, C) logits memory


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


@dataclass
class FitResult:
    params: HeadParams
    head: nn.Sequential  # best-epoch weights, CPU, eval mode
    best_epoch: int  # 1-based
    history: list[dict] = field(default_factory=list)  # per epoch, up to this head's own stop
    seconds: float = 0.0  # this head's share of its group's wall-clock time


def evaluate_stacked(model: StackedHead, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy per head, shape (K,) each, in eval mode."""
    model.eval()
    loss = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    correct = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(X), EVAL_CHUNK):
            logits = model(X[s: s + EVAL_CHUNK])  # (K, b, C)
            yb = y[s: s + EVAL_CHUNK]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(model.k), reduction="none")
            loss += ce.view(model.k, -1).sum(1).double()
            correct += (logits.argmax(-1) == yb).sum(1).double()
    return (loss / len(X)).float(), (correct / len(X)).float()


def _weight_norm(model: StackedHead) -> torch.Tensor:
    """Frobenius norm of all weight matrices per head (K,): the regularisation diagnostic."""
    return torch.sqrt(sum((w.detach() ** 2).sum(dim=(1, 2)) for w in model.weights))


def train_group(params: list[HeadParams], X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor | None,
                yv: torch.Tensor | None, n_classes: int, settings: TrainSettings) -> list[FitResult]:
    """Train configurations that share ``group_key()`` as one stacked model.

    Args:
        X, y: training features (N, D) float32 and labels (N,) int64 on the training device.
        Xv, yv: validation rows, or None (then no early stopping).
    Returns:
        One FitResult per configuration, in the order given.
    """
    t0 = time.perf_counter()
    first = params[0]
    dev = X.device
    k = len(params)
    per_head = lambda name: torch.tensor([float(getattr(p, name)) for p in params], device=dev)  # noqa: E731
    model = StackedHead(X.shape[1], first.hidden, n_classes, [p.seed for p in params],
                        per_head("dropout"), first.batchnorm).to(dev)
    model.generator = torch.Generator(device=dev).manual_seed(first.seed + 1)
    opt = StackedOptimizer(model.decay_parameters(), model.other_parameters(), first.optimizer,
                           per_head("lr"), per_head("weight_decay"), per_head("momentum"))
    l1 = per_head("l1")
    order_gen = torch.Generator().manual_seed(first.seed)  # one data order shared by the group
    early = Xv is not None and len(Xv) > 0 and settings.patience > 0
    best_loss = torch.full((k,), float("inf"), device=dev)
    best_epoch = torch.zeros(k, dtype=torch.long)
    wait = torch.zeros(k, dtype=torch.long)
    stop_epoch = torch.full((k,), settings.epochs, dtype=torch.long)
    best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    histories: list[list[dict]] = [[] for _ in range(k)]
    n = len(X)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order_gen).to(dev)
        loss_sum = torch.zeros(k, device=dev)
        correct = torch.zeros(k, device=dev)
        for s in range(0, n, settings.batch_size):
            idx = perm[s: s + settings.batch_size]
            if model.batchnorm and len(idx) < 2:  # batch norm cannot normalise a single row
                continue
            xb, yb = X[idx], y[idx]
            logits = model(xb)  # (K, B, C)
            ce = F.cross_entropy(logits.reshape(-1, n_classes), yb.repeat(k), reduction="none").view(k, -1).mean(1)
            loss = ce
            if bool((l1 > 0).any()):
                loss = loss + l1 * sum(w.abs().sum(dim=(1, 2)) for w in model.decay_parameters())
            opt.zero_grad()
            loss.sum().backward()  # heads are independent: the sum's gradient is each head's own
            opt.step()
            loss_sum += ce.detach() * len(idx)
            correct += (logits.detach().argmax(-1) == yb).sum(1)
        record = {"train_loss": (loss_sum / n).tolist(), "train_accuracy": (correct / n).tolist(),
                  "weight_norm": _weight_norm(model).tolist()}
        if Xv is not None and len(Xv) > 0:
            vl, va = evaluate_stacked(model, Xv, yv)
            record["val_loss"], record["val_accuracy"] = vl.tolist(), va.tolist()
        for j in range(k):
            if epoch <= stop_epoch[j]:
                histories[j].append({"epoch": epoch, **{key: vals[j] for key, vals in record.items()}})
        if not early:
            best_epoch[:] = epoch
            continue
        improved = vl < best_loss  # (K,) bool on device
        improved &= (epoch <= stop_epoch).to(dev)  # a stopped head keeps its best weights
        best_loss = torch.where(improved, vl, best_loss)
        imp_cpu = improved.cpu()
        best_epoch[imp_cpu] = epoch
        wait[imp_cpu] = 0
        wait[~imp_cpu] += 1
        newly_stopped = (wait >= settings.patience) & (stop_epoch == settings.epochs) & (epoch < settings.epochs)
        stop_epoch[newly_stopped] = epoch
        for name, t in model.state_dict().items():
            mask = improved.view(-1, *([1] * (t.ndim - 1))) if t.ndim else None
            if mask is not None and t.shape[0] == k:
                best_state[name] = torch.where(mask, t.detach(), best_state[name])
        if bool((wait >= settings.patience).all()):
            break
    if early:
        model.load_state_dict(best_state)
    seconds = (time.perf_counter() - t0) / k
    return [FitResult(params[j], model.to_sequential(j), int(best_epoch[j]), histories[j], seconds) for j in range(k)]


def train_many(params: list[HeadParams], X, y, Xv, yv, n_classes: int, settings: TrainSettings) -> list[FitResult]:
    """Group configurations by shape/optimizer/seed, train each group stacked, keep input order."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.group_key(), []).append(i)
    results: list[FitResult | None] = [None] * len(params)
    for idx in groups.values():
        for i, r in zip(idx, train_group([params[i] for i in idx], X, y, Xv, yv, n_classes, settings)):
            results[i] = r
    return results  # type: ignore[return-value]
