"""Train heads on in-memory feature tensors: many configurations per pass over the data.

Configurations that share a shape, an optimizer and a seed train together as one ``StackedHead``:
each mini-batch is read once for all of them, while every configuration keeps its own learning
rate, weight decay, L1, momentum, dropout, early stopping and best epoch. A configuration that
stops early is dropped from the stack (model and optimizer state), so the survivors do not pay
for it: a batched sweep does the arithmetic of the sequential one, in fewer, wider operations.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featcache.pipeline.heads.stacked import StackedHead
from featcache.pipeline.heads.optim import StackedOptimizer

EVAL_CHUNK = 8192  # rows per evaluation forward, bounds (rows, C, K) logits memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


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
    seconds: float = 0.0  # this head's share of its group's wall-clock time (epoch time / heads alive)


def stacked_logits(model: StackedHead, x: torch.Tensor) -> torch.Tensor:
    """Logits of every head laid out (B, C, K) for a shared input x (B, D).

    A linear stack is computed as one (B, D) @ (D, C*K) GEMM: ``torch.matmul`` would broadcast x to
    (K, B, D), run K narrow GEMMs and materialise that copy again in backward. The (B, C, K) layout
    lets cross-entropy run over dim 1 with K contiguous, which is ~8x faster than over K*B rows of
    10 classes.
    """
    if not model.hidden and x.dim() == 2:
        w, b = model.weights[0], model.biases[0]  # (K, D, C), (K, C)
        k, d, c = w.shape
        return torch.addmm(b.t().reshape(c * k), x, w.permute(1, 2, 0).reshape(d, c * k)).view(-1, c, k)
    return model(x).permute(1, 2, 0)


def evaluate_stacked(model: StackedHead, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy per head, shape (K,) each, in eval mode."""
    model.eval()
    loss = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    correct = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(X), EVAL_CHUNK):
            logits = stacked_logits(model, X[s: s + EVAL_CHUNK])  # (b, C, K)
            yb = y[s: s + EVAL_CHUNK]
            loss += F.cross_entropy(logits, yb[:, None].expand(-1, model.k), reduction="none").sum(0).double()
            correct += (logits.max(1).indices == yb[:, None]).sum(0).double()  # max(1): 5x argmax(1) here
    return (loss / len(X)).float(), (correct / len(X)).float()


def _flush_subnormal(grad: torch.Tensor) -> torch.Tensor:
    """Zero gradient entries below the smallest normal float (~1.2e-38).

    Confident heads produce softmax gradients that underflow into subnormal numbers, and CPU GEMMs
    on subnormal inputs run ~50x slower (measured 16 ms -> 780 ms for one backward GEMM).
    """
    return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)


def _weight_norm(model: StackedHead) -> torch.Tensor:
    """Frobenius norm of all weight matrices per head (K,): the regularisation diagnostic."""
    return torch.sqrt(sum((w.detach() ** 2).sum(dim=(1, 2)) for w in model.weights))


def _replace_state(model: StackedHead, state: dict[str, torch.Tensor]) -> None:
    """Swap every parameter and buffer for the given tensors (all (K', ...)); K' may differ from K."""
    with torch.no_grad():
        for name, t in state.items():
            owner, _, idx = name.partition(".")
            if idx:  # "weights.0": an entry of a ParameterList
                getattr(model, owner)[int(idx)] = nn.Parameter(t.clone())
            else:  # "dropout", "bn_mean0": a buffer
                setattr(model, owner, t.clone())
    model.k = len(state["dropout"])


def _optimizer(model: StackedHead, kind: str, hp: dict[str, torch.Tensor]) -> StackedOptimizer:
    return StackedOptimizer(model.decay_parameters(), model.other_parameters(), kind,
                            hp["lr"], hp["weight_decay"], hp["momentum"])


def _drop_stopped(model: StackedHead, opt: StackedOptimizer, hp: dict[str, torch.Tensor],
                  keep: torch.Tensor) -> StackedOptimizer:
    """Keep heads ``keep`` (local indices) in the model, the per-head values ``hp`` (in place) and
    the optimizer state; return the optimizer rebuilt over the new parameter tensors."""
    _replace_state(model, {name: t[keep] for name, t in model.state_dict().items()})
    for name in hp:
        hp[name] = hp[name][keep]
    new = _optimizer(model, opt.kind, hp)
    new.t = opt.t  # shared step count: every surviving head has taken the same steps
    for st_new, st_old in zip(new.state, opt.state):
        st_new.update({key: v[keep].clone() for key, v in st_old.items()})
    return new


