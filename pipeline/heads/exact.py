"""The exact linear probe: scikit-learn's ``LogisticRegression(C)`` objective solved in torch, over a C path.

Objective (what sklearn 1.9's lbfgs minimises, ``_logistic.py`` + ``_linear_loss.py``), per C::

    f(W, b) = sum_i w_i * CE(x_i W^T + b, y_i) / sum_i w_i  +  ||W||^2 / (2 * C * sum_i w_i)

multinomial softmax cross-entropy for 3+ classes; for 2 classes sklearn fits one logit
(binomial loss, softmax over [0, z]) and so does this module, since a 2-class multinomial at C
equals the binomial at 2C. L2 on the weights only, the intercept is unpenalised. ``f`` is the
reported ``objective``; the minimiser is the same as that of ``C * sum(w_i CE_i) + ||W||^2 / 2``.

Why hand-written: no library minimises this in torch (GPU) for many C values at once. The solver
(heads/lbfgs.py) is a batched, preconditioned L-BFGS: every C is its own problem, but the heads of
one block share each pass over X, so the logits of H heads are one GEMM (N, D) x (D, H*K) and
their gradient another, written ``G.t() @ X`` (the (H*K, D) product directly): with torch/MKL
``X.t() @ G`` was up to 1.6x slower on the development machine (bench/linear_probe.py prints
both). C values are solved in ascending order, two per pass (a second head costs ~1.3x one on
40,000 x 2,048 rows, not 2x), each block warm started from the previous block's largest-C
solution and its curvature pairs. A C stops at sklearn's own test, max |df/dtheta| <= 1e-4, and
only once L-BFGS also expects less than 1e-6 * f of further decrease (lbfgs.GAP): the gradient
alone let warm starts and nearly separable rows stop well above the minimum.

Robustness (issue 24): columns constant under the row weights (dead ReLU channels) have weight 0
at the optimum, whatever C (their gradient is their value times the intercept's, 0 there), so they
are left out of the solve and get weight 0 in the head; Sigma's eigh falls back to float64, then
jitter, then a scalar H0 (lbfgs.safe_eigh). What was done is the result's ``note``.
Precision (issue 26): the stopping tests need full float32 matmuls, so every solve pins them
(``full_fp32``) whatever torch.set_float32_matmul_precision says process-wide, and restores it.
Folds (``fit_exact_folds``): a fold is a row weight; every fold x C is a head of one stack. Folds
standardised with their own statistics with fewer rows than 4/5 of their columns (FOLD_ROTATE_ROWS)
are solved each on its own rows in its own eigenbasis (``_rotate_folds``): a fold's heads then never
compute the held-out rows, and H0 needs no (H*K, D) x (D, D) products (2-4x faster at a quarter to
a half of D rows per fold; 14 % at 0.79 D, the digits cache's folds).
Streaming: X may be a heads.source.RowSource (row chunks); every pass over X loops over chunks.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads import progress
from featcache.pipeline.heads.lbfgs import MAX_PRECOND_DIM, History, Preconditioner, lbfgs, safe_eigh, sigma_step
from featcache.pipeline.heads.logreg import ABSENT_CLASS_BIAS, LogregResult
from featcache.pipeline.heads.source import ColumnSubset, RowSource, TensorSource
from featcache.pipeline.heads.stacked import head_span

# 10 values, 1e-4 .. 10 (three per decade and a half). On standardised features 1e-4 is a
# near-prior head (||W|| ~ C * ||X^T (Y - P)||, argmax close to class means) and 10 is already
# an almost unregularised fit of 1,000+ rows: the best C of the demo cache and the synthetic
# bench lies inside, and larger C only costs iterations (the problem gets ill-conditioned).
DEFAULT_C_PATH = tuple(float(f"{c:.3g}") for c in np.logspace(-4, 1, 10))
TOL = 1e-4  # max |gradient| of f below which a C may stop: sklearn's tol; see the module doc
MAX_ITER = 1000  # L-BFGS iterations per C, as logreg.MAX_ITER
BLOCK = 2  # C values solved together per pass over X (see bench/linear_probe.py)
# Rotate X into Sigma's eigenbasis (lbfgs.Preconditioner.rotate) when N <= ROTATE_ROWS * D: the
# product X V costs N * D^2 once, no more than the eigh of Sigma already does, and saves the two
# (H*K, D) x (D, D) products of every iteration. Those outweigh the iteration's pass over X,
# 2 (N, D) x (D, H*K), when N < D (1,078 x 1,280 on the demo cache) and still cost half as much
# at N = 2 D, over the tens to hundreds of iterations of a path
ROTATE_ROWS = 2
# Folds with their own standardisation are each solved on their own rows, rotated (_rotate_folds),
# when the largest fold has at most FOLD_ROTATE_ROWS * D rows and the copies take at most
# FOLD_ROTATE_BYTES. A fold's rows are then read once per fold (F narrow, memory-bound products)
# instead of X once for all folds (one wide product) plus the preconditioner's (d, d) products.
# fit_exact_folds, 5 folds x 10 C, one AMD EPYC core (CPU s, own rows / shared): synthetic, 1,280
# columns: fold rows 0.25 D 0.54 / 2.09, 0.44 D 1.26 / 2.76, 0.62 D 3.01 / 3.51, 0.72 D 3.46 /
# 3.79, 0.81 D 4.82 / 4.04, 1.0 D 5.92 / 4.14; the digits cache's folds, 0.79 D (863 rows, 1,095
# non-constant columns): 3.9 / 4.5 (fewer iterations with each fold's own H0). The break-even
# lies near 0.8 D.
FOLD_ROTATE_ROWS = 0.8
FOLD_ROTATE_BYTES = 512 << 20
# A column is constant when its weighted std is at most this fraction of its root mean square:
# ~16 float32 ulps, i.e. what varies is rounding (exactly 0 for a dead ReLU channel)
CONSTANT_STD = 1e-6
STAT_ROWS = 4096  # rows per float64 block of the column-statistics pass (bounds its extra memory)


@dataclass
class ExactResult(LogregResult):
    objective: float = float("nan")  # f above at the returned head (sklearn's scaling)
    note: str | None = None  # what the solve did beyond the plain one (dropped columns, eigh fallbacks)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Full float32 matmuls (no TF32 on CUDA, no bf16 on oneDNN CPUs) inside, whatever the process
    set with torch.set_float32_matmul_precision / allow_tf32; the settings are restored on exit,
    exceptions included. torch >= 2.9 has a per-backend ``fp32_precision`` (the legacy getters
    raise once both APIs were used), older torch only the legacy calls."""
    b = torch.backends
    knobs = [m for m in (b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                         getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None),
                         getattr(b.mkldnn, "rnn", None)) if m is not None]
    try:
        saved = [m.fp32_precision for m in knobs]
    except AttributeError:  # torch < 2.9: the legacy settings
        knobs = []
        saved = [torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32]
    try:
        if knobs:
            for m in knobs:
                m.fp32_precision = "ieee"
        else:
            torch.set_float32_matmul_precision("highest")
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        yield
    finally:
        if knobs:
            for m, v in zip(knobs, saved):
                m.fp32_precision = v
        else:
            torch.set_float32_matmul_precision(saved[0])
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved[1], saved[2]


