"""``--head logreg``: scikit-learn's LogisticRegression over a C grid, the standard linear probe.

It sees exactly what the torch heads see (the same split, the same standardised features) and is
turned into the same ``nn.Sequential(Linear)`` that a linear head saves, so head.pt, metrics,
leaderboard, plots and ``--refit`` work unchanged.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn

MAX_ITER = 1000  # L-BFGS iterations per C; runs that hit it are marked converged=False
ABSENT_CLASS_BIAS = -1e4  # logit bias of a class with no training rows: never predicted


@dataclass
class LogregResult:
    C: float
    head: nn.Sequential  # Linear(D, n_classes), CPU, eval mode
    n_iter: int  # L-BFGS iterations used
    converged: bool
    seconds: float


def to_linear(model: LogisticRegression, in_dim: int, n_classes: int) -> nn.Sequential:
    """sklearn's coef_/intercept_ as an nn.Linear over all ``n_classes`` (same argmax and softmax).

    A binary model has one row (the logit of classes_[1] against classes_[0]); softmax over
    [0, z] equals sigmoid(z), so it becomes a zero row for classes_[0] and z for classes_[1].
    """
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    w = np.zeros((n_classes, in_dim), dtype=np.float32)
    b = np.full(n_classes, ABSENT_CLASS_BIAS, dtype=np.float32)
    w[model.classes_] = coef
    b[model.classes_] = intercept
    lin = nn.Linear(in_dim, n_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    return nn.Sequential(lin).eval()


def fit_logreg(c_values: list[float], X: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int = 0,
               sample_weight: np.ndarray | None = None) -> list[LogregResult]:
    """Fit one multinomial L2 LogisticRegression per C on (X (N, D), y (N,)); results in input order.

    Every C is a cold start, i.e. exactly ``LogisticRegression(C=c).fit(X, y)``. (Warm-starting
    along the C path is faster but L-BFGS then stops as soon as the gradient is under ``tol``: on
    50,000 x 2,048 features C=1 started from the C=0.1 solution took 0 iterations and kept it.)
    """
    Xn = X.detach().cpu().numpy()  # float32 as cached: sklearn's L-BFGS keeps it (half the memory of float64)
    yn = y.detach().cpu().numpy()
    out = []
    for c in c_values:
        model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(Xn, yn, sample_weight=sample_weight)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        out.append(LogregResult(c, to_linear(model, X.shape[1], n_classes), int(np.max(model.n_iter_)), converged,
                                time.perf_counter() - t0))
    return out
