"""Train heads on in-memory feature tensors: many configurations per pass over the data.

Configurations that share a shape, an optimizer and a seed train together as one ``StackedHead``:
each mini-batch is read once for all of them, while every configuration keeps its own learning
rate, weight decay, L1, momentum, dropout, early stopping and best epoch. A configuration that
stops early is dropped from the stack (model and optimizer state), so the survivors do not pay
for it: a batched sweep does the arithmetic of the sequential one, in fewer, wider operations.

Cross-validation folds and learning-curve sizes are more heads of the same stack: they share its
shuffled mini-batches and weight the rows outside their own training set zero (``masks``), so a
5-fold sweep is one pass of 5x as many heads, each fold folding its own standardisation into its
first layer; an MLP stack's batches come gathered per row set, so a fold head computes its own rows
of each batch only. Plain configurations (no rows of their own) train exactly as before, with no mask.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featcache.pipeline.heads import progress
from featcache.pipeline.heads.masks import (
    BatchRows,
    HeadTask,
    RowSets,
    as_task,
    eval_sets,
    head_statistics,
    masked_evaluate,
    row_sets,
    statistics_sets,
)
from featcache.pipeline.heads.optim import StackedOptimizer
from featcache.pipeline.heads.source import RowSource
from featcache.pipeline.heads.stacked import StackedHead, head_span
from featcache.pipeline.heads.train_types import FitResult, HeadParams, TrainData, TrainSettings

__all__ = ["FitResult", "HeadParams", "HeadTask", "TrainData", "TrainSettings", "evaluate_stacked", "train_group",
           "train_many"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def stacked_logits(model: StackedHead, x: torch.Tensor, mask: torch.Tensor | None = None,
                   heads: torch.Tensor | None = None, groups: list[int] | None = None) -> torch.Tensor:
    """Logits of every head laid out (B, C, K) for a shared input x (B, D).

    A linear stack is computed as one (B, D) @ (D, C*K) GEMM: ``torch.matmul`` would broadcast x to
    (K, B, D), run K narrow GEMMs and materialise that copy again in backward. The (B, C, K) layout
    lets cross-entropy run over dim 1 with K contiguous, which is ~8x faster than over K*B rows of
    10 classes. Per-head input statistics are folded into the weights (``StackedHead.first_layer``),
    so folds with their own standardisation share the GEMM too.

    Args:
        model: the stack; x: (B, D), or (G, B, D) row groups of an MLP's training batch (``groups``).
        mask: (K, B) float row weights for batch norm (training), or None.
        heads: (h,) long: only those heads (evaluation), or None = all; then K = h.
        groups: (K,) per head its row group of x (``StackedHead.forward``), or None.
    """
    if not model.hidden and x.dim() == 2:
        w, b = model.first_layer(heads)  # (K, D, C), (K, C)
        k, d, c = w.shape
        return torch.addmm(b.t().reshape(c * k), x, w.permute(1, 2, 0).reshape(d, c * k)).view(-1, c, k)
    return model(x, mask, heads, groups).permute(1, 2, 0)


def evaluate_stacked(model: StackedHead, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy per head, shape (K,) each, in eval mode."""
    return masked_evaluate(model, X, y, stacked_logits, None)


def _flush_subnormal(grad: torch.Tensor) -> torch.Tensor:
    """Zero gradient entries below the smallest normal float (~1.2e-38).

    Confident heads produce softmax gradients that underflow into subnormal numbers, and CPU GEMMs
    on subnormal inputs run ~50x slower (measured 16 ms -> 780 ms for one backward GEMM).
    """
    return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)


def _weight_norm(model: StackedHead) -> torch.Tensor:
    """Frobenius norm of all weight matrices per head (K,): the regularisation diagnostic. One
    reduction per matrix: squaring first would write a (K, D, H) temporary."""
    return torch.sqrt(sum(torch.linalg.vector_norm(w.detach(), dim=(1, 2)) ** 2 for w in model.weights))