def _ce_terms(z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w64: torch.Tensor, binary: bool,
              curvature: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The weighted cross-entropy of rows' logits for H heads: data term (H,) float64, gradient
    factor w (P - onehot(y)) (n, H, K) and, with ``curvature``, A (H, K, K) (see _Loss.__call__).

    Args: z (n, H, K) logits, overwritten; idx (n, H, 1) each row's true class per head; w, w64
    (n, H) row weights per head (float32 and float64). ``binary``: z holds sklearn's one logit.
    """
    if binary:  # softmax over [0, z] is the sigmoid of sklearn's binomial loss
        z = torch.cat([torch.zeros_like(z), z], 2)
    # softmax and log-sum-exp from one exp of the max-shifted logits, in place: torch.logsumexp
    # (which also guards infinite logits; these are assumed finite, and a step that overflows
    # gives a NaN f, which the line search rejects) took a third of this call on 1,078 rows
    z.sub_(z.amax(2, keepdim=True))
    zy = z.gather(2, idx)  # (n, H, 1) shifted logit of the true class
    g = torch.exp_(z)
    total = g.sum(2, keepdim=True)
    data = ((total.log() - zy).squeeze(2).double() * w64).sum(0)
    g.div_(total)  # softmax probabilities, in place of the logits
    A = None
    if curvature:
        # float64 and renormalised: float32 rows sum to 1 only within 1e-7, which would give the
        # logits' shift direction (exactly flat) a curvature of that size and H0 a huge step along it
        p = g.double()
        p = p / p.sum(2, keepdim=True)
        p = p[:, :, 1:] if binary else p  # (n, H, K) free-logit probabilities
        pw = p * w64[:, :, None]
        A = torch.diag_embed(pw.sum(0)) - torch.einsum("nhk,nhl->hkl", pw, p)
    g.scatter_add_(2, idx, torch.full_like(idx, -1, dtype=g.dtype))  # P - onehot(y)
    g.mul_(w[:, :, None])
    return data, (g[:, :, 1:] if binary else g), A


class _Loss:
    """f and its gradient for H heads at once; theta (H, K*(D+1)): K weight rows then K biases,
    K = free logits (n present classes, or 1 for a binary problem), D = the columns of the source
    it is given (r once rotated). Head h trains on fold ``fold_of[h]``: row weights w[:, fold],
    each fold's summing to 1, and, with ``affine``, that fold's own standardisation
    x' = (x - mu_f) * inv_s_f applied inside the loss (one GEMM over the source's X for all folds)."""

    def __init__(self, src: RowSource, y: torch.Tensor, w: torch.Tensor, n_free: int,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Args: src (N, D) rows; y (N,) labels in [0, n_free or 2); w (N, F) row weights per fold,
        columns summing to 1; affine: (mu, inv_s), each (F, D) in src's dtype, or None."""
        self.src, self.n, self.d, self.k = src, src.n_rows, src.n_cols, n_free
        self.binary = n_free == 1
        self.w, self.w64, self.y = w, w.double(), y
        self.mu, self.inv_s = affine if affine is not None else (None, None)
        self.fold_of = torch.zeros(1, dtype=torch.long, device=w.device)  # (H,) set per block

    def _effective(self, W: torch.Tensor, b: torch.Tensor, folds: torch.Tensor):
        """The weights and biases (H*K, D), (H*K,) that act on the source's X: W * inv_s and
        b - (W * inv_s) . mu per head's fold with ``affine``, else W and b themselves; then the
        rows' inv_s and mu (H*K, D) for the gradient's way back (None, None without affine)."""
        if self.mu is None:
            return W, b, None, None
        s, mu = self.inv_s[folds].repeat_interleave(self.k, 0), self.mu[folds].repeat_interleave(self.k, 0)
        We = W * s
        return We, b - (We.double() * mu.double()).sum(1).to(b.dtype), s, mu

    def _chunk(self, Xc: torch.Tensor, rows: slice, We: torch.Tensor, be: torch.Tensor, folds: torch.Tensor,
               curvature: bool):
        """One chunk's data term (H,) float64, gradient factor G (n, H*K) and curvature (H, K, K)."""
        n, h, k = Xc.shape[0], len(folds), self.k
        single = self.w.shape[1] == 1  # one fold: its weights broadcast over the heads
        w, w64 = (self.w[rows], self.w64[rows]) if single else (self.w[rows][:, folds], self.w64[rows][:, folds])
        z = torch.addmm(be, Xc, We.t()).view(n, h, k)  # (n, H, K) logits
        idx = self.y[rows].view(-1, 1, 1).expand(-1, h, 1)
        data, g, A = _ce_terms(z, idx, w, w64, self.binary, curvature)
        return data, g.reshape(n, h * k), A

    def __call__(self, theta: torch.Tensor, lam: torch.Tensor, heads: torch.Tensor | None = None,
                 curvature: bool = False):
        """Args: theta (H, P); lam (H,) = 1 / (C * sum(w)); heads: their indices among the block's
        heads (None = all). Returns f (H,) float64, grad (H, P), and with ``curvature`` also A
        (H, K, K) = sum_i w_i (diag(p_i) - p_i p_i^T) over the free logits: the class factor of the
        Hessian's Kronecker approximation (see lbfgs.Preconditioner)."""
        h, k, d = theta.shape[0], self.k, self.d
        folds = self.fold_of if heads is None else self.fold_of[heads]
        W, b = theta[:, : k * d].reshape(h * k, d), theta[:, k * d:].reshape(h * k)
        We, be, s, mu = self._effective(W, b, folds)
        data = torch.zeros(h, dtype=torch.float64, device=theta.device)
        gW, gb = torch.zeros_like(W), torch.zeros_like(b)
        A = torch.zeros(h, k, k, dtype=torch.float64, device=theta.device) if curvature else None
        progress.tick(unit="pass")  # one pass over X for every head of the block
        for rows, Xc in self.src.chunks():  # one chunk for an in-memory X
            dc, G, Ac = self._chunk(Xc, rows, We, be, folds, curvature)
            data += dc
            gW.addmm_(G.t(), Xc)  # (H*K, D): the fast form of X^T G
            gb += G.sum(0)
            if curvature:
                A += Ac
        if s is not None:  # back through the fold's standardisation: d/dW = (X^T G - mu sum G) * inv_s
            gW = (gW - gb[:, None] * mu) * s
        f, grad = _penalised(data, torch.cat([gW.view(h, k * d), gb.view(h, k)], 1), theta, lam, k * d)
        return (f, grad, A) if curvature else (f, grad)


