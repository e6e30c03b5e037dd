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
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.lbfgs import MAX_PRECOND_DIM, History, Preconditioner, lbfgs
from featcache.pipeline.heads.logreg import ABSENT_CLASS_BIAS, LogregResult

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


@dataclass
class ExactResult(LogregResult):
    objective: float = float("nan")  # f above at the returned head (sklearn's scaling)


class _Loss:
    """f and its gradient for H heads at once; theta (H, K*(D+1)): K weight rows then K biases,
    K = free logits (n present classes, or 1 for a binary problem), D = the columns of the X it
    is given (r once rotated)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, sample_weight: torch.Tensor, n_free: int):
        self.X, self.n, self.d, self.k = X, X.shape[0], X.shape[1], n_free
        self.binary = n_free == 1
        self.w = sample_weight / sample_weight.sum()  # (N,) so the data term is sklearn's weighted mean
        self.w64 = self.w.double()
        self.y = y.view(-1, 1, 1)

    def __call__(self, theta: torch.Tensor, lam: torch.Tensor, curvature: bool = False):
        """Args: theta (H, P); lam (H,) = 1 / (C * sum(w)). Returns f (H,) float64, grad (H, P), and
        with ``curvature`` also A (H, K, K) = sum_i w_i (diag(p_i) - p_i p_i^T) over the free logits:
        the class factor of the Hessian's Kronecker approximation (see lbfgs.Preconditioner)."""
        h, k, d = theta.shape[0], self.k, self.d
        W, b = theta[:, : k * d].reshape(h * k, d), theta[:, k * d:].reshape(h * k)
        z = torch.addmm(b, self.X, W.t()).view(self.n, h, k)  # (N, H, K) logits
        if self.binary:  # softmax over [0, z] is the sigmoid of sklearn's binomial loss
            z = torch.cat([torch.zeros_like(z), z], 2)
        # softmax and log-sum-exp from one exp of the max-shifted logits, in place: torch.logsumexp
        # (which also guards infinite logits; these are assumed finite, and a step that overflows
        # gives a NaN f, which the line search rejects) took a third of this call on 1,078 rows
        z.sub_(z.amax(2, keepdim=True))
        idx = self.y.expand(-1, h, 1)
        zy = z.gather(2, idx)  # (N, H, 1) shifted logit of the true class
        g = torch.exp_(z)
        total = g.sum(2, keepdim=True)
        data = ((total.log() - zy).squeeze(2).double() * self.w64[:, None]).sum(0)
        g.div_(total)  # softmax probabilities, in place of the logits
        A = None
        if curvature:
            # float64 and renormalised: float32 rows sum to 1 only within 1e-7, which would give the
            # logits' shift direction (exactly flat) a curvature of that size and H0 a huge step along it
            p = g.double()
            p = p / p.sum(2, keepdim=True)
            p = p[:, :, 1:] if self.binary else p  # (N, H, K) free-logit probabilities
            pw = p * self.w64.view(-1, 1, 1)
            A = torch.diag_embed(pw.sum(0)) - torch.einsum("nhk,nhl->hkl", pw, p)
        g.scatter_add_(2, idx, torch.full_like(idx, -1, dtype=g.dtype))  # P - onehot(y)
        g.mul_(self.w.view(-1, 1, 1))
        if self.binary:
            g = g[:, :, 1:]
        g = g.reshape(self.n, h * k)
        lam_rows = lam.to(W.dtype).repeat_interleave(k)[:, None]
        gW = torch.addmm(W * lam_rows, g.t(), self.X)  # (H*K, D): the fast form of X^T G
        grad = torch.cat([gW.view(h, k * d), g.sum(0).view(h, k)], 1)
        f = data + 0.5 * lam.double() * (W.double().view(h, -1) ** 2).sum(1)
        return (f, grad, A) if curvature else (f, grad)


def _unrotate(theta: torch.Tensor, V: torch.Tensor, k: int) -> torch.Tensor:
    """Rotated rows (H, K*(r+1)) of thetas or gradients back in the original features, (H, K*(D+1)):
    W = W_r V^T, same biases. For a gradient this is exact too (its weights' part is g_r V^T, as
    x = x V V^T for every row of non-zero weight), so sklearn's tol, a max over the original
    coordinates that a rotation does not preserve, is tested on it."""
    h, r = theta.shape[0], V.shape[1]
    return torch.cat([(theta[:, : k * r].reshape(h * k, r) @ V.t()).view(h, -1), theta[:, k * r:]], 1)