def train_group(params: list[HeadParams], X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor | None,
                yv: torch.Tensor | None, n_classes: int, settings: TrainSettings,
                views: torch.Tensor | None = None) -> list[FitResult]:
    """Train configurations that share ``group_key()`` as one stacked model.

    Args:
        X, y: training features (N, D) float32 and labels (N,) int64 on the training device.
        Xv, yv: validation rows, or None (then no early stopping).
        views: (N, V, D) augmented views of the training rows, or None. Each epoch trains on one
            view per row, drawn uniformly (seeded, shared by the group); X is then not trained on.
    Returns:
        One FitResult per configuration, in the order given.
    """
    first = params[0]
    if first.batchnorm and first.hidden and settings.batch_size < 2:
        raise ValueError("batch norm needs a batch size of at least 2: one row cannot be normalised")
    dev = X.device
    k_all = len(params)
    hp = {name: torch.tensor([float(getattr(p, name)) for p in params], device=dev)
          for name in ("lr", "weight_decay", "momentum", "l1")}
    model = StackedHead(X.shape[1], first.hidden, n_classes, [p.seed for p in params],
                        torch.tensor([p.dropout for p in params]), first.batchnorm).to(dev)
    model.generator = torch.Generator(device=dev).manual_seed(first.seed + 1)
    opt = _optimizer(model, first.optimizer, hp)
    order_gen = torch.Generator().manual_seed(first.seed)  # one data order shared by the group
    view_gen = torch.Generator().manual_seed(first.seed + 2)  # which view each row shows, per epoch
    has_val = Xv is not None and len(Xv) > 0
    early = has_val and settings.patience > 0
    active = torch.arange(k_all)  # global index of each head still in the stack
    best_loss = torch.full((k_all,), float("inf"))
    best_epoch = torch.zeros(k_all, dtype=torch.long)
    wait = torch.zeros(k_all, dtype=torch.long)
    seconds = torch.zeros(k_all, dtype=torch.float64)
    best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}  # all K heads
    histories: list[list[dict]] = [[] for _ in range(k_all)]
    n = len(X)
    flush = dev.type == "cpu"
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        k = len(active)
        use_l1 = bool((hp["l1"] > 0).any())  # once per epoch, not a device sync per step
        model.train()
        perm = torch.randperm(n, generator=order_gen).to(dev)
        if views is not None:  # (N, D): one view per row for this epoch
            pick = torch.randint(views.shape[1], (n,), generator=view_gen).to(dev)
            X = views[torch.arange(n, device=dev), pick]
        loss_sum = torch.zeros(k, device=dev)
        correct = torch.zeros(k, device=dev)
        for s in range(0, n, settings.batch_size):
            idx = perm[s: s + settings.batch_size]
            if model.batchnorm and len(idx) < 2:  # batch norm cannot normalise a single row
                continue
            xb, yb = X[idx], y[idx]
            logits = stacked_logits(model, xb)  # (B, C, K)
            if flush:
                logits.register_hook(_flush_subnormal)
            ce = F.cross_entropy(logits, yb[:, None].expand(-1, k), reduction="none").mean(0)  # (K,)
            opt.zero_grad()
            ce.sum().backward()  # heads are independent: the sum's gradient is each head's own
            if use_l1:  # d/dW of l1 * sum|W| is l1 * sign(W) (autograd's abs rule), added in place
                for w in model.decay_parameters():
                    w.grad.addcmul_(torch.sign(w.detach()), hp["l1"].view(-1, *([1] * (w.ndim - 1))))
            opt.step()
            loss_sum += ce.detach() * len(idx)
            correct += (logits.detach().max(1).indices == yb[:, None]).sum(0)
        record = {"train_loss": loss_sum / n, "train_accuracy": correct / n, "weight_norm": _weight_norm(model)}
        if has_val:
            record["val_loss"], record["val_accuracy"] = evaluate_stacked(model, Xv, yv)
        lists = {key: v.tolist() for key, v in record.items()}  # one device sync per epoch
        for j, g in enumerate(active.tolist()):
            histories[g].append({"epoch": epoch, **{key: vals[j] for key, vals in lists.items()}})
        if not early:
            best_epoch[active] = epoch
            seconds[active] += (time.perf_counter() - t_epoch) / k
            continue
        vl = record["val_loss"].cpu()
        improved = vl < best_loss[active]  # (k,) bool
        best_loss[active] = torch.where(improved, vl, best_loss[active])
        best_epoch[active[improved]] = epoch
        wait[active] = torch.where(improved, 0, wait[active] + 1)
        if bool(improved.any()):
            imp = improved.nonzero().squeeze(1).to(dev)
            for name, t in model.state_dict().items():  # copy the improved heads' weights aside
                best_state[name][active.to(dev)[imp]] = t.detach()[imp]
        keep = (wait[active] < settings.patience).nonzero().squeeze(1)
        seconds[active] += (time.perf_counter() - t_epoch) / k
        if len(keep) == 0:
            break
        if len(keep) < k:  # some heads stopped: train only the others from now on
            opt = _drop_stopped(model, opt, hp, keep.to(dev))
            active = active[keep]
    if early:
        _replace_state(model, best_state)
    return [FitResult(params[j], model.to_sequential(j), int(best_epoch[j]), histories[j], float(seconds[j]))
            for j in range(k_all)]


@functools.cache
def _reuse_freed_blocks() -> None:
    """Let glibc's malloc reuse freed multi-megabyte blocks instead of unmapping them.

    A stack's optimizer temporaries are (K, D, C) tensors of several MB; by default glibc serves
    each from a fresh mmap and returns it on free, so every step page-faults all of them in again
    (2 epochs of 100 stacked 2,048 x 10 heads: 2.1 s -> 1.65 s of CPU with this). Process-wide,
    keeps at most 256 MiB of freed heap for reuse; glibc only, a no-op elsewhere.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def train_many(params: list[HeadParams], X, y, Xv, yv, n_classes: int, settings: TrainSettings,
               views: torch.Tensor | None = None) -> list[FitResult]:
    """Group configurations by shape/optimizer/seed, train each group stacked, keep input order."""
    _reuse_freed_blocks()
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.group_key(), []).append(i)
    results: list[FitResult | None] = [None] * len(params)
    for idx in groups.values():
        for i, r in zip(idx, train_group([params[i] for i in idx], X, y, Xv, yv, n_classes, settings, views)):
            results[i] = r
    return results  # type: ignore[return-value]
