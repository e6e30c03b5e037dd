"""Comparing class predictions of two solvers without depending on the CPU's rounding.

Two solvers that reach the same optimum (ours in float32 torch, scikit-learn in float64) agree on
every row whose reference logits separate the top two classes by more than their numerical noise;
a near-tie row (top-2 gap of ~1e-3) can round either way, and which way depends on the BLAS kernels
of the machine (AVX2 vs AVX-512, Intel vs AMD). So: rows with a clear reference margin must match
exactly, and near-ties may differ but only in a small bounded number.
"""
from __future__ import annotations

import numpy as np


def top2_margin(scores: np.ndarray) -> np.ndarray:
    """(N,) gap between the best and second-best score per row; a binary decision function (N,)
    is already a signed gap to the other class (its absolute value)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        return np.abs(s)
    top = np.sort(s, axis=1)
    return top[:, -1] - top[:, -2]


def assert_predictions_agree(pred, ref_pred, ref_scores, *, tol: float = 1e-2, max_near_ties: float = 0.02) -> None:
    """Every row whose reference top-2 margin exceeds ``tol`` (in logits) predicts the same class;
    rows inside the margin may differ, at most ``max_near_ties`` of all rows.

    Args:
        pred, ref_pred: (N,) predicted labels of the solver under test and of the reference.
        ref_scores: (N, C) reference logits (or (N,) binary decision values).
        tol: logit gap below which a row counts as a near-tie.
        max_near_ties: the largest fraction of rows allowed to disagree inside the margin.
    """
    pred, ref_pred = np.asarray(pred), np.asarray(ref_pred)
    clear = top2_margin(ref_scores) > tol
    wrong_clear = np.flatnonzero(clear & (pred != ref_pred))
    assert not len(wrong_clear), f"rows {wrong_clear[:10].tolist()} differ with a clear reference margin"
    near_diff = int((~clear & (pred != ref_pred)).sum())
    assert near_diff <= max_near_ties * len(pred), f"{near_diff} of {len(pred)} near-tie rows differ"