def _replace_state(model: StackedHead, state: dict[str, torch.Tensor]) -> None:
    """Swap every parameter and buffer for the given tensors (all (K', ...)); K' may differ from K."""
    model.replace_state(state)


def _optimizer(model: StackedHead, kind: str, hp: dict[str, torch.Tensor]) -> StackedOptimizer:
    return StackedOptimizer(model.decay_parameters(), model.other_parameters(), kind,
                            hp["lr"], hp["weight_decay"], hp["momentum"])


def _save_heads(best: dict[str, torch.Tensor], model: StackedHead, rows: torch.Tensor,
                local: torch.Tensor | None = None) -> None:
    """Copy the stack's heads ``local`` (CPU indices into the stack; None = every head) into the
    all-heads state ``best`` at ``rows`` (their global indices, CPU). Runs of consecutive heads,
    the usual case, copy slice to slice: no gathered (k, D, H) temporary, no scatter."""
    dst = head_span(rows)
    src = slice(None) if local is None else head_span(local)
    for name, t in model.state_dict().items():
        part = t.detach()[src if isinstance(src, slice) else src.to(t.device)]
        if isinstance(dst, slice):
            best[name][dst].copy_(part)
        else:
            best[name][dst.to(t.device)] = part


def _drop_stopped(model: StackedHead, opt: StackedOptimizer, hp: dict[str, torch.Tensor],
                  keep: torch.Tensor) -> StackedOptimizer:
    """Keep heads ``keep`` (local indices) in the model, the per-head values ``hp`` (in place) and
    the optimizer state; return the optimizer rebuilt over the new parameter tensors."""
    _replace_state(model, {name: t[keep] for name, t in model.state_dict().items()})
    for name in hp:
        hp[name] = hp[name][keep]
    new = _optimizer(model, opt.kind, hp)
    new.keep_heads(opt, keep)  # step counts and moments of the survivors
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


def _uses_views(task: HeadTask, data: TrainData) -> bool:
    return data.views is not None and task.views


def _build(tasks: list[HeadTask], data: TrainData) -> tuple[StackedHead, StackedOptimizer, dict[str, torch.Tensor]]:
    """The stacked model (with each head's own input statistics, if any), its optimizer and per-head values."""
    params = [t.params for t in tasks]
    first, dev = params[0], data.X.device
    hp = {name: torch.tensor([float(getattr(p, name)) for p in params], device=dev)
          for name in ("lr", "weight_decay", "momentum", "l1")}
    model = StackedHead(data.X.shape[1], first.hidden, data.n_classes, [p.seed for p in params],
                        torch.tensor([p.dropout for p in params]), first.batchnorm).to(dev)
    stats = head_statistics(data.X, tasks)  # (K, D) mean and scale from each head's own rows, or None
    if stats is not None:
        model.set_input_stats(*stats, statistics_sets(tasks))
    model.generator = torch.Generator(device=dev).manual_seed(first.seed + 1)
    return model, _optimizer(model, first.optimizer, hp), hp


@dataclass
class _Batch:
    """One mini-batch: rows (B, D) shared by every head, labels (B,), per-head 0/1 row masks (K, B)
    or None (all 1), the heads that take the step ((K,) bool on the device, or None = all) and the
    rows' loss weights (B,) (``TrainData.sample_weight``) or None (all 1).

    Gathered per row set (``masks.BatchRows``): x is (G, B, D), row group g's rows, ``groups`` the
    group of each head, and y and row_weight are each head's, (B, K)."""

    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor | None
    active: torch.Tensor | None
    row_weight: torch.Tensor | None = None
    groups: list[int] | None = None

    def targets(self, k: int) -> torch.Tensor:
        """(B, K) label of each row for each head."""
        return self.y if self.y.dim() == 2 else self.y[:, None].expand(-1, k)

    def loss_weights(self) -> torch.Tensor | None:
        """(B, K) or (B, 1) weight of each row in each head's loss: its mask times its row weight;
        None = every row 1 (the plain mean)."""
        rw = self.row_weight if self.row_weight is None or self.row_weight.dim() == 2 else self.row_weight[:, None]
        if self.weights is None:
            return rw
        wt = self.weights.t()
        return wt if rw is None else wt * rw