def _to_head(theta: torch.Tensor, present: np.ndarray, n_classes: int, d: int) -> nn.Sequential:
    """One head's theta as Linear(D, n_classes); absent classes get zero weights and
    ABSENT_CLASS_BIAS (never predicted), as logreg.to_linear does."""
    k = len(present) if len(present) > 2 else 1
    W, b = theta[: k * d].view(k, d), theta[k * d:]
    if k == 1:
        W, b = torch.cat([torch.zeros_like(W), W]), torch.cat([torch.zeros_like(b), b])
    lin = nn.Linear(d, n_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(ABSENT_CLASS_BIAS)
        idx = torch.as_tensor(present)
        lin.weight[idx] = W.detach().float().cpu()
        lin.bias[idx] = b.detach().float().cpu()
    return nn.Sequential(lin).eval()


def fit_exact(c_values: list[float] | tuple[float, ...], X: torch.Tensor, y: torch.Tensor, n_classes: int, *,
              sample_weight: np.ndarray | torch.Tensor | None = None, tol: float = TOL, max_iter: int = MAX_ITER,
              block: int = BLOCK) -> list[ExactResult]:
    """Exact ``LogisticRegression(C=c)`` for every c, on X's device and dtype; results in input order.

    Args:
        c_values: inverse L2 strengths (sklearn's C), each > 0.
        X: (N, D) standardised training rows; y: (N,) labels in [0, n_classes).
        sample_weight: (N,) non-negative row weights (sklearn's ``sample_weight``), None = all 1.
        tol: max |gradient of f| at which a C stops (converged=True); max_iter: iteration cap.
        block: how many consecutive C values share each pass over X.
    Returns:
        One ExactResult per C: its head over all n_classes (CPU), iterations, converged, seconds
        (its block's wall time shared equally among the block's C values) and objective f.
    """
    cs = [float(c) for c in c_values]
    if not cs or min(cs) <= 0:
        raise FeatcacheError(f"--C values must be positive, got {cs}")
    yc = y.to(X.device).long()
    present = torch.unique(yc).cpu().numpy()
    if len(present) < 2:
        raise FeatcacheError(f"a linear probe needs training rows of at least two classes, got {len(present)}")
    remap = torch.full((n_classes,), -1, dtype=torch.long, device=X.device)
    remap[torch.as_tensor(present, device=X.device)] = torch.arange(len(present), device=X.device)
    sw = torch.ones(len(yc), dtype=X.dtype, device=X.device) if sample_weight is None else \
        torch.as_tensor(sample_weight, dtype=X.dtype, device=X.device)
    if sw.shape != yc.shape or bool((sw < 0).any()) or float(sw.sum()) <= 0:
        raise FeatcacheError("sample weights must be one non-negative value per row, not all zero")
    k = len(present) if len(present) > 2 else 1
    precond = Preconditioner(X, sw / sw.sum(), k) if X.shape[1] <= MAX_PRECOND_DIM else None
    V, grad_max = None, None
    if precond is not None and precond.step == 1 and X.shape[0] <= ROTATE_ROWS * X.shape[1]:
        Xs, V = precond.rotate(X)  # (N, r), (D, r): the solver's weights are W V, (K, r)
        grad_max = lambda g: _unrotate(g, V, k).abs().amax(1)  # noqa: E731  (H,) in the original features
    loss = _Loss(X if V is None else Xs, remap[yc], sw, k)
    sw_sum = float(sw.double().sum())
    order = np.argsort(cs, kind="stable")
    start = X.new_zeros(k * (loss.d + 1))
    hist = None
    out: dict[int, ExactResult] = {}
    for j in range(0, len(order), max(1, block)):
        idx = order[j: j + max(1, block)]
        t0 = time.perf_counter()
        lam = torch.tensor([1.0 / (cs[i] * sw_sum) for i in idx], dtype=torch.float64, device=X.device)
        hist = History.empty(len(idx), start.numel(), X) if hist is None else hist.carried(-1, lam, k * loss.d)
        theta, f, n_iter, conv, hist = lbfgs(loss, start.repeat(len(idx), 1), lam, hist, precond, tol=tol,
                                             max_iter=max_iter, grad_max=grad_max)
        if X.is_cuda:
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / len(idx)
        heads = theta if V is None else _unrotate(theta, V, k)
        for r, i in enumerate(idx):
            out[int(i)] = ExactResult(cs[i], _to_head(heads[r], present, n_classes, X.shape[1]), int(n_iter[r]),
                                      bool(conv[r]), share, float(f[r]))
        start = theta[-1].clone()  # warm start of the next, larger C values, with its curvature pairs
    return [out[i] for i in range(len(cs))]


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
