"""Per-head row masks: what each head of a stack trains on, is scored on, and is standardised with.

A cross-validation fold or a learning-curve training-set size is nothing but a different set of
training rows (and, for a fold, a different set of held-out rows), so folds and sizes become more
heads of one stack. Each head gets its own permutation of its own rows every epoch (drawn from a
generator seeded like a lone run's, so a head with rows T equals a lone run on X[T]); each step
gathers a (K, B, D) batch, one row block per head. A head whose last batch is short is padded with
weight-0 rows (its loss is the mean over its real rows); heads in one stack take the same number of
steps per epoch (``train_many`` groups them so), so no head ever sits out an optimizer step.

Per-fold standardisation is done here, on the fly: each head holds a (D,) mean and scale computed
from its own training rows, applied to every gathered batch and to the rows it is scored on. That
costs 2 x K x D floats, where K standardised copies of the data would cost K x N x D (x V with views).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featcache.pipeline.heads.train_types import HeadParams

EVAL_CHUNK = 8192  # rows per evaluation forward, bounds (rows, C, K) logits memory


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
        return math.ceil(self.n_rows(n_pool) / batch_size)

    @property
    def masked(self) -> bool:
        """Whether this head needs its own batches (not the shared full-pool batch)."""
        return self.rows is not None or self.standardize


def as_task(t: HeadTask | HeadParams) -> HeadTask:
    return t if isinstance(t, HeadTask) else HeadTask(t)


def head_statistics(X: torch.Tensor, tasks: list[HeadTask]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(K, D) mean and scale per head from its own training rows (float64 sums), or None when no
    head standardises; heads that do not standardise get mean 0, scale 1."""
    if not any(t.standardize for t in tasks):
        return None
    k, d = len(tasks), X.shape[1]
    mean, scale = torch.zeros(k, d, device=X.device), torch.ones(k, d, device=X.device)
    for j, t in enumerate(tasks):
        if t.standardize:
            rows = X if t.rows is None else X[torch.as_tensor(t.rows, device=X.device)]
            r = rows.double()
            s = r.std(0, unbiased=False)
            s[s < 1e-6] = 1.0  # as data.prepare: constant features stay at zero
            mean[j], scale[j] = r.mean(0).float(), s.float()
    return mean, scale


def epoch_index(tasks: list[HeadTask], gens: list[torch.Generator], n_pool: int, batch_size: int,
                offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This epoch's (K, steps * B) row indices and weights (1 = real row, 0 = padding).

    Head j's rows, in the order of ``randperm(len(rows), generator=gens[j])``, shifted by
    ``offsets[j]`` (0, or n_pool to read the epoch's augmented copy of the pool)."""
    steps = tasks[0].steps(n_pool, batch_size)
    width = steps * batch_size
    idx = torch.zeros(len(tasks), width, dtype=torch.long)
    w = torch.zeros(len(tasks), width)
    for j, (t, g) in enumerate(zip(tasks, gens)):
        n = t.n_rows(n_pool)
        perm = torch.randperm(n, generator=g)
        rows = perm if t.rows is None else torch.as_tensor(t.rows, dtype=torch.long)[perm]
        idx[j, :n] = rows + offsets[j]
        w[j, :n] = 1.0
    return idx, w


def standardized(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x (K, B, D) or (B, D) -> (K, B, D) z-scored per head; x unchanged when stats is None."""
    if stats is None:
        return x
    mean, scale = stats
    return (x - mean[:, None, :]) / scale[:, None, :]


def masked_evaluate(model, X: torch.Tensor, y: torch.Tensor, logits_of, eval_mask: torch.Tensor | None,
                    stats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy per head (K,) over each head's own evaluation rows.

    Args:
        X, y: every evaluation row (Nv, D), (Nv,).
        logits_of: (model, x) -> (b, C, K) logits.
        eval_mask: (K, Nv) float, 1 where the row belongs to the head's evaluation set; None = all rows.
        stats: per-head standardisation, or None.
    """
    model.eval()
    k = model.k
    loss = torch.zeros(k, device=X.device, dtype=torch.float64)
    correct = torch.zeros(k, device=X.device, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(X), EVAL_CHUNK):
            xb = standardized(X[s: s + EVAL_CHUNK], stats)
            logits = logits_of(model, xb)  # (b, C, K)
            yb = y[s: s + EVAL_CHUNK]
            ce = F.cross_entropy(logits, yb[:, None].expand(-1, k), reduction="none")  # (b, K)
            hit = (logits.max(1).indices == yb[:, None]).double()
            if eval_mask is None:
                loss += ce.sum(0).double()
                correct += hit.sum(0)
            else:
                m = eval_mask[:, s: s + EVAL_CHUNK].t().double()  # (b, K)
                loss += (ce.double() * m).sum(0)
                correct += (hit * m).sum(0)
    n = torch.full((k,), float(len(X)), device=X.device, dtype=torch.float64) if eval_mask is None \
        else eval_mask.sum(1).double()
    return (loss / n).float(), (correct / n).float()


def eval_mask(tasks: list[HeadTask], n_eval: int, device: torch.device) -> torch.Tensor | None:
    """(K, Nv) float membership of each head's evaluation rows, or None when every head uses all."""
    if all(t.eval_rows is None for t in tasks):
        return None
    m = torch.zeros(len(tasks), n_eval, device=device)
    for j, t in enumerate(tasks):
        if t.eval_rows is None:
            m[j] = 1.0
        else:
            m[j, torch.as_tensor(np.asarray(t.eval_rows), device=device)] = 1.0
    return m
