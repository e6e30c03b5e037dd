"""Per-head row masks: what each head of a stack trains on, is scored on, and is standardised with.

A cross-validation fold or a learning-curve training-set size is nothing but a different set of
training rows (and, for a fold, a different set of held-out rows), so folds and sizes become more
heads of one stack, and they share every mini-batch:

- Each epoch the stack draws one permutation of the whole pool (N rows) and walks it in batches of
  B; every head gets the same (B, D) batch, so one matrix product serves every configuration, fold
  and size. A (K, B) 0/1 mask zeroes, per head, the rows outside its training set: head k's loss is
  sum(mask_k * CE) / max(sum(mask_k), 1), the mean over its own rows in the batch. A row outside a
  head's set contributes an exact zero to that head's loss, gradient and batch-norm statistics
  (``StackedHead`` normalises over the masked rows only). An MLP stack, where the per-row products
  dominate a step, skips most of those rows altogether: its batches come gathered per row set,
  each set's rows of the batch padded with zero-weight rows to the step's largest count
  (``BatchRows``), so a 4/5 fold head computes ~4/5 of the batch, not all of it.
- A head with rows T therefore sees each of them exactly once per epoch, in the pool's order, but
  in the pool's ceil(N / B) steps, each holding ~B |T| / N of its rows (a hypergeometric count),
  where a lone run on X[T] takes ceil(|T| / B) steps of B rows. It trains like a lone run with batch
  size B |T| / N: N / |T| times as many, smaller, noisier steps per epoch (a 4/5 fold: 25% more
  steps of 4/5 of a batch; a learning-curve size of 10% of the pool: 10x as many steps of a tenth).
  The learning rate is not rescaled: Adam's steps do not grow with the batch, and the difference
  to a lone fold run is within run-to-run noise (tests/heads/test_cv.py checks fold accuracies against
  K separate runs over several seeds). Equivalence is statistical, no longer bitwise.
- A head with no row in a batch (fewer than two with batch norm) sits that step out: no update, no
  moment decay, no step counted (``StackedOptimizer.step(active=...)``), as a lone run has no such
  step. Counts per batch are computed on the CPU once per epoch, so gating costs no device sync.

Per-fold standardisation lives in each head's first layer (``StackedHead.set_input_stats``): a
head's (D,) mean and scale come from its own training rows once; a linear stack folds them into
its weights, an MLP standardises the shared batch once per distinct fold (see ``stacked``), and
neither training nor evaluation ever builds a (K, B, D) standardised copy of the rows. Evaluation
scores each head on its own rows only (a fold head on its held-out fold), in chunks sized by a
byte budget over K and the layer widths (``eval_chunk_rows``).

Heads sharing one row set (every configuration of a fold) share its mask row and statistics: masks
are (S, N) for S distinct row sets, indexed per head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featcache.pipeline.heads.train_types import HeadParams

EVAL_BUDGET = 64 << 20  # bytes of per-head activations one evaluation chunk may hold
STATS_BLOCK = 8192  # rows per block of the per-row-set statistics pass


@dataclass(frozen=True)
class HeadTask:
    """One head of a stack: a configuration and the rows it sees.

    Attributes:
        params: the hyperparameters.
        rows: indices into the training pool this head trains on; None = every row.
        eval_rows: indices into the evaluation rows it is scored and early-stopped on; None = all.
        standardize: z-score its inputs with its own training rows' mean and std (CV folds).
        views: sample the pool's augmented views (when there are any); False = the originals only.
    """

    params: HeadParams
    rows: np.ndarray | None = None
    eval_rows: np.ndarray | None = None
    standardize: bool = False
    views: bool = True

    def n_rows(self, n_pool: int) -> int:
        return n_pool if self.rows is None else len(self.rows)

    def steps(self, n_pool: int, batch_size: int) -> int:
        """Optimizer steps per epoch: the pool's, whatever its own rows (they share its batches)."""
        return math.ceil(n_pool / batch_size)


def as_task(t: HeadTask | HeadParams) -> HeadTask:
    return t if isinstance(t, HeadTask) else HeadTask(t)


def _key(rows: np.ndarray | None) -> bytes | None:
    return None if rows is None else np.asarray(rows, dtype=np.int64).tobytes()