def _penalised(data: torch.Tensor, grad: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor,
               n_weights: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f (H,) float64 = the data term plus lam / 2 ||W||^2, and grad (H, P) with lam W added in
    place, W = theta's first ``n_weights`` entries (the weights; the biases are not penalised)."""
    W = theta[:, :n_weights]
    grad[:, :n_weights].add_(W * lam.to(W.dtype)[:, None])
    return data + 0.5 * lam.double() * (W.double() ** 2).sum(1), grad


def _unrotate(theta: torch.Tensor, V: torch.Tensor, k: int) -> torch.Tensor:
    """Rotated rows (H, K*(r+1)) of thetas or gradients back in the original features, (H, K*(D+1)):
    W = W_r V^T, same biases. For a gradient this is exact too (its weights' part is g_r V^T, as
    x = x V V^T for every row of non-zero weight), so sklearn's tol, a max over the original
    coordinates that a rotation does not preserve, is tested on it."""
    h, r = theta.shape[0], V.shape[1]
    return torch.cat([(theta[:, : k * r].reshape(h * k, r) @ V.t()).view(h, -1), theta[:, k * r:]], 1)


@dataclass
class _FoldRotation:
    """Every fold's own standardised training rows in its own Sigma's eigenbasis (``_rotate_folds``),
    padded to common sizes: fold f's rows are Z[f, :n_f], its basis V[f, :, :r_f].

    Attributes:
        Z: (F, n, r) rotated rows, zero beyond a fold's own; rows: (F, n) their indices in X
            (padding: 0); valid: (F, n) bool, False on padding; V: (F, d, r) orthonormal columns
            (zero beyond r_f); lam_d: (F, r) Sigma's eigenvalues along them.
    """

    Z: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    V: torch.Tensor
    lam_d: torch.Tensor
    notes: list[str] = field(default_factory=list)  # eigh fallbacks taken (lbfgs.safe_eigh), for the results


def _rotate_folds(X: torch.Tensor, weights: torch.Tensor,
                  affine: tuple[torch.Tensor, torch.Tensor]) -> _FoldRotation | None:
    """Each fold's training rows (weight > 0), standardised with its own statistics, in an
    orthonormal basis of their own span that diagonalises their Sigma (``_own_basis``):
    Z_f = ((X_f - mu_f) * inv_s_f) V_f, V_f (d, r_f), r_f = min(d, n_f). W = W_r V_f^T is then the
    fold's problem exactly (its optimum lies in the span of its rows; the penalty is unchanged, V_f
    being orthonormal), a fold's heads compute only its own rows (the shared pass computes the
    held-out ones too, at weight 0) and H0 is elementwise: no (H*K, d) x (d, d) products a step.
    Each fold is written into the padded tensors as it is made (one fold's temporaries at a time).
    Returns None when some fold's eigh fails (the caller solves the shared way).

    Args: X (N, d) in memory; weights (F, N); affine (mu, inv_s) (F, d).
    """
    counts, d = (weights > 0).sum(1).tolist(), X.shape[1]
    n, r, f_ = max(counts), min(max(counts), d), len(weights)
    dev = X.device
    out = _FoldRotation(X.new_zeros(f_, n, r), torch.zeros(f_, n, dtype=torch.long, device=dev),
                        torch.zeros(f_, n, dtype=torch.bool, device=dev), X.new_zeros(f_, d, r), X.new_zeros(f_, r))
    for f in range(f_):
        rows = torch.nonzero(weights[f] > 0).flatten()
        Zf = (X.index_select(0, rows) - affine[0][f]) * affine[1][f]  # (n_f, d)
        basis = _own_basis(Zf, weights[f, rows])
        if basis is None:
            return None
        Zr, V, lam, note = basis
        if note and note not in out.notes:
            out.notes.append(note)
        nf, rf = Zr.shape
        out.Z[f, :nf, :rf], out.rows[f, :nf], out.valid[f, :nf] = Zr, rows, True
        out.V[f, :, :rf], out.lam_d[f, :rf] = V, lam
    return out


def _own_basis(Z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str | None] | None:
    """(Z V (n, r), V (d, r), Sigma's eigenvalues (r,), eigh's fallback note or None) for rows Z
    (n, d) of weights w (n,) > 0: V (orthonormal columns) spans Z's rows and diagonalises
    Sigma = Z^T diag(w / sum w) Z there, r = min(n, d); None if eigh fails.

    With fewer rows than columns the rows' span comes from a QR of Z^T (Z = R^T Q^T, Q (d, n)) and
    only the (n, n) Sigma of Q's coordinates, R diag(w) R^T, is decomposed: 151 ms against 241 ms
    for Sigma's (d, d) eigh at 862 x 1,280 on one core, and no direction is dropped (Sigma's
    smallest eigenvectors, which would span the null space, are float32 noise).
    """
    n, d = Z.shape
    wn = w / w.sum()
    if n >= d:
        eig = safe_eigh((Z * wn[:, None]).t() @ Z)  # (d, d)
        return None if eig is None else (Z @ eig[1], eig[1], eig[0], eig[2])
    Q, R = torch.linalg.qr(Z.t())  # (d, n), (n, n)
    eig = safe_eigh((R * wn[None, :]) @ R.t())  # Sigma in Q's coordinates, (n, n)
    if eig is None:
        return None
    lam, U, note = eig
    return R.t() @ U, Q @ U, lam, note


def fold_rotation_bytes(n: int, d: int, folds: int, itemsize: int = 4) -> int:
    """Upper bound of ``_rotate_folds``' tensors for the largest fold's n rows, d columns, F folds
    (kinds/linear.py budgets it): Z and V per fold, plus one fold's standardised rows, Sigma and
    eigenvectors while they are made. The solve reads them as views; only folds grouped apart by
    their classes (one lacks a class) take a copy of their group's share while it is solved."""
    r = min(n, d)
    return itemsize * (folds * (n * r + d * r) + n * d + 3 * d * d)


class _FoldLoss:
    """``_Loss`` for heads whose folds were rotated (``_FoldRotation``): head h of fold f = fold_of[h]
    sees only that fold's rows, rotated, Z_f (n, r). The folds' logits are one batched product
    (F, n, r) x (F, r, nb*K) over the block's heads (fold-major: head f * nb + i), and so is the
    gradient. Heads that have stopped are computed with zero weights, not left out: selecting
    them would need their count on the host (a sync), and these problems are small (FOLD_ROTATE_ROWS)."""

    def __init__(self, rot: _FoldRotation, fold_ids: list[int], y: torch.Tensor, w: torch.Tensor, n_free: int):
        """Args: rot: every fold's rotation; fold_ids: the folds of this stack (F'); y (N,) labels
        in [0, n_free or 2); w (N, F') their row weights, columns summing to 1."""
        self.Z, rows, valid = (_of_folds(t, fold_ids) for t in (rot.Z, rot.rows, rot.valid))  # (F', n, r), (F', n) x2
        self.y = y[rows]  # (F', n): padding rows read row 0, with weight 0
        self.w = torch.where(valid, w[rows, torch.arange(len(fold_ids), device=w.device)[:, None]], 0.0)
        self.n, self.d, self.k, self.binary = self.Z.shape[1], self.Z.shape[2], n_free, n_free == 1
        self.fold_of = torch.zeros(1, dtype=torch.long, device=w.device)  # (H,) set per block
        self._per_head: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _rows_per_head(self, nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels (n, H, 1) and weights (n, H) float32, float64 of each head's rows, for ``nb`` heads per fold."""
        if self._per_head is None or self._per_head[0] != nb:
            w = self.w.t().repeat_interleave(nb, 1)
            self._per_head = (nb, self.y.t().repeat_interleave(nb, 1)[:, :, None], w, w.double())
        return self._per_head[1:]

    def __call__(self, theta: torch.Tensor, lam: torch.Tensor, heads: torch.Tensor | None = None,
                 curvature: bool = False):
        """As ``_Loss.__call__``."""
        nf, h_all, k, d = self.Z.shape[0], len(self.fold_of), self.k, self.d
        nb = h_all // nf
        full = theta if heads is None else theta.new_zeros(h_all, theta.shape[1]).index_copy_(0, heads, theta)
        W, b = full[:, : k * d].reshape(nf, nb * k, d), full[:, k * d:].reshape(nf, nb * k, 1)
        progress.tick(unit="pass")  # one pass over every fold's rows for every head of the block
        # logits transposed, (F', nb*K, n): W Z^T reads Z faster than Z W^T (memory-bound: 2.6 vs 3.7 ms
        # for 5 folds of 862 x 862 on one core); then rows first for _ce_terms, (n, H, K), a small copy
        z = torch.baddbmm(b, W, self.Z.transpose(1, 2))
        z = z.view(nf, nb, k, self.n).permute(3, 0, 1, 2).reshape(self.n, h_all, k)
        idx, w, w64 = self._rows_per_head(nb)
        data, g, A = _ce_terms(z, idx, w, w64, self.binary, curvature)
        g = g.reshape(self.n, nf, nb * k).permute(1, 2, 0).contiguous()  # (F', nb*K, n)
        gW = torch.bmm(g, self.Z).view(h_all, k * d)  # (F', nb*K, r) as (H, K*r)
        grad = torch.cat([gW, g.sum(2).view(h_all, k)], 1)
        if heads is not None:
            data, grad, A = data[heads], grad[heads], None if A is None else A[heads]
        f, grad = _penalised(data, grad, theta, lam, k * d)
        return (f, grad, A) if curvature else (f, grad)


def _of_folds(t: torch.Tensor, fold_ids: list[int]) -> torch.Tensor:
    """The rows ``fold_ids`` of a per-fold tensor: a view when they are one ascending run (every
    fold, the usual case), a copy of those folds only otherwise (folds grouped by their classes)."""
    return t[head_span(torch.as_tensor(fold_ids))]


def _unrotate_folds(theta: torch.Tensor, V: torch.Tensor, k: int) -> torch.Tensor:
    """``_unrotate`` with a basis per fold: theta (H, K*(r+1)) of a block's heads, fold-major
    (F' folds x nb heads), V (F', d, r); returns (H, K*(d+1)). One batched product per fold,
    never a (H, d, r) copy of the bases."""
    h, (nf, d, r) = theta.shape[0], V.shape
    W = torch.bmm(theta[:, : k * r].reshape(nf, h // nf * k, r), V.transpose(1, 2))  # (F', nb*K, d)
    return torch.cat([W.reshape(h, k * d), theta[:, k * r:]], 1)


def _to_head(W: torch.Tensor, b: torch.Tensor, present: np.ndarray, n_classes: int) -> nn.Sequential:
    """One head's W (K, D) and b (K,) as Linear(D, n_classes); absent classes get zero weights and
    ABSENT_CLASS_BIAS (never predicted), as logreg.to_linear does."""
    if W.shape[0] == 1:
        W, b = torch.cat([torch.zeros_like(W), W]), torch.cat([torch.zeros_like(b), b])
    lin = nn.Linear(W.shape[1], n_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(ABSENT_CLASS_BIAS)
        idx = torch.as_tensor(present)
        lin.weight[idx] = W.detach().float().cpu()
        lin.bias[idx] = b.detach().float().cpu()
    return nn.Sequential(lin).eval()


def column_moments(src: RowSource, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted column statistics, one pass over the source, in float64.

    Args:
        src: (N, D) rows; weights: (N, G) one weighting of the rows per column.
    Returns:
        (total (G,), mean (G, D), variance (G, D)), float64; rows of weight 0 do not count (but a
        non-finite value anywhere makes its column's mean non-finite: the caller's check).
    """
    wd = weights.double()
    g, d = wd.shape[1], src.n_cols
    m1 = torch.zeros(g, d, dtype=torch.float64, device=src.device)
    m2 = torch.zeros_like(m1)
    for rows, Xc in src.chunks():
        for j in range(0, Xc.shape[0], STAT_ROWS):  # float64 copies of STAT_ROWS rows at a time
            Xd, wj = Xc[j: j + STAT_ROWS].double(), wd[rows][j: j + STAT_ROWS]
            m1.addmm_(wj.t(), Xd)
            m2.addmm_(wj.t(), Xd * Xd)  # not in place: for a float64 X, Xd is a view of it
    total = wd.sum(0)
    mean = m1 / total[:, None]
    return total, mean, (m2 / total[:, None] - mean ** 2).clamp_min(0)


def _constant(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Columns (bool, same shape) whose variation is rounding: std <= CONSTANT_STD * rms."""
    return var <= CONSTANT_STD ** 2 * (var + mean ** 2)


def sigma_of(src: RowSource, w: torch.Tensor, step: int) -> torch.Tensor:
    """Sigma (D, D), in src's dtype: the weighted second moment of every ``step``-th row (rows
    0, step, 2 step, ...), weights renormalised over those rows; chunks summed in float64."""
    acc = torch.zeros(src.n_cols, src.n_cols, dtype=torch.float64, device=src.device)
    total = torch.zeros((), dtype=torch.float64, device=src.device)
    for rows, Xc in src.chunks():
        off = (-rows.start) % step  # the chunk's first row whose global index is a multiple of step
        Xs, ws = Xc[off::step], w[rows][off::step]
        acc += ((Xs * ws[:, None]).t() @ Xs).double()
        total += ws.double().sum()
    return (acc / total).to(src.dtype)


@dataclass
class _Setup:
    """What every fold group's solve shares: the source it iterates (constant columns left out,
    rotated or not), which columns of X those are, the preconditioner, the folds' standardisation."""

    src: RowSource
    keep: torch.Tensor  # (d,) columns of X that are solved; the others get weight 0
    d_full: int
    precond: Preconditioner | None
    V: torch.Tensor | None  # (d, r) rotation into Sigma's eigenbasis, or None
    affine: tuple[torch.Tensor, torch.Tensor] | None  # (mu, inv_s), each (F, d), or None
    notes: list[str]  # for every result
    fold_notes: list[list[str]]  # per fold
    folds: _FoldRotation | None = None  # each fold's rows in its own basis (then src is not read)


def _fold_affine(mean: torch.Tensor, var: torch.Tensor, dtype: torch.dtype):
    """Each fold's own standardisation from its rows' statistics (F, d): (mu, inv_s) in ``dtype``,
    inv_s 0 on a column constant on the fold's rows (so its weight there stays 0), and per fold
    a note naming how many such columns it has."""
    const = _constant(mean, var)
    inv_s = torch.where(const, 0.0, 1.0 / var.sqrt().clamp_min(1e-300))
    notes = [[f"{c} columns constant on this fold's rows (weight 0)"] if c else [] for c in const.sum(1).tolist()]
    return (mean.to(dtype), inv_s.to(dtype)), notes


def _preconditioner(src: RowSource, union: torch.Tensor, notes: list[str],
                    standardise: tuple[torch.Tensor, torch.Tensor] | None = None) -> Preconditioner | None:
    """The Kronecker preconditioner from Sigma of the rows any fold trains on (union (N,) weights;
    one Sigma for all folds: it shapes the steps, never the optimum), or None (scalar H0) above
    MAX_PRECOND_DIM columns or when even eigh's fallbacks fail (noted). ``standardise`` = the
    union's (mean, var) (d,): Sigma becomes their correlation, the covariance in the coordinates
    each fold standardises its rows into (fold_stats), whatever X's own offsets and scales."""
    if not 0 < src.n_cols <= MAX_PRECOND_DIM:
        return None
    step = sigma_step(src.n_rows)
    sigma = sigma_of(src, union / union.sum(), step)
    if standardise is not None:
        mean, sd = standardise[0], standardise[1].sqrt()
        sigma = ((sigma.double() - mean[:, None] * mean) / (sd[:, None] * sd)).to(sigma.dtype)
    try:
        return Preconditioner(sigma, 1, int((union[::step] > 0).sum()), step)
    except torch.linalg.LinAlgError:  # slower with a scalar H0, same optimum
        notes.append("preconditioner off: eigh failed")
        return None


def _prepare(X: torch.Tensor | RowSource, weights: torch.Tensor, stat_weights: torch.Tensor | None) -> _Setup:
    """Column statistics, constant columns, Sigma and its eigh, and the rotation, once for all folds.

    Args: X (N, D) tensor or source; weights (F, N) each fold's row weights; stat_weights (F, N)
    the weights of each fold's own standardisation (fold_stats), or None."""
    mem = X if isinstance(X, torch.Tensor) else None
    src = TensorSource(X) if mem is not None else X
    union = weights.sum(0)  # (N,) rows that some fold trains on; Sigma and the constant test use it
    stat_w = union[:, None] if stat_weights is None else torch.cat([union[:, None], stat_weights.t()], 1)
    _, mean, var = column_moments(src, stat_w)
    if not bool(torch.isfinite(mean).all()):
        bad = torch.nonzero(~torch.isfinite(mean).all(0)).flatten()[:5].tolist()
        raise FeatcacheError(f"X has non-finite values (NaN or inf), in columns {bad} and maybe more")
    keep = torch.nonzero(~_constant(mean[0], var[0])).flatten()
    notes, d_full = [], src.n_cols
    if len(keep) < d_full:  # an in-memory X: a copy of the kept columns; a stream: selected per chunk
        notes.append(f"dropped {d_full - len(keep)} constant columns (weight 0)")
        mem = mem.index_select(1, keep) if mem is not None else None
        src = TensorSource(mem) if mem is not None else ColumnSubset(src, keep)
    affine, fold_notes = None, [[] for _ in range(len(weights))]
    if stat_weights is not None:
        affine, fold_notes = _fold_affine(mean[1:, keep], var[1:, keep], src.dtype)
    largest = int((weights > 0).sum(1).max())  # rows of the largest fold
    if (affine is not None and mem is not None
            and rotates_folds(largest, src.n_cols, len(weights), itemsize=mem.element_size())):
        folds = _rotate_folds(mem, weights, affine)
        if folds is not None:
            precond = Preconditioner.rotated(folds.lam_d, 1)
            precond.notes = [f"preconditioner: {n}" for n in folds.notes]
            return _Setup(src, keep, d_full, precond, None, affine, notes, fold_notes, folds)
    union_stats = None if affine is None else (mean[0, keep], var[0, keep])
    precond, V = _preconditioner(src, union, notes, union_stats), None
    if (precond is not None and mem is not None and affine is None and precond.step == 1
            and src.n_rows <= ROTATE_ROWS * src.n_cols):
        Xs, V = precond.rotate(mem)  # (N, r), (d, r): the solver's weights are W V, (K, r)
        src = TensorSource(Xs)
    return _Setup(src, keep, d_full, precond, V, affine, notes, fold_notes)


def rotates_folds(n: int, d: int, folds: int, *, itemsize: int = 4) -> bool:
    """Whether ``folds`` folds standardised with their own statistics, the largest of ``n`` rows,
    are solved on their own rotated rows (``_rotate_folds``): n <= FOLD_ROTATE_ROWS * d, a
    preconditioner at all, and the copies within FOLD_ROTATE_BYTES."""
    return (0 < d <= MAX_PRECOND_DIM and n <= FOLD_ROTATE_ROWS * d
            and fold_rotation_bytes(n, d, folds, itemsize) <= FOLD_ROTATE_BYTES)


def _weights_in_x(setup: _Setup, theta: torch.Tensor, k: int, folds: torch.Tensor,
                  fold_V: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads' theta (H, P) as W (H, K, D) over all of X's columns and b (H, K): unrotated, out of
    their fold's standardisation (W * inv_s, b - W . mu), zero on the columns left out.
    ``fold_V`` (F', d, r): the block's folds' own bases (``_rotate_folds``; heads fold-major)."""
    if setup.folds is not None:
        heads = _unrotate_folds(theta, fold_V, k)
    else:
        heads = theta if setup.V is None else _unrotate(theta, setup.V, k)
    h, d = heads.shape[0], len(setup.keep)
    W, b = heads[:, : k * d].reshape(h, k, d), heads[:, k * d:]
    if setup.affine is not None:
        mu, inv_s = setup.affine[0][folds], setup.affine[1][folds]  # (H, d)
        W = W * inv_s[:, None]
        b = b - (W.double() * mu[:, None].double()).sum(2).to(b.dtype)
    full = W.new_zeros(h, k, setup.d_full)
    full[:, :, setup.keep] = W
    return full, b


def _path(setup: _Setup, cs: list[float], y: torch.Tensor, w: torch.Tensor, present: np.ndarray, n_classes: int,
          fold_ids: list[int], *, tol: float, max_iter: int, block: int) -> dict[tuple[int, int], ExactResult]:
    """The C path of the folds ``fold_ids`` (all with the classes ``present``) as one stack: C values
    ascending, ``block`` of them per pass, every fold x C of a block a head; each fold warm starts
    from its own largest C of the previous block, with that head's curvature pairs.

    Args: y (N,) labels remapped to [0, len(present)); w (N, F') the folds' row weights.
    Returns: {(position in fold_ids, position in cs): result}.
    """
    k = len(present) if len(present) > 2 else 1
    sums = w.double().sum(0).tolist()  # (F',) sklearn's sum(w) per fold
    affine = None if setup.affine is None else (setup.affine[0][fold_ids], setup.affine[1][fold_ids])
    ids, fold_V = torch.as_tensor(fold_ids, device=w.device), None
    if setup.folds is not None:
        loss = _FoldLoss(setup.folds, fold_ids, y, w / w.sum(0), k)
        fold_V = _of_folds(setup.folds.V, fold_ids)  # (F', d, r)

        def grad_max(g: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            """(H',) max |grad| of ``heads`` in their folds' coordinates: the block's gradients
            (zero for the heads not asked) unrotated fold by fold, then those rows."""
            full = g.new_zeros(len(loss.fold_of), g.shape[1]).index_copy_(0, heads, g)
            return _unrotate_folds(full, fold_V, k)[heads].abs().amax(1)
    else:
        loss = _Loss(setup.src, y, w / w.sum(0), k, affine)
        V = setup.V
        grad_max = None if V is None else (lambda g, heads: _unrotate(g, V, k).abs().amax(1))  # (H,) in X's features
    if setup.precond is not None:
        setup.precond.k = k
    nf, p, dev = len(fold_ids), k * (loss.d + 1), w.device
    like = torch.empty(0, dtype=setup.src.dtype, device=dev)
    start, hist, prev, out = like.new_zeros(nf, p), None, 0, {}
    order = np.argsort(cs, kind="stable")
    for j in range(0, len(order), max(1, block)):
        idx = order[j: j + max(1, block)]
        nb = len(idx)
        t0 = time.perf_counter()
        loss.fold_of = torch.arange(nf, device=dev).repeat_interleave(nb)  # head f * nb + i: fold f, C cs[idx[i]]
        if setup.folds is not None:
            setup.precond.head_basis = ids[loss.fold_of]  # each head's own fold's eigenvalues
        lam = torch.tensor([1.0 / (cs[i] * sums[f]) for f in range(nf) for i in idx], dtype=torch.float64, device=dev)
        hist = History.empty(nf * nb, p, like) if hist is None else \
            hist.carried(loss.fold_of * prev + prev - 1, lam, k * loss.d)
        theta, f, n_iter, conv, hist = lbfgs(loss, start[loss.fold_of], lam, hist, setup.precond, tol=tol,
                                             max_iter=max_iter, grad_max=grad_max)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / (nf * nb)
        W, b = _weights_in_x(setup, theta, k, ids[loss.fold_of], fold_V)
        for hd in range(nf * nb):
            fi, ci = divmod(hd, nb)
            out[fi, int(idx[ci])] = ExactResult(cs[idx[ci]], _to_head(W[hd], b[hd], present, n_classes),
                                                int(n_iter[hd]), bool(conv[hd]), share, float(f[hd]))
        start = theta.view(nf, nb, p)[:, -1].clone()  # each fold's warm start of its next, larger C values
        prev = nb
    return out


def _as_weights(value, n: int, like: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """``value`` as finite non-negative weights in X's dtype, (n,) or (F, n), each row with a positive sum."""
    try:
        t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise FeatcacheError(f"{name} must be numbers, one per row of X: {err}") from None
    shape_ok = t.dim() == ndim and t.shape[-1] == n and (ndim == 1 or t.shape[0] >= 1)
    if not shape_ok or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        want = f"({n},)" if ndim == 1 else f"(folds, {n})"
        raise FeatcacheError(f"{name} must be finite non-negative weights of shape {want}, got shape {tuple(t.shape)}")
    empty = torch.nonzero(t.reshape(-1, n).sum(1) <= 0).flatten().tolist()
    if empty:
        where = "" if ndim == 1 else f" (folds {empty[:5]})"
        raise FeatcacheError(f"{name} must not be all zero{where}")
    return t


def _fit(cs, X: torch.Tensor | RowSource, y: torch.Tensor, n_classes: int, weights: torch.Tensor,
         stat_weights: torch.Tensor | None, *, tol: float, max_iter: int, block: int) -> list[list[ExactResult]]:
    """Every fold (rows of weights (F, N)) x C; results[f][c] in input order."""
    cs = [float(c) for c in cs]
    if not cs or min(cs) <= 0:
        raise FeatcacheError(f"--C values must be positive, got {cs}")
    dev = weights.device
    yc = y.to(dev).long()
    if yc.shape != weights.shape[1:] or bool(((yc < 0) | (yc >= n_classes)).any()):
        raise FeatcacheError(f"y must be one label in [0, {n_classes}) per row of X ({weights.shape[1]} rows)")
    presents = [torch.unique(yc[wf > 0]).cpu().numpy() for wf in weights]  # classes a fold trains on
    for f, pr in enumerate(presents):
        if len(pr) < 2:
            fold = "" if len(presents) == 1 else f"fold {f}: "
            raise FeatcacheError(f"{fold}a linear probe needs training rows of at least two classes, got {len(pr)}")
    setup = _prepare(X, weights, stat_weights)
    groups: dict[tuple, list[int]] = {}  # folds with the same classes share a stack (one K)
    for f, pr in enumerate(presents):
        groups.setdefault(tuple(pr.tolist()), []).append(f)
    results = [[None] * len(cs) for _ in presents]
    for pr, fold_ids in groups.items():
        present = np.asarray(pr)
        remap = torch.zeros(n_classes, dtype=torch.long, device=dev)  # rows of other classes: weight 0 here
        remap[torch.as_tensor(present, device=dev)] = torch.arange(len(present), device=dev)
        out = _path(setup, cs, remap[yc], weights[fold_ids].t(), present, n_classes, fold_ids,
                    tol=tol, max_iter=max_iter, block=block)
        for (fi, ci), res in out.items():
            results[fold_ids[fi]][ci] = res
    shared = setup.notes + ([] if setup.precond is None else setup.precond.notes)
    for f, row in enumerate(results):
        note = "; ".join(shared + setup.fold_notes[f]) or None
        for res in row:
            res.note = note
    return results


def _rows_of(X: torch.Tensor | RowSource) -> tuple[int, torch.Tensor]:
    """N and an empty tensor of X's dtype and device."""
    if isinstance(X, torch.Tensor):
        if X.dim() != 2:
            raise FeatcacheError(f"X must be (rows, features), got shape {tuple(X.shape)}")
        return X.shape[0], X.new_empty(0)
    if not isinstance(X, RowSource):
        raise FeatcacheError(f"X must be a torch.Tensor or a heads.source.RowSource, got {type(X).__name__}")
    return X.n_rows, torch.empty(0, dtype=X.dtype, device=X.device)


def fit_exact(c_values: list[float] | tuple[float, ...], X: torch.Tensor | RowSource, y: torch.Tensor,
              n_classes: int, *, sample_weight: np.ndarray | torch.Tensor | None = None, tol: float = TOL,
              max_iter: int = MAX_ITER, block: int = BLOCK) -> list[ExactResult]:
    """Exact ``LogisticRegression(C=c)`` for every c, on X's device and dtype; results in input order.

    Args:
        c_values: inverse L2 strengths (sklearn's C), each > 0.
        X: (N, D) standardised training rows: a tensor, or a heads.source.RowSource of row chunks
            (never rotated, see ROTATE_ROWS); y: (N,) labels in [0, n_classes).
        sample_weight: (N,) non-negative row weights (sklearn's ``sample_weight``), None = all 1;
            classes whose rows all have weight 0 are absent (never predicted).
        tol: max |gradient of f| at which a C stops (converged=True); max_iter: iteration cap.
        block: how many consecutive C values share each pass over X.
    Returns:
        One ExactResult per C: its head over all n_classes (CPU), iterations, converged, seconds
        (its block's wall time shared equally among the block's C values), objective f and note
        (constant columns dropped, eigh fallbacks; None when there was nothing to say).
    """
    n, like = _rows_of(X)
    sw = torch.ones(n, dtype=like.dtype, device=like.device) if sample_weight is None else \
        _as_weights(sample_weight, n, like, "sample_weight", 1)
    with full_fp32():
        return _fit(c_values, X, y, n_classes, sw[None], None, tol=tol, max_iter=max_iter, block=block)[0]


def fit_exact_folds(c_values: list[float] | tuple[float, ...], X: torch.Tensor | RowSource, y: torch.Tensor,
                    n_classes: int, fold_weights: np.ndarray | torch.Tensor, *,
                    sample_weight: np.ndarray | torch.Tensor | None = None, fold_stats: bool = False,
                    tol: float = TOL, max_iter: int = MAX_ITER, block: int = BLOCK) -> list[list[ExactResult]]:
    """``fit_exact`` for every fold at once: a fold is a row weight, every fold x C one head of one
    L-BFGS stack (one pass over X per iteration for all), warm started along the C path per fold.

    Args:
        c_values, X, y, n_classes, sample_weight, tol, max_iter, block: as fit_exact (block = C
            values per pass; each pass then solves folds x block heads).
        fold_weights: (F, N) non-negative row weights per fold, 1 on its training rows and 0 on
            its held-out rows for K-fold CV; rows of weight 0 do not influence the fold's heads.
            Fold f's rows weigh fold_weights[f] * sample_weight.
        fold_stats: standardise each fold with its own training rows' weighted mean and std
            (weights fold_weights[f], population std; std <= CONSTANT_STD * rms: weight 0), as
            sklearn's make_pipeline(StandardScaler(), LogisticRegression(C)) fitted on those rows
            does, inside the loss (or on each fold's rotated copy, below). The heads returned
            take X as given (pass it standardised with whole-train statistics: the fold's shift
            is then small, which keeps float32 logits exact); objective and tol are those of the
            fold's standardised problem, as the pipeline's LogisticRegression sees it. Without
            it, X as given is the fold's X. Sigma (the preconditioner) comes from all rows of any
            fold, shared: it only shapes the steps, never the optimum. With fold_stats X itself
            is never rotated; with few rows for its columns (FOLD_ROTATE_ROWS) each fold's
            standardised rows are copied once, rotated into the eigenbasis of their own Sigma
            (``_rotate_folds``, which then is each fold's H0; fold_rotation_bytes says how much
            that takes).
    Returns:
        results[f][c]: an ExactResult per fold and C (input order); seconds = its block's wall time
        shared equally among the block's heads.
    """
    n, like = _rows_of(X)
    fw = _as_weights(fold_weights, n, like, "fold_weights", 2)
    sw = None if sample_weight is None else _as_weights(sample_weight, n, like, "sample_weight", 1)
    weights = fw if sw is None else fw * sw
    if bool((weights.sum(1) <= 0).any()):
        raise FeatcacheError("fold_weights * sample_weight must not be all zero in any fold")
    with full_fp32():
        return _fit(c_values, X, y, n_classes, weights, fw if fold_stats else None,
                    tol=tol, max_iter=max_iter, block=block)


def objective(head: nn.Sequential, X: torch.Tensor, y: torch.Tensor, C: float,
              sample_weight: np.ndarray | None = None) -> float:
    """f above for a Linear head over the classes present in y (tests and bench use it to score
    sklearn's and this module's solutions with one formula). A binary head's penalty is that of
    its one logit row, the difference of the two rows, as in sklearn."""
    lin = head[0]
    present = torch.unique(y).cpu()
    W, b = lin.weight.detach().double()[present], lin.bias.detach().double()[present]
    Xd = X.detach().double().cpu()
    z = Xd @ W.t() + b
    pos = torch.searchsorted(present, y.cpu())
    ce = torch.logsumexp(z, 1) - z.gather(1, pos[:, None]).squeeze(1)
    w = torch.ones(len(y), dtype=torch.float64) if sample_weight is None else torch.as_tensor(sample_weight).double()
    coef = W[1:] - W[:1] if len(present) == 2 else W
    return float((w * ce).sum() / w.sum() + 0.5 * (coef ** 2).sum() / (C * w.sum()))
