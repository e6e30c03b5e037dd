"""Batched, preconditioned L-BFGS for the exact linear probe (heads/exact.py).

Every head (one C) is its own problem with its own curvature pairs, step and stopping test; the
heads of a block share each pass over X. Two things make it converge in tens of passes where
plain L-BFGS took 50-100 per C on 40,000 x 2,048 standardised features (bench/linear_probe.py):

* **Preconditioner.** The initial inverse Hessian of the two-loop recursion is not a scalar but the
  inverse of the Kronecker approximation ``A (x) Sigma + lam I`` of the Hessian of the weights, with
  ``Sigma`` the weighted covariance of the rows (X is standardised, so centred) and ``A`` the
  (K, K) weighted mean of ``diag(p_i) - p_i p_i^T`` at the head's start. One ``eigh`` of ``Sigma``
  (D, D) and one of each ``A`` (K, K) make it diagonal: applying it costs two (H*K, D) x (D, D)
  products, noise next to a pass over X of many rows; with few rows (exact.ROTATE_ROWS) X is
  rotated into Sigma's eigenbasis once instead (``rotate``) and H0 is elementwise. Correlated
  features (CNN activations are) are what makes the unpreconditioned problem ill-conditioned.
  The intercept block is ``A`` alone (pseudo-inverse: the multinomial logits are invariant to a
  common shift, which no gradient ever has). ``safe_eigh`` retries a failed eigh in float64 and
  with jitter (exact.py then turns the preconditioner off): it only ever changes the steps. With
  folds (exact.fit_exact_folds) one Sigma, of every fold's rows, serves all heads, or, where each
  fold was rotated into its own Sigma's eigenbasis, each head its fold's (``rotated``); ``A`` is per head.
* **Curvature carried along the path.** Moving from C to a larger C changes the Hessian by exactly
  ``(lam_new - lam_old) I`` on the weights, so a solved head's pairs ``(s, y)`` stay valid for the
  next C after ``y += (lam_new - lam_old) s_W``; a pair that loses ``s.y > 0`` is dropped.

Why hand-written: torch.optim.LBFGS optimises one problem with a scalar initial Hessian and no
per-problem stopping; scipy's (what sklearn calls) runs on numpy in float64, one C at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

HISTORY = 10  # curvature pairs kept per head (scipy keeps 10 for sklearn)
MAX_LS = 25  # line-search trials (t = 1, then backtracking) before a head counts as stalled
GAP = 1e-6  # estimated f - min f, relative, below which a head may stop (the target is 1e-4)
APPROX_WOLFE = 1e-6  # relative f noise allowed by the approximate Wolfe test (Hager & Zhang's epsilon)
SIGMA_ROWS = 8192  # rows (evenly strided) that estimate Sigma: it only shapes the steps, not the optimum
MAX_PRECOND_DIM = 4096  # above this many features eigh(Sigma) costs more than it saves: scalar H0


def sigma_step(n_rows: int) -> int:
    """Every how many rows Sigma is estimated from (all rows up to 2 * SIGMA_ROWS - 1)."""
    return max(1, n_rows // SIGMA_ROWS)


def safe_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str | None] | None:
    """eigh of symmetric positive semi-definite M (D, D), or a batch (..., D, D), that does not give
    up at the first failure.

    LAPACK's divide and conquer (syevd) fails to converge on some float32 covariances of few rows
    and many dead (all-zero) features (issue 24). Tries M as given, then in float64, then in
    float64 plus a jitter of 1e-10 and 1e-6 of each matrix's mean |diagonal| (eigenvectors
    unchanged; the jitter is taken back off the values).

    Returns:
        (values ascending (..., D), vectors (..., D, D), both in M's dtype; a note saying which
        fallback was needed, or None), or None when every try failed or gave non-finite values.
    """
    M64 = M.double()
    scale = M64.diagonal(dim1=-2, dim2=-1).abs().mean(-1)  # (...,)
    eye = torch.eye(M.shape[-1], dtype=torch.float64, device=M.device)
    tries = [(M, None, 0.0)] if M.dtype == torch.float64 else [(M, None, 0.0), (M64, "eigh in float64", 0.0)]
    tries += [(M64 + (eps * scale)[..., None, None] * eye, f"eigh in float64 with a {eps:g} jitter", eps)
              for eps in (1e-10, 1e-6)]
    for mat, note, eps in tries:
        try:
            vals, vecs = torch.linalg.eigh(mat)
        except torch.OutOfMemoryError:  # not a numerical failure: the caller must hear of it
            raise
        except (torch.linalg.LinAlgError, RuntimeError):  # some cusolver failures are RuntimeErrors
            continue
        if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
            return (vals.double() - (eps * scale)[..., None]).to(M.dtype), vecs.to(M.dtype), note
    return None


class Preconditioner:
    """``(A (x) Sigma + lam I)^-1`` for the weights and ``A^+`` for the intercepts, per head."""

    def __init__(self, sigma: torch.Tensor, k: int, rank: int, step: int = 1):
        """Args:
            sigma: (D, D) weighted covariance of the rows (exact.sigma_of: weights summing to 1).
            k: free logits per head.
            rank: rows of non-zero weight that sigma saw (they bound its rank; see ``rotate``).
            step: sigma came from every ``step``-th row (1 = every row, which ``rotate`` needs).
        Raises:
            torch.linalg.LinAlgError: no eigendecomposition of sigma, even in float64 with jitter
            (the caller then solves with a scalar H0: slower, same optimum).
        """
        eig = safe_eigh(sigma)
        if eig is None:
            raise torch.linalg.LinAlgError("eigh of Sigma failed, in float64 and with jitter too")
        lam_d, V, note = eig  # ascending
        self.notes = [f"preconditioner: {note}"] if note else []  # fallbacks used, for ExactResult.note
        self.lam_d, self.V = lam_d.clamp_min(0), V  # V None once X is rotated: H0 is then elementwise
        self.k, self.d, self.rank, self.step = k, sigma.shape[0], rank, step

    def rotate(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X (N, D) in Sigma's eigenbasis, without its null space: returns (X V, V) with V (D, r),
        r = min(D, rows of non-zero weight), and from then on works on the rotated weights.

        Only when Sigma came from every row (``step == 1``, N < 2 * SIGMA_ROWS), which makes it
        exact: the dropped directions are orthogonal to every row of non-zero weight, so the
        optimum has no weight along them (their gradient is exactly 0) and W = W_r V^T is the
        solution of the original problem with the same objective (V is orthonormal). What it
        saves: the two (H*K, D) x (D, D) products of every H0 application, which on 1,078 x 1,280
        rows cost more than the pass over X.
        """
        if self.step != 1 or self.V is None:
            raise ValueError("Preconditioner.rotate needs Sigma from every row, once")
        r = min(self.d, self.rank)
        V = self.V[:, self.d - r:]
        self.V, self.lam_d, self.d = None, self.lam_d[self.d - r:], r
        return X @ V, V

    @classmethod
    def rotated(cls, lam_d: torch.Tensor, k: int) -> "Preconditioner":
        """H0 for heads whose weights already live in their own rows' eigenbasis (exact.py's
        per-fold rotation): ``lam_d`` (F, r) each basis's eigenvalues of Sigma; ``head_basis``
        (set per block) says which row of it each head uses."""
        pre = cls.__new__(cls)
        pre.notes, pre.V, pre.lam_d, pre.k, pre.d = [], None, lam_d.clamp_min(0), k, lam_d.shape[1]
        pre.rank, pre.step = lam_d.shape[1], 1
        pre.head_basis = torch.zeros(1, dtype=torch.long, device=lam_d.device)
        return pre

    def _lam_d(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Sigma's eigenvalues as they broadcast against (H', K, d): shared (d,) or per head (H', 1, d)."""
        return self.lam_d if self.lam_d.dim() == 1 else self.lam_d[self.head_basis[rows]][:, None, :]

    def set_heads(self, A: torch.Tensor, lam: torch.Tensor) -> None:
        """A (H, K, K) class curvature and lam (H,) penalty of the heads about to be solved."""
        eig = safe_eigh(A.double())
        if eig is None:  # A's diagonal alone: still a positive H0, only a slower one
            eye = torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
            eig = A.double().diagonal(dim1=1, dim2=2), eye.expand_as(A).clone(), "diagonal class curvature: eigh failed"
        if eig[2] and f"preconditioner: {eig[2]}" not in self.notes:
            self.notes.append(f"preconditioner: {eig[2]}")
        a, self.E = eig[0].clamp_min(0), eig[1]
        dtype = self.lam_d.dtype
        self.a, self.E, self.lam = a.to(dtype), self.E.to(dtype), lam.to(dtype)
        # 1e-10 of the largest: the shift direction of the multinomial logits, 0 up to float64 rounding
        self.a_inv = torch.where(a > 1e-10 * a.amax(1, keepdim=True), 1.0 / a.clamp_min(1e-30), 0.0).to(dtype)

    def __call__(self, q: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """q (H', P) for the heads ``rows`` of set_heads; returns H0 q, same shape."""
        h, k, d = q.shape[0], self.k, self.d
        E, a, lam = self.E[rows], self.a[rows], self.lam[rows]
        qW = q[:, : k * d].reshape(h * k, d)
        qW = (qW if self.V is None else qW @ self.V).view(h, k, d)  # into Sigma's eigenbasis
        qW = E.transpose(1, 2) @ qW / (a[:, :, None] * self._lam_d(rows) + lam[:, None, None])
        rW = (E @ qW).view(h * k, d)
        rW = (rW if self.V is None else rW @ self.V.t()).view(h, k * d)
        rb = (E @ ((E.transpose(1, 2) @ q[:, k * d:, None]).squeeze(2) * self.a_inv[rows])[:, :, None]).squeeze(2)
        return torch.cat([rW, rb], 1)


def _curvature_ok(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairs worth keeping: s.y clearly positive. A tiny step's y is mostly float32 noise, and its
    1 / s.y would blow the next direction up."""
    return (s * y).sum(-1) > 1e-8 * s.norm(dim=-1) * y.norm(dim=-1)


@dataclass
class History:
    """Curvature pairs of H heads in a ring buffer: S, Y (M, H, P), slot ``ptr`` is the next one
    written (all heads of a block step together); rho (M, H) is 0 for an empty or dropped pair,
    which then has no effect. ``lam`` (H,) is the penalty the pairs were measured at."""

    S: torch.Tensor
    Y: torch.Tensor
    rho: torch.Tensor
    lam: torch.Tensor
    ptr: int = 0
    filled: int = 0  # slots written since empty(); the others hold zeros and are skipped

    @classmethod
    def empty(cls, h: int, p: int, like: torch.Tensor) -> "History":
        return cls(like.new_zeros(HISTORY, h, p), like.new_zeros(HISTORY, h, p), like.new_zeros(HISTORY, h),
                   torch.zeros(h, dtype=torch.float64, device=like.device))

    def carried(self, source: int | torch.Tensor, lam: torch.Tensor, n_weights: int) -> "History":
        """The pairs of head ``source`` (one index for all, or (H,) indices, one per new head: its
        own fold's head, exact.fit_exact_folds) for len(lam) heads at penalties lam: y gains
        (lam - lam_old) s on the weights, the exact change of the Hessian."""
        h = len(lam)
        src = torch.as_tensor(source, device=self.S.device).long().expand(h) % self.S.shape[1]  # (H,)
        S, Y = self.S[:, src], self.Y[:, src]  # (M, H, P) copies
        shift = (lam - self.lam[src]).to(S.dtype)  # (H,)
        Y[:, :, :n_weights] += shift[None, :, None] * S[:, :, :n_weights]
        live = (self.rho[:, src] != 0) & _curvature_ok(S, Y)
        rho = torch.where(live, 1.0 / (S * Y).sum(2).clamp_min(1e-30), 0.0)
        return History(S, Y, rho, lam.clone(), self.ptr, self.filled)

    def order(self) -> list[int]:
        """Filled slots, newest first."""
        return [(self.ptr - 1 - i) % HISTORY for i in range(self.filled)]

    def push(self, rows: torch.Tensor | slice, s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> None:
        self.S[self.ptr, rows], self.Y[self.ptr, rows] = s, y
        self.rho[self.ptr, rows] = torch.where(valid, 1.0 / (s * y).sum(1).clamp_min(1e-30), 0.0)
        self.ptr = (self.ptr + 1) % HISTORY
        self.filled = min(self.filled + 1, HISTORY)


def _direction(g: torch.Tensor, hist: History, rows: torch.Tensor | slice, h0: Callable) -> torch.Tensor:
    """L-BFGS two-loop recursion for the heads ``rows``; h0(q, rows) is the initial inverse Hessian.
    In-place updates, and only filled slots: on small problems the recursion's ~40 memory-bound
    ops per iteration cost as much as the pass over X. Slots are indexed one at a time (views when
    ``rows`` is a slice), so a subset of heads never copies the whole (M, H', P) history at once."""
    q, alpha, order = g.clone(), [], hist.order()
    if isinstance(rows, slice):  # every head: slot i of the history itself, (H, P)
        S, Y = hist.S.__getitem__, hist.Y.__getitem__
    else:  # some heads: an (H', P) copy of each filled slot, made once for both loops
        Ss, Ys = {i: hist.S[i, rows] for i in order}, {i: hist.Y[i, rows] for i in order}
        S, Y = Ss.__getitem__, Ys.__getitem__
    rho = hist.rho[:, rows]  # (M, H')
    for i in order:
        a = rho[i] * torch.linalg.vecdot(S(i), q)
        q.addcmul_(Y(i), a[:, None], value=-1)
        alpha.append(a)
    r = h0(q, rows)
    for i, a in zip(reversed(order), reversed(alpha)):
        r.addcmul_(S(i), (a - rho[i] * torch.linalg.vecdot(Y(i), r))[:, None])
    return r.neg_()


def _indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of ``mask`` (1-d bool), ascending, given their ``count``, which
    the host has already read. Unlike ``nonzero`` or mask indexing, whose output size the device
    must report first (a host sync each), a stable sort of ~mask brings them to the front."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


class _Flags:
    """Per-head boolean flags (H',) computed on the device and read by the host in one transfer:
    ``host.name`` (numpy) to branch on, ``dev.name`` to select rows on the device with
    ``_indices`` (no transfer back). None values are left out (the test was not taken)."""

    def __init__(self, **flags: torch.Tensor | None):
        self.dev = SimpleNamespace(**{k: v for k, v in flags.items() if v is not None})
        names = list(vars(self.dev))
        # the one device-to-host transfer of this decision point
        read = torch.stack([getattr(self.dev, k) for k in names]).cpu().numpy()
        self.host = SimpleNamespace(**dict(zip(names, read)))


class _TolTest:
    """sklearn's test, max |grad| <= tol, per head. In theta's own coordinates it is one pass over
    grad, so it is taken for every head (``eager``) and rides along with the other flags of a
    transfer; with ``grad_max`` (theta rotated: an unrotation per head) only for the heads whose
    other test passed (``where``), at the cost of one more transfer when any did."""

    def __init__(self, tol: float, grad_max: Callable | None):
        self.tol, self.grad_max = tol, grad_max

    def eager(self, gr: torch.Tensor) -> torch.Tensor | None:
        return gr.abs().amax(1) <= self.tol if self.grad_max is None else None

    def where(self, gr: torch.Tensor, heads: torch.Tensor, ask_dev: torch.Tensor, ask: np.ndarray,
              fl: _Flags) -> tuple[torch.Tensor, np.ndarray]:
        """The test (device, host) for the rows ``ask`` of gr, False elsewhere; ``fl.small`` holds
        it for every row when it was taken eagerly. ``heads`` (H',): the block's index of each row
        of gr (``grad_max`` unrotates each head in its own basis)."""
        if self.grad_max is None:
            return fl.dev.small & ask_dev, fl.host.small & ask
        out = torch.zeros_like(ask_dev)
        if not ask.any():
            return out, np.zeros_like(ask)
        idx = _indices(ask_dev, int(ask.sum()))
        out[idx] = self.grad_max(gr[idx], heads[idx]) <= self.tol
        return out, out.cpu().numpy()  # the extra transfer, only on iterations where a head asks


def _accepted(ft, gt, d, t, slope, f0) -> torch.Tensor:
    """Armijo, or Hager & Zhang's approximate Wolfe test where f is within float32 noise of its
    start: near the optimum f's differences drown in the rounding of the logits, while the slope
    along d, grad . d, stays exact enough to show the step went downhill."""
    armijo = ft <= f0 + 1e-4 * (t * slope).double()
    return armijo | ((ft <= f0 + APPROX_WOLFE * f0.abs()) & (torch.linalg.vecdot(gt, d) <= -(1 - 2e-4) * slope))


def _backtrack(loss: Callable, lam: torch.Tensor, th: torch.Tensor, f0: torch.Tensor, g0: torch.Tensor,
               d: torch.Tensor, slope: torch.Tensor, heads: torch.Tensor, first: tuple, ok: _Flags):
    """The rest of the line search, after a first trial at t = 1 (``first`` = its theta, f, grad;
    ``ok.dev.ok``/``ok.host.ok`` which heads accepted it) that some head rejected: backtracking
    (Armijo) with a safeguarded quadratic step, per head, on the heads still pending only;
    ``heads`` (H',) are their indices among the block's heads (the loss's per-head row weights).

    Returns (theta, f, grad, pending on the device, pending on the host): the accepted point of
    each head, or its start where no step in MAX_LS was accepted (pending True). One host transfer
    per trial: whether another is needed, and for how many heads.
    """
    n = len(th)
    new_th, new_f, new_g = th.clone(), f0.clone(), g0.clone()
    pending, pending_host = torch.ones(n, dtype=torch.bool, device=th.device), np.ones(n, bool)
    t = torch.ones(n, dtype=th.dtype, device=th.device)
    pi, pi_host = torch.arange(n, device=th.device), np.arange(n)  # positions of the trial's heads
    (trial, ft, gt), ok_dev, ok_host = first, ok.dev.ok, ok.host.ok
    for step in range(MAX_LS):  # MAX_LS trials in all, each tested
        acc, rej = _indices(ok_dev, int(ok_host.sum())), _indices(~ok_dev, int((~ok_host).sum()))
        new_th[pi[acc]], new_f[pi[acc]], new_g[pi[acc]] = trial[acc], ft[acc], gt[acc]
        pending[pi[acc]] = False
        pending_host[pi_host[ok_host]] = False
        if step == MAX_LS - 1 or not pending_host.any():
            break
        pr = pi[rej]  # the heads still pending, ascending
        tr, dfr = t[pr], (ft[rej] - f0[pr]).to(th.dtype)
        quad = -slope[pr] * tr ** 2 / (2 * (dfr - slope[pr] * tr))
        quad = torch.where(torch.isfinite(quad), quad, 0.1 * tr)  # f inf or NaN at the trial: a big step back
        t[pr] = torch.minimum(torch.maximum(quad, 0.1 * tr), 0.5 * tr)
        pi, pi_host = pr, pi_host[~ok_host]
        trial = th[pi] + t[pi, None] * d[pi]
        ft, gt = loss(trial, lam[pi], heads[pi])
        ok_dev = _accepted(ft, gt, d[pi], t[pi], slope[pi], f0[pi])
        ok_host = ok_dev.cpu().numpy()  # this trial's transfer
    return new_th, new_f, new_g, pending, pending_host


@dataclass
class _Active:
    """The heads still being solved: their indices on the host (bookkeeping) and on the device
    (row selection), kept in step without a transfer either way."""

    host: np.ndarray
    dev: torch.Tensor

    def keep(self, mask: np.ndarray, mask_dev: torch.Tensor) -> "_Active":
        """The heads where mask (host) / mask_dev (device, the same flags) is True."""
        return _Active(self.host[mask], self.dev[_indices(mask_dev, int(mask.sum()))])


def lbfgs(loss: Callable, theta: torch.Tensor, lam: torch.Tensor, hist: History, precond: Preconditioner | None, *,
          tol: float, max_iter: int, grad_max: Callable | None = None):
    """Minimise every head (rows of theta, penalties lam) until max |grad| <= tol (sklearn's test)
    and the L-BFGS estimate of the remaining decrease, -g.d / 2, is <= GAP * |f|. The second test
    is what a small gradient alone misses: after a warm start from a smaller C, or on nearly
    separable rows at large C, |grad| is under tol while f is still well above its minimum
    (sklearn stopped 0.5-16 % above it on the demo cache). With d from the preconditioned
    two-loop it costs nothing: d is the next step anyway. ``grad_max(g, heads)`` gives max |grad|
    (H',) of the heads ``heads`` (block indices) in the caller's coordinates when theta's are
    rotated (exact.py); it is asked only of heads that pass the other test, so its cost does not
    recur every iteration.

    ``loss(theta, lam, heads=None, curvature=False)`` returns f (H',) float64 and grad (H', P) of
    the heads ``heads`` (indices into theta's rows; None = all), and with ``curvature`` also the
    class curvature A (H', K, K) that ``precond.set_heads`` takes.

    Host syncs (each stalls a GPU's queue): an iteration reads per-head flags twice, each time all
    of them in one transfer, because two decisions need the host: which heads stop before the
    step (it sets the heads of the loss call), and whether every head took t = 1 (else another
    loss call) together with which heads are then done. Rows are selected on the device
    (``_indices``): no host-to-device index copies, no data-dependent shapes. A transfer more
    per backtracking trial, for a steepest-descent fallback, or where ``grad_max`` is asked.

    Returns (theta, f float64 (H,), n_iter (H,), converged (H,) bool, hist), numpy for the middle three.
    """
    h, p = theta.shape
    tol_test = _TolTest(tol, grad_max)
    f, g, A = loss(theta, lam, curvature=True)
    if precond is not None:
        precond.set_heads(A, lam)
        h0 = precond
    else:  # scalar H0: gamma = s.y / y.y of the newest pair, or unit length along -g at first
        gamma = 1.0 / g.norm(dim=1).clamp_min(1e-30)
        h0 = lambda q, rows: q * gamma[rows, None]  # noqa: E731
    converged, n_iter = np.zeros(h, bool), np.zeros(h, np.int64)
    act = _Active(np.arange(h), torch.arange(h, device=theta.device))
    for it in range(max_iter + 1):
        if not len(act.host):
            break
        rows = slice(None) if len(act.host) == h else act.dev  # a view, not a copy, of the history when all are active
        ga, fa, th = g[rows], f[rows], theta[rows]
        d, slope, stop, stop_dev = _direction_and_stops(ga, fa, hist, rows, h0, tol_test, act.dev)
        converged[act.host[stop]] = True
        if stop.all() or it == max_iter:
            break
        if stop.any():
            keep = _indices(~stop_dev, int((~stop).sum()))
            act = _Active(act.host[~stop], act.dev[keep])
            ga, fa, th, d, slope, rows = ga[keep], fa[keep], th[keep], d[keep], slope[keep], act.dev
        trial = th + d
        ft, gt = loss(trial, lam[rows], act.dev)
        # one transfer: did every head take t = 1 (most L-BFGS steps do), and the done test's flags
        # of that point, the step then (f no longer moves beyond float rounding: float32's floor)
        fl = _Flags(ok=_accepted(ft, gt, d, 1.0, slope, fa), flat=_flat(fa, ft), small=tol_test.eager(gt))
        if fl.host.ok.all():
            new_th, new_f, new_g, pending = trial, ft, gt, None
        else:  # some head rejected t = 1: backtrack, then read the done test's flags again
            new_th, new_f, new_g, pending, pending_host = _backtrack(loss, lam[rows], th, fa, ga, d, slope, act.dev,
                                                                     (trial, ft, gt), fl)
            stalled = _forget_pairs(hist, rows, act.dev, pending, pending_host)
            fl = _Flags(stalled=stalled, flat=_flat(fa, new_f), small=tol_test.eager(new_g))
        s, yv = new_th - th, new_g - ga
        valid = _curvature_ok(s, yv) if pending is None else _curvature_ok(s, yv) & ~pending
        hist.push(rows, s, yv, valid)
        if precond is None:
            gamma[rows] = torch.where(valid, (s * yv).sum(1) / (yv * yv).sum(1).clamp_min(1e-30), gamma[rows])
        theta[rows], f[rows], g[rows] = new_th, new_f, new_g  # ga, fa, th are views of these when rows is a slice
        n_iter[act.host] += 1
        act = _done(act, fl, new_g, tol_test, converged)
    return theta, f.cpu().numpy(), n_iter, converged, hist


def _flat(f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
    """f did not move beyond float rounding."""
    return (f0 - f1).abs() <= 1e-10 * f0.abs()


def _direction_and_stops(ga: torch.Tensor, fa: torch.Tensor, hist: History, rows: torch.Tensor | slice,
                         h0: Callable, tol_test: _TolTest, heads: torch.Tensor):
    """The L-BFGS direction d (H', P) of the active heads, its slope g.d (H',), and which heads stop
    here, on the host and on the device: max |grad| <= tol and an expected decrease -g.d / 2 <=
    GAP * |f|. One host transfer; another where d fell back to steepest descent, or grad_max was asked.
    ``heads`` (H',): the block's index of each active head."""
    d = _direction(ga, hist, rows, h0)
    slope = (ga * d).sum(1)
    gap = lambda sl: -0.5 * sl.double() <= GAP * fa.abs()  # noqa: E731
    fl = _Flags(bad=slope >= 0, gap=gap(slope), small=tol_test.eager(ga))
    if fl.host.bad.any():  # not a descent direction (float noise): fall back to steepest descent
        d = torch.where(fl.dev.bad[:, None], -h0(ga, rows), d)
        slope = (ga * d).sum(1)
        fl.dev.gap = gap(slope)
        fl.host.gap = fl.dev.gap.cpu().numpy()  # one more transfer, in this rare case only
    stop_dev, stop = tol_test.where(ga, heads, fl.dev.gap, fl.host.gap, fl)
    return d, slope, stop, stop_dev


def _forget_pairs(hist: History, rows: torch.Tensor | slice, heads: torch.Tensor, pending: torch.Tensor,
                  pending_host: np.ndarray) -> torch.Tensor:
    """A failed line search (``pending``) means the head's curvature pairs went bad (a tiny step's y
    is float noise): forget them, so that it retries along H0 g. Returns the heads that stalled for
    good: failed with no pairs left."""
    empty = (hist.rho[:, rows] == 0).all(0)
    if pending_host.any():
        hist.rho[:, heads[_indices(pending, int(pending_host.sum()))]] = 0
    return pending & empty


def _done(act: _Active, fl: _Flags, new_g: torch.Tensor, tol_test: _TolTest, converged: np.ndarray) -> _Active:
    """After a step: a head whose f no longer moves with max |grad| within tol, or whose line search
    stalled (no step along d lowers f), is at float32's floor and done; converged if max |grad| is
    within tol. Updates ``converged``; returns the heads that go on."""
    stalled = getattr(fl.dev, "stalled", torch.zeros_like(fl.dev.flat))  # only after a backtracking
    stalled_host = getattr(fl.host, "stalled", np.zeros_like(fl.host.flat))
    small_dev, small = tol_test.where(new_g, act.dev, fl.dev.flat | stalled, fl.host.flat | stalled_host, fl)  # where it decides
    floor = (fl.host.flat & small) | stalled_host
    converged[act.host] |= floor & small
    if not floor.any():
        return act
    return act.keep(~floor, ~((fl.dev.flat & small_dev) | stalled))
