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

import torch
import torch.nn.functional as F
from torch import nn

from featcache.pipeline.heads.masks import (HeadTask, as_task, epoch_index, eval_mask, head_statistics,
                                            masked_evaluate, standardized)
from featcache.pipeline.heads.optim import StackedOptimizer
from featcache.pipeline.heads.stacked import StackedHead
from featcache.pipeline.heads.train_types import FitResult, HeadParams, TrainData, TrainSettings

__all__ = ["FitResult", "HeadParams", "HeadTask", "TrainData", "TrainSettings", "evaluate_stacked", "train_group",
           "train_many"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


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
    return masked_evaluate(model, X, y, stacked_logits, None, None)


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


def _epoch_rows(data: TrainData, view_gen: torch.Generator, keep_gen: torch.Generator) -> torch.Tensor:
    """(N, D): one augmented view per pool row for this epoch (its original with ``keep_original``)."""
    views, n = data.views, len(data.X)
    dev = data.X.device
    pick = torch.randint(views.shape[1], (n,), generator=view_gen).to(dev)
    rows = views[torch.arange(n, device=dev), pick]
    if data.keep_original > 0:
        orig = (torch.rand(n, generator=keep_gen) < data.keep_original).to(dev)
        rows = torch.where(orig[:, None], data.X, rows)
    return rows


def train_group(tasks: list[HeadTask | HeadParams], *, data: TrainData, settings: TrainSettings) -> list[FitResult]:
    """Train heads that share ``group_key()`` (and steps per epoch) as one stacked model.

    Heads given as plain HeadParams (or tasks without rows of their own) share every mini-batch
    (one (B, D) read for the stack); heads with their own rows or standardisation get their own
    batches (see ``masks``). A head whose training loss becomes non-finite stops there and is
    returned with ``failed=True``.

    Args:
        tasks: the heads, all with the same ``group_key()`` and the same number of steps per epoch.
        data: the training pool, evaluation rows and views (``TrainData``).
        settings: epochs, batch size, patience.
    Returns:
        One FitResult per head, in the order given.
    """
    tasks = [as_task(t) for t in tasks]
    params = [t.params for t in tasks]
    first = params[0]
    if first.batchnorm and first.hidden and settings.batch_size < 2:
        raise ValueError("batch norm needs a batch size of at least 2: one row cannot be normalised")
    X, y, Xv, yv = data.X, data.y, data.Xv, data.yv
    dev, n, bs = X.device, len(X), settings.batch_size
    if len({t.steps(n, bs) for t in tasks}) > 1:
        raise ValueError("heads of one stack must take the same number of steps per epoch (train_many groups them)")
    k_all = len(params)
    hp = {name: torch.tensor([float(getattr(p, name)) for p in params], device=dev)
          for name in ("lr", "weight_decay", "momentum", "l1")}
    model = StackedHead(X.shape[1], first.hidden, data.n_classes, [p.seed for p in params],
                        torch.tensor([p.dropout for p in params]), first.batchnorm).to(dev)
    model.generator = torch.Generator(device=dev).manual_seed(first.seed + 1)
    opt = _optimizer(model, first.optimizer, hp)
    order_gen = torch.Generator().manual_seed(first.seed)  # one data order shared by the group
    view_gen = torch.Generator().manual_seed(first.seed + 2)  # which view each row shows, per epoch
    keep_gen = torch.Generator().manual_seed(first.seed + 3)  # which rows show their original instead
    use_views = data.views is not None and any(t.views for t in tasks)
    masked = any(t.masked for t in tasks) or (use_views and not all(t.views for t in tasks))
    # masked heads: one order generator each, seeded as a lone run's, so rows T train as X[T] alone would
    gens = [torch.Generator().manual_seed(first.seed) for _ in tasks] if masked else []
    offsets = torch.tensor([n if use_views and t.views else 0 for t in tasks])  # rows of the viewed copy
    n_rows = torch.tensor([float(t.n_rows(n)) for t in tasks], device=dev)
    stats = head_statistics(X, tasks) if masked else None  # (K, D) mean and scale, or None
    y_src = torch.cat([y, y]) if masked and use_views else y
    has_val = Xv is not None and len(Xv) > 0
    emask = eval_mask(tasks, len(Xv), dev) if has_val else None
    early = has_val and settings.patience > 0
    active = torch.arange(k_all)  # global index of each head still in the stack
    best_loss = torch.full((k_all,), float("inf"))
    best_epoch = torch.zeros(k_all, dtype=torch.long)
    wait = torch.zeros(k_all, dtype=torch.long)
    failed = torch.zeros(k_all, dtype=torch.bool)
    seconds = torch.zeros(k_all, dtype=torch.float64)
    best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}  # all K heads
    histories: list[list[dict]] = [[] for _ in range(k_all)]
    flush = dev.type == "cpu"
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        k = len(active)
        act = active.tolist()
        st = None if stats is None else (stats[0][active.to(dev)], stats[1][active.to(dev)])
        use_l1 = bool((hp["l1"] > 0).any())  # once per epoch, not a device sync per step
        model.train()
        src = X
        if use_views:
            src = _epoch_rows(data, view_gen, keep_gen)
            if masked:
                src = torch.cat([X, src])  # rows n.. are the viewed copy (offsets)
        if masked:
            idx_all, w_all = epoch_index([tasks[g] for g in act], [gens[g] for g in act], n, bs, offsets[active])
            idx_all, w_all = idx_all.to(dev), w_all.to(dev)
            width = idx_all.shape[1]
        else:
            perm = torch.randperm(n, generator=order_gen).to(dev)
            width = n
        loss_sum = torch.zeros(k, device=dev)
        correct = torch.zeros(k, device=dev)
        for s in range(0, width, bs):
            if masked:
                bi, bw = idx_all[:, s: s + bs], w_all[:, s: s + bs]  # (k, B)
                yb = y_src[bi].t()  # (B, k)
                logits = stacked_logits(model, standardized(src[bi], st))  # (B, C, k)
            else:
                idx = perm[s: s + bs]
                if model.batchnorm and len(idx) < 2:  # batch norm cannot normalise a single row
                    continue
                yb = y[idx][:, None].expand(-1, k)
                logits = stacked_logits(model, src[idx])  # (B, C, K)
            if flush:
                logits.register_hook(_flush_subnormal)
            ce = F.cross_entropy(logits, yb, reduction="none")  # (B, k)
            hit = logits.detach().max(1).indices == yb
            if masked:  # mean over each head's real rows (padding weighs 0)
                cnt = bw.sum(1)
                ce = (ce * bw.t()).sum(0) / cnt
                hit = hit * bw.t()
            else:
                cnt = len(idx)
                ce = ce.mean(0)  # (K,)
            opt.zero_grad()
            ce.sum().backward()  # heads are independent: the sum's gradient is each head's own
            if use_l1:  # d/dW of l1 * sum|W| is l1 * sign(W) (autograd's abs rule), added in place
                for w in model.decay_parameters():
                    w.grad.addcmul_(torch.sign(w.detach()), hp["l1"].view(-1, *([1] * (w.ndim - 1))))
            opt.step()
            loss_sum += ce.detach() * cnt
            correct += hit.sum(0)
        rows_k = n_rows[active.to(dev)]
        record = {"train_loss": loss_sum / rows_k, "train_accuracy": correct / rows_k, "weight_norm": _weight_norm(model)}
        if has_val:
            em = None if emask is None else emask[active.to(dev)]
            record["val_loss"], record["val_accuracy"] = masked_evaluate(model, Xv, yv, stacked_logits, em, st)
        lists = {key: v.tolist() for key, v in record.items()}  # one device sync per epoch
        for j, g in enumerate(act):
            histories[g].append({"epoch": epoch, **{key: vals[j] for key, vals in lists.items()}})
        finite = torch.isfinite(torch.tensor(lists["train_loss"]))  # (k,): a diverged head stops here
        failed[active[~finite]] = True
        if early:
            vl = record["val_loss"].cpu()
            improved = (vl < best_loss[active]) & finite  # (k,) bool
            best_loss[active] = torch.where(improved, vl, best_loss[active])
            best_epoch[active[improved]] = epoch
            wait[active] = torch.where(improved, 0, wait[active] + 1)
            if bool(improved.any()):
                imp = improved.nonzero().squeeze(1).to(dev)
                for name, t in model.state_dict().items():  # copy the improved heads' weights aside
                    best_state[name][active.to(dev)[imp]] = t.detach()[imp]
            keep = ((wait[active] < settings.patience) & finite).nonzero().squeeze(1)
        else:
            best_epoch[active[finite]] = epoch
            keep = finite.nonzero().squeeze(1)
        seconds[active] += (time.perf_counter() - t_epoch) / k
        if len(keep) < k and not early:  # the last finite weights of the heads leaving the stack
            for name, t in model.state_dict().items():
                best_state[name][active.to(dev)] = t.detach()
        if len(keep) == 0:
            break
        if len(keep) < k:  # some heads stopped: train only the others from now on
            opt = _drop_stopped(model, opt, hp, keep.to(dev))
            active = active[keep]
    else:
        if not early:  # every epoch ran: the survivors keep their last weights
            for name, t in model.state_dict().items():
                best_state[name][active.to(dev)] = t.detach()
    _replace_state(model, best_state)
    return [FitResult(params[j], model.to_sequential(j), int(best_epoch[j]), histories[j], float(seconds[j]),
                      bool(failed[j])) for j in range(k_all)]


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


def train_many(tasks: list[HeadTask | HeadParams], *, data: TrainData, settings: TrainSettings) -> list[FitResult]:
    """Group heads by shape/optimizer/seed and steps per epoch, train each group stacked, keep input order.

    Args:
        tasks: configurations (every head trains on the whole pool, scored on every evaluation row)
            or HeadTasks (each with its own rows: folds, training-set sizes).
    """
    _reuse_freed_blocks()
    tasks = [as_task(t) for t in tasks]
    n = len(data.X)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault((t.params.group_key(), t.steps(n, settings.batch_size)), []).append(i)
    results: list[FitResult | None] = [None] * len(tasks)
    for idx in groups.values():
        for i, r in zip(idx, train_group([tasks[i] for i in idx], data=data, settings=settings)):
            results[i] = r
    return results  # type: ignore[return-value]