def head_statistics(X: torch.Tensor, tasks: list[HeadTask]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(K, D) mean and scale (population std) per head from its own training rows, or None when no
    head standardises; heads that do not standardise get mean 0, scale 1.

    Every distinct row set's sums come from one pass over the rows in blocks: (S, b) 0/1 masks @
    (b, D) in float64, on rows shifted by a rough centre so that E[x^2] - E[x]^2 does not cancel.
    """
    if not any(t.standardize for t in tasks):
        return None
    sets = {_key(t.rows): t.rows for t in tasks if t.standardize}  # distinct row sets, first seen first
    keys = list(sets)
    n, d = X.shape
    masks = torch.zeros(len(keys), n, dtype=torch.float64, device=X.device)
    for i, rows in enumerate(sets.values()):
        masks[i, slice(None) if rows is None else torch.as_tensor(np.asarray(rows), device=X.device)] = 1.0
    centre = X[:STATS_BLOCK].double().mean(0)
    s1 = torch.zeros(len(keys), d, dtype=torch.float64, device=X.device)
    s2 = torch.zeros_like(s1)
    for b in range(0, n, STATS_BLOCK):
        xc = X[b: b + STATS_BLOCK].double() - centre  # (b, D)
        m = masks[:, b: b + STATS_BLOCK]
        s1 += m @ xc
        s2 += m @ (xc * xc)
    cnt = masks.sum(1, keepdim=True)
    mean_c = s1 / cnt
    std = (s2 / cnt - mean_c ** 2).clamp(min=0).sqrt()
    std[std < 1e-6] = 1.0  # as data.prepare: constant features stay at zero
    mean, scale = torch.zeros(len(tasks), d, device=X.device), torch.ones(len(tasks), d, device=X.device)
    for j, t in enumerate(tasks):
        if t.standardize:
            i = keys.index(_key(t.rows))
            mean[j], scale[j] = (mean_c[i] + centre).float(), std[i].float()
    return mean, scale


def statistics_sets(tasks: list[HeadTask]) -> list[int]:
    """Per head, the id of its statistics (equal ids = equal mean and scale): -1 for heads that do
    not standardise, else the index of its training-row set among the standardising heads'."""
    keys: dict[bytes | None, int] = {}
    return [keys.setdefault(_key(t.rows), len(keys)) if t.standardize else -1 for t in tasks]


@dataclass
class RowSets:
    """The distinct training-row sets of a stack's heads as 0/1 masks over the pool.

    Attributes:
        masks: (S, N) float on the training device: 1 where the row is in the set.
        masks_cpu: (S, N) bool on the CPU, to count each head's rows per batch without a device sync.
        of_head: (K,) long on the CPU: the set of each head.
    """

    masks: torch.Tensor
    masks_cpu: torch.Tensor
    of_head: torch.Tensor

    def batch_counts(self, perm: torch.Tensor, batch_size: int, heads: torch.Tensor) -> torch.Tensor:
        """(k, steps) rows of each of ``heads`` (CPU set indices, (k,)) in each batch of this epoch's
        order ``perm`` (CPU, (N,))."""
        taken = self.masks_cpu[:, perm].to(torch.int32)  # (S, N) in batch order
        pad = -taken.shape[1] % batch_size
        per_set = F.pad(taken, (0, pad)).view(len(taken), -1, batch_size).sum(2)  # (S, steps)
        return per_set[heads]

    def batch_mask(self, idx: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """(k, B) float weights of the batch rows ``idx`` (device, (B,)) for ``heads`` (set indices
        on the device, (k,))."""
        return torch.index_select(torch.index_select(self.masks, 1, idx), 0, heads)

    def covers_pool(self, heads: torch.Tensor) -> bool:
        """Whether one of the sets of ``heads`` (CPU set indices) holds every row of the pool."""
        return bool(self.masks_cpu[torch.unique(heads)].all(1).any())

    def gathered(self, perm: torch.Tensor, batch_size: int, heads: torch.Tensor) -> BatchRows:
        """Each batch of this epoch's order ``perm`` (CPU, (N,)) as the rows of each distinct set of
        ``heads`` (CPU set indices, (k,)): computed once an epoch on the CPU, moved once."""
        ids, of_head = torch.unique(heads, return_inverse=True)  # the G sets these heads train on
        n, dev = len(perm), self.masks.device
        pad = -n % batch_size
        taken = F.pad(self.masks_cpu[ids][:, perm].to(torch.uint8), (0, pad)).view(len(ids), -1, batch_size)
        # a set's rows first, in batch order, then the batch's other rows (stable sort of 1s before 0s)
        pos = torch.sort(taken, dim=2, descending=True, stable=True).indices  # (G, steps, B)
        order = F.pad(perm, (0, pad)).view(1, -1, batch_size).expand(len(ids), -1, -1)
        width = taken.sum(2, dtype=torch.int64).amax(0).tolist()
        return BatchRows(torch.gather(order, 2, pos).to(dev), torch.gather(taken, 2, pos).to(dev, torch.float32),
                         width, of_head.tolist(), of_head.to(dev))


@dataclass
class BatchRows:
    """An epoch's batches gathered per training-row set, for an MLP stack (``RowSets.gathered``).

    The heads of a fold compute only their own rows of each shared batch, not the held-out ones: a
    5-fold stack computes ~4/5 of every batch per head instead of all of it. Every set is padded to
    the step's ``width`` (its largest set's count) with other rows of the batch at weight 0, so the
    heads still form one (K, width, H) stack; a padding row enters no head's loss, gradient or
    batch-norm statistics, as a masked row of the shared batch did not. Rows and weights are the
    shared batch's, reordered: each head trains on exactly the same rows.

    Attributes:
        rows: (G, steps, B) long pool rows on the device: step s's rows of group g are rows[g, s, :width[s]].
        mask: (G, steps, B) float 0/1 on the device: 1 on the group's own rows.
        width: per step, the most rows any group has in that batch (CPU ints: no device sync).
        groups: (k,) per head, its group (CPU ints).
        of_head: the same (k,) long on the device.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    width: list[int]
    groups: list[int]
    of_head: torch.Tensor

    def step(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``s``'s (G, width) rows and (k, width) per-head weights."""
        w = self.width[s]
        return self.rows[:, s, :w], torch.index_select(self.mask[:, s, :w], 0, self.of_head)


def row_sets(tasks: list[HeadTask], n_pool: int, device: torch.device) -> RowSets | None:
    """The stack's row sets, or None when every head trains on every row of the pool."""
    if all(t.rows is None for t in tasks):
        return None
    keys: dict[bytes | None, int] = {}
    sets: list[torch.Tensor] = []
    of_head = []
    for t in tasks:
        key = _key(t.rows)
        if key not in keys:
            m = torch.ones(n_pool, dtype=torch.bool)
            if t.rows is not None:
                m = torch.zeros(n_pool, dtype=torch.bool)
                m[torch.as_tensor(np.asarray(t.rows), dtype=torch.long)] = True
            keys[key] = len(sets)
            sets.append(m)
        of_head.append(keys[key])
    cpu = torch.stack(sets)
    return RowSets(cpu.to(device=device, dtype=torch.float32), cpu, torch.tensor(of_head))


def eval_chunk_rows(k: int, widths: tuple[int, ...], budget: int = EVAL_BUDGET) -> int:
    """Evaluation rows per forward so that the per-head activations of a chunk fit ``budget`` bytes.

    Args:
        k: heads in the stack.
        widths: output width of every layer (hidden sizes, then C): each row makes k of each, fp32.
            The input chunk is a view of the rows (statistics are folded into the first layer), so
            D does not enter.
    Returns:
        max(1, budget // (4 k sum(widths))).
    """
    return max(1, budget // (4 * k * sum(widths)))


EvalGroup = tuple[torch.Tensor | None, torch.Tensor | None]  # (rows on the device, heads on the CPU); None = all


def masked_evaluate(model, X: torch.Tensor, y: torch.Tensor, logits_of, groups: list[EvalGroup] | None,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy per head (K,) over each head's own evaluation rows.

    Each group's heads are computed on that group's rows only: a fold head is scored on its held-out
    fold, never on the other 4/5 of the pool.

    Args:
        model: the StackedHead (per-head input statistics, if any, are folded into its first layer).
        X, y: every evaluation row (Nv, D), (Nv,).
        logits_of: (model, x, heads=...) -> (b, C, h) logits of the heads chosen (None = all).
        groups: (rows, heads) pairs covering every head once: (r,) row indices on X's device and (h,)
            local head indices on the CPU (the stack splits itself without a device sync), None =
            every row / every head. None = one group of every head on every row.
        weight: (Nv,) weight of each row in the loss (``--class-weight``): the loss is then the
            weighted mean sum w_i ce_i / sum w_i over the group's rows; None = the plain mean. The
            accuracy is always the plain share of rows.
    """
    model.eval()
    loss = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    correct = torch.zeros(model.k, device=X.device, dtype=torch.float64)
    for rows, heads in groups or [(None, None)]:
        gl, gc = _evaluate_group(model, X, y, logits_of, rows, heads, weight)
        if heads is None:
            loss, correct = gl, gc
        else:
            loss[heads], correct[heads] = gl, gc
    return loss.float(), correct.float()


def _evaluate_group(model, X: torch.Tensor, y: torch.Tensor, logits_of, rows: torch.Tensor | None,
                    heads: torch.Tensor | None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h,) float64 mean loss (weighted by ``weight`` (Nv,), if given) and accuracy of ``heads`` over
    ``rows``, in chunks sized by the budget."""
    k = model.k if heads is None else len(heads)
    n = len(X) if rows is None else len(rows)
    chunk = eval_chunk_rows(k, (*model.hidden, model.weights[-1].shape[-1]), EVAL_BUDGET)
    loss = torch.zeros(k, device=X.device, dtype=torch.float64)
    correct = torch.zeros(k, device=X.device, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, n, chunk):
            if rows is None:
                xb, yb = X[s: s + chunk], y[s: s + chunk]  # views: no copy
            else:
                r = rows[s: s + chunk]
                xb, yb = torch.index_select(X, 0, r), torch.index_select(y, 0, r)  # (b, D), shared by the group
            logits = logits_of(model, xb, heads=heads)  # (b, C, h): the only (rows x heads) temporary
            ce = F.cross_entropy(logits, yb[:, None].expand(-1, k), reduction="none").double()  # (b, h)
            if weight is not None:
                ce = ce * _rows_of(weight, rows, s, chunk).double()[:, None]
            loss += ce.sum(0)  # float64 sums: the chunking (it depends on K) does not show
            correct += (logits.max(1).indices == yb[:, None]).sum(0).double()
    mass = n if weight is None else (weight if rows is None else weight[rows]).double().sum()
    return loss / mass, correct / n


def _rows_of(t: torch.Tensor, rows: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor:
    """Chunk ``start`` of the evaluation rows' values of ``t`` (Nv, ...): every row, or ``rows``."""
    return t[start: start + chunk] if rows is None else torch.index_select(t, 0, rows[start: start + chunk])


@dataclass
class EvalSets:
    """The distinct evaluation-row sets of a stack's heads.

    Attributes:
        rows: per set, (r,) long row indices on the device, or None = every evaluation row.
        of_head: (K,) long on the CPU: the set of each head.
        device: the training device.
    """

    rows: list[torch.Tensor | None]
    of_head: torch.Tensor
    device: torch.device  # of ``rows``

    def groups(self, active: torch.Tensor) -> list[EvalGroup]:
        """(rows, local head indices on the CPU) per set for the heads ``active`` (global indices, CPU)."""
        of = self.of_head[active]
        locals_ = [(rows, (of == s).nonzero().squeeze(1)) for s, rows in enumerate(self.rows)]
        return [(rows, local) for rows, local in locals_ if len(local)]


def eval_sets(tasks: list[HeadTask], device: torch.device) -> EvalSets | None:
    """Each head's evaluation rows, deduplicated; None when every head is scored on every row."""
    if all(t.eval_rows is None for t in tasks):
        return None
    keys: dict[bytes | None, int] = {}
    rows: list[torch.Tensor | None] = []
    for t in tasks:
        key = _key(t.eval_rows)
        if key not in keys:
            keys[key] = len(rows)
            rows.append(None if t.eval_rows is None
                        else torch.as_tensor(np.asarray(t.eval_rows), dtype=torch.long, device=device))
    return EvalSets(rows, torch.tensor([keys[_key(t.eval_rows)] for t in tasks]), torch.device(device))