def _batches(src: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, bs: int, sets: RowSets | None,
             heads: torch.Tensor | None, min_rows: int, sample_weight: torch.Tensor | None = None,
             gather: bool = False):
    """This epoch's shared batches in the order ``perm`` (CPU). ``heads``: (k,) CPU row-set index of
    each head in the stack. With row sets, heads with fewer than ``min_rows`` rows in a batch sit it
    out (weights 0, not ``active``); a batch nobody can use is skipped (batch norm cannot normalise
    one row). ``sample_weight``: (N,) loss weight of each pool row, or None. ``gather`` (an MLP
    stack): a batch whose row sets all leave rows out comes gathered per set (``masks.BatchRows``)."""
    dev = src.device
    perm_dev = perm.to(dev)
    if sets is not None:
        counts = sets.batch_counts(perm, bs, heads)  # (k, steps) on the CPU: gating needs no device sync
        heads_dev = heads.to(dev)
        # a set of every row never leaves a row out: no step would gather, so no plan is made
        plan = sets.gathered(perm, bs, heads) if gather and not sets.covers_pool(heads) else None
    for step, s in enumerate(range(0, len(perm), bs)):
        idx = perm_dev[s: s + bs]
        if sets is None:
            if len(idx) >= min_rows:
                yield _shared_batch(src, y, idx, sample_weight)
            continue
        live = counts[:, step] >= min_rows  # (k,) CPU bool
        if not bool(live.any()):
            continue
        if plan is not None and plan.width[step] < len(idx):  # every set leaves rows of this batch out
            b = _gathered_batch(src, y, sample_weight, plan, step)
        else:
            b = _shared_batch(src, y, idx, sample_weight)
            b.weights = sets.batch_mask(idx, heads_dev)
        if not bool(live.all()):
            on = live.to(dev)
            b.weights, b.active = b.weights * on[:, None], on
        yield b


def _shared_batch(src: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, sample_weight: torch.Tensor | None) -> _Batch:
    """The pool rows ``idx`` (device, (B,)) as one batch every head reads (no masks yet)."""
    # index_select: the same rows as src[idx], ~5x faster on the CPU (186 -> 35 us for 256 x 1,280)
    wb = None if sample_weight is None else torch.index_select(sample_weight, 0, idx)
    return _Batch(torch.index_select(src, 0, idx), torch.index_select(y, 0, idx), None, None, wb)


def _gathered_batch(src: torch.Tensor, y: torch.Tensor, sample_weight: torch.Tensor | None, plan: BatchRows,
                    step: int) -> _Batch:
    """Step ``step``'s batch as each row set's own rows (``masks.BatchRows``): x (G, W, D), each
    head's labels and row weights (W, K), its 0/1 weights (K, W)."""
    rows, mask = plan.step(step)  # (G, W), (K, W)
    g, width = rows.shape
    flat = rows.reshape(-1)
    x = torch.index_select(src, 0, flat).view(g, width, -1)
    per_head = plan.of_head

    def heads_of(t: torch.Tensor) -> torch.Tensor:  # (N,) pool values -> (W, K) each head's rows
        return torch.index_select(torch.index_select(t, 0, flat).view(g, width), 0, per_head).t()

    rw = None if sample_weight is None else heads_of(sample_weight)
    return _Batch(x, heads_of(y), mask, None, rw, plan.groups)


def _stream_batches(src, y: torch.Tensor, bs: int, gen: torch.Generator, min_rows: int,
                    sample_weight: torch.Tensor | None):
    """This epoch's batches of a streamed pool (heads/stream.py ``epoch_batches``: every row once)."""
    for pos, xb in src.epoch_batches(bs, gen, src.window_rows, min_rows):
        yield _Batch(xb, y[pos], None, None, None if sample_weight is None else sample_weight[pos])


def _stream_evaluate(model: StackedHead, src, y: torch.Tensor, logits_of, groups,
                     weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_evaluate`` over a streamed evaluation split, chunk by chunk (every head on every
    row: ``groups`` is None for the plain configurations that stream): (K,) mean loss, accuracy."""
    loss = torch.zeros(model.k, dtype=torch.float64, device=y.device)
    hits = torch.zeros_like(loss)
    mass = 0.0
    for rows, xc in src.chunks():
        w = None if weight is None else weight[rows]
        lc, ac = masked_evaluate(model, xc, y[rows], logits_of, groups, w)
        m = float(len(xc)) if w is None else float(w.sum())
        loss += lc.double() * m
        hits += ac.double() * len(xc)
        mass += m
    return (loss / max(mass, 1e-12)).float(), (hits / max(len(src), 1)).float()


def _step(model: StackedHead, opt: StackedOptimizer, b: _Batch, l1: torch.Tensor | None,
          flush: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of every head on a shared batch; returns its (K,) weighted loss sum (the
    loss times the batch's weight mass) and (unweighted) hits on the head's own rows.

    Row weights (``--class-weight``) make each head's loss the weighted mean sum_i w_i ce_i / sum_i w_i
    over its rows of the batch, w_i = mask x row weight: torch's ``CrossEntropyLoss(weight=...)``
    (reduction "mean") normalises exactly so per batch. We keep that convention, not scikit-learn's
    un-normalised sum, because it leaves the loss's scale, so the meaning of --lr and of weight
    decay relative to the data term, independent of the weights' scale: constant weights train
    exactly as none, and balanced weights only shift which rows the mean leans on.
    """
    k = model.k
    logits = stacked_logits(model, b.x, b.weights, groups=b.groups)  # (B, C, K); batch norm takes the 0/1 masks
    if flush:
        logits.register_hook(_flush_subnormal)
    y = b.targets(k)  # (B, K)
    ce = F.cross_entropy(logits, y, reduction="none")  # (B, K)
    hit = logits.detach().max(1).indices == y
    wt = b.loss_weights()  # (B, K) or (B, 1), or None
    if wt is None:
        cnt: torch.Tensor | int = len(b.y)
        loss = ce.mean(0)  # (K,)
    else:  # weighted mean over each head's own rows of the batch; rows outside its set weigh exactly 0
        cnt = wt.sum(0)  # (K,) or (1,): the batch's weight mass per head
        loss = (ce * wt).sum(0) / torch.where(cnt > 0, cnt, 1.0)  # a head with no row here: 0 / 1
        if b.weights is not None:
            hit = hit * b.weights.t()
    opt.zero_grad()
    loss.sum().backward()  # heads are independent: the sum's gradient is each head's own
    if l1 is not None:  # d/dW of l1 * sum|W| is l1 * sign(W) (autograd's abs rule), added in place
        for w in model.decay_parameters():
            w.grad.addcmul_(torch.sign(w.detach()), l1.view(-1, *([1] * (w.ndim - 1))))
    opt.step(b.active)
    return loss.detach() * cnt, hit.sum(0)


def _train_epoch(model: StackedHead, opt: StackedOptimizer, batches, l1: torch.Tensor | None,
                 flush: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``batches`` (``_batches``): (K,) summed training loss and hits per head."""
    loss_sum = torch.zeros(model.k, device=model.dropout.device)
    correct = torch.zeros(model.k, device=model.dropout.device)
    for batch in batches:
        ls, hits = _step(model, opt, batch, l1, flush)
        loss_sum += ls
        correct += hits
    return loss_sum, correct


def _weight_mass(sample_weight: torch.Tensor, sets: RowSets | None, k: int) -> torch.Tensor:
    """(K,) total loss weight of each head's training rows: the epoch's training loss is its
    weighted sum over them divided by this (a weighted mean, as each step's loss)."""
    if sets is None:
        return sample_weight.sum().expand(k)
    return (sets.masks @ sample_weight)[sets.of_head.to(sample_weight.device)]


def train_group(tasks: list[HeadTask | HeadParams], *, data: TrainData, settings: TrainSettings) -> list[FitResult]:
    """Train heads that share ``group_key()`` (and views or not) as one stacked model.

    Every head sees the same shuffled mini-batch of the pool each step; heads with rows of their own
    (folds, training-set sizes) weight the rest zero, and heads that standardise fold their own
    statistics into their first layer (see ``masks``). A head whose training loss or weight norm
    becomes non-finite (it diverged) stops there and is returned with ``failed=True``.

    With row weights (``data.sample_weight``, ``--class-weight``) every loss in the history is the
    weighted mean cross-entropy, the objective being minimised: ``train_loss`` over the head's
    rows, and ``val_loss`` over its evaluation rows weighted by ``data.val_weight`` (the same
    per-class weights). Early stopping and the kept epoch therefore follow the weighted validation
    loss: with balanced weights, stopping on the plain loss would reward the epochs that still
    favour the majority class, undoing the weighting the user asked for (scikit-learn's
    LogisticRegression has no early stopping, so nothing to follow there). Accuracies stay plain
    shares of rows, train and val alike, so they compare with an unweighted run's.

    Args:
        tasks: the heads, all with the same ``group_key()`` and all sampling views or none.
        data: the training pool, evaluation rows and views (``TrainData``).
        settings: epochs, batch size, patience.
    Returns:
        One FitResult per head, in the order given.
    """
    tasks = [as_task(t) for t in tasks]
    order = sorted(range(len(tasks)), key=statistics_sets(tasks).__getitem__)  # stable
    if order != list(range(len(tasks))):  # heads sharing statistics side by side (one run each, see stacked)
        done = train_group([tasks[j] for j in order], data=data, settings=settings)
        out: list[FitResult] = [None] * len(tasks)  # type: ignore[list-item]
        for pos, j in enumerate(order):
            out[j] = done[pos]
        return out
    params = [t.params for t in tasks]
    first = params[0]
    if first.batchnorm and first.hidden and settings.batch_size < 2:
        raise ValueError("batch norm needs a batch size of at least 2: one row cannot be normalised")
    if len({_uses_views(t, data) for t in tasks}) > 1:
        raise ValueError("heads of one stack must all sample the views or none (train_many groups them)")
    X, y, Xv, yv = data.X, data.y, data.Xv, data.yv
    streamed = isinstance(X, RowSource)
    dev, n, bs = X.device, len(X), settings.batch_size
    k_all = len(params)
    model, opt, hp = _build(tasks, data)
    order_gen = torch.Generator().manual_seed(first.seed)  # one data order shared by the group
    view_gen = torch.Generator().manual_seed(first.seed + 2)  # which view each row shows, per epoch
    keep_gen = torch.Generator().manual_seed(first.seed + 3)  # which rows show their original instead
    use_views = _uses_views(tasks[0], data)
    sets = row_sets(tasks, n, dev)  # (S, N) masks of the distinct training-row sets, or None
    min_rows = 2 if model.batchnorm else 1
    n_rows = torch.tensor([float(t.n_rows(n)) for t in tasks], device=dev)
    mass = n_rows if data.sample_weight is None else _weight_mass(data.sample_weight, sets, k_all)
    has_val = Xv is not None and len(Xv) > 0
    evals = eval_sets(tasks, dev) if has_val else None  # each head's own evaluation rows, or None = all
    early = has_val and settings.patience > 0
    if streamed and (sets is not None or evals is not None or use_views or any(t.standardize for t in tasks)):
        raise ValueError("a streamed pool trains plain configurations only (no row sets, views or per-head statistics)")
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
        progress.tick(unit="epoch")  # fit-head's bar (heads/progress.py); nothing without one
        t_epoch = time.perf_counter()
        k = len(active)
        act = active.tolist()
        l1 = hp["l1"] if bool((hp["l1"] > 0).any()) else None  # once per epoch, not a device sync per step
        model.train()
        if streamed:
            batches = _stream_batches(X, y, bs, order_gen, min_rows, data.sample_weight)
        else:
            src = _epoch_rows(data, view_gen, keep_gen) if use_views else X
            perm = torch.randperm(n, generator=order_gen)
            batches = _batches(src, y, perm, bs, sets, None if sets is None else sets.of_head[active], min_rows,
                               data.sample_weight, gather=bool(model.hidden))
        loss_sum, correct = _train_epoch(model, opt, batches, l1, flush)
        act_dev = active.to(dev)
        # the loss as trained (weighted mean over the head's rows), the accuracy plain (a share of rows)
        record = {"train_loss": loss_sum / mass[act_dev], "train_accuracy": correct / n_rows[act_dev],
                  "weight_norm": _weight_norm(model)}
        if has_val:
            groups = None if evals is None else evals.groups(active)
            evaluate = _stream_evaluate if streamed else masked_evaluate
            record["val_loss"], record["val_accuracy"] = evaluate(model, Xv, yv, stacked_logits, groups,
                                                                  data.val_weight)
        lists = {key: v.tolist() for key, v in record.items()}  # one device sync per epoch
        for j, g in enumerate(act):
            histories[g].append({"epoch": epoch, **{key: vals[j] for key, vals in lists.items()}})
        # (k,): a diverged head stops here: its loss, or the norm of its weights, is no longer finite
        finite = torch.isfinite(torch.tensor(lists["train_loss"])) & torch.isfinite(torch.tensor(lists["weight_norm"]))
        failed[active[~finite]] = True
        if early:
            vl = record["val_loss"].cpu()
            improved = (vl < best_loss[active]) & finite  # (k,) bool
            best_loss[active] = torch.where(improved, vl, best_loss[active])
            best_epoch[active[improved]] = epoch
            wait[active] = torch.where(improved, 0, wait[active] + 1)
            if bool(improved.any()):
                imp = improved.nonzero().squeeze(1)
                _save_heads(best_state, model, active[imp], imp)  # copy the improved heads' weights aside
            keep = ((wait[active] < settings.patience) & finite).nonzero().squeeze(1)
        else:
            best_epoch[active[finite]] = epoch
            keep = finite.nonzero().squeeze(1)
        seconds[active] += (time.perf_counter() - t_epoch) / k
        if len(keep) < k and not early:  # the last finite weights of the heads leaving the stack
            _save_heads(best_state, model, active)
        if len(keep) == 0:
            break
        if len(keep) < k:  # some heads stopped: train only the others from now on
            opt = _drop_stopped(model, opt, hp, keep.to(dev))
            active = active[keep]
    else:
        if not early:  # every epoch ran: the survivors keep their last weights
            _save_heads(best_state, model, active)
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
    """Group heads by shape/optimizer/seed (and views or not), train each group stacked, keep input order.

    Args:
        tasks: configurations (every head trains on the whole pool, scored on every evaluation row)
            or HeadTasks (each with its own rows: folds, training-set sizes; they share the stack's
            batches, see ``masks``).
        data: the training pool, evaluation rows and views.
        settings: epochs, batch size, patience.
    Returns:
        One FitResult per task, in the order given.
    """
    _reuse_freed_blocks()
    tasks = [as_task(t) for t in tasks]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault((t.params.group_key(), _uses_views(t, data)), []).append(i)
    results: list[FitResult | None] = [None] * len(tasks)
    for idx in groups.values():
        for i, r in zip(idx, train_group([tasks[i] for i in idx], data=data, settings=settings)):
            results[i] = r
    return results  # type: ignore[return-value]
