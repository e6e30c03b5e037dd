"""Scores for a trained head on prepared features (sklearn metrics on top of torch logits)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix
from torch import nn

from featcache.pipeline.heads.source import RowSource


@torch.no_grad()
def predict_proba(head: nn.Module, X: torch.Tensor | RowSource, chunk: int = 8192) -> torch.Tensor:
    """Softmax of ``head``'s scores for X (N, D), in row chunks: ``chunk`` rows, or fewer when a
    module of the head says it needs less (``eval_chunk``: k-NN's (rows, M) similarities). X may
    be a RowSource (a streamed split): its chunks are read in turn, each cut to ``chunk`` rows."""
    if not len(X):
        return torch.zeros(0)
    chunk = min([chunk, *(m.eval_chunk for m in head.modules() if hasattr(m, "eval_chunk"))])
    head = head.to(X.device).eval()
    parts = X.chunks() if isinstance(X, RowSource) else [(None, X)]
    return torch.cat([F.softmax(head(x[s: s + chunk]), dim=1) for _, x in parts for s in range(0, len(x), chunk)])


def label_scores(y: np.ndarray, pred: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (mean per-class recall over the classes present in ``y``) and
    macro-F1 (over the classes present in ``y`` or ``pred``) of integer predictions.

    scikit-learn's accuracy_score, balanced_accuracy_score and f1_score(average="macro",
    zero_division=0), to the bit (tests/heads/test_metrics_label_scores.py), from one confusion
    matrix: theirs validate their inputs at ~2.5 ms a call, and every leaderboard row takes three.
    """
    y, pred = np.asarray(y).ravel(), np.asarray(pred).ravel()
    if len(y) == 0 or len(y) != len(pred):
        raise ValueError(f"label_scores: {len(y)} labels and {len(pred)} predictions (needs as many, at least one)")
    labels, codes = np.unique(np.concatenate([y, pred]), return_inverse=True)  # sorted, as sklearn's
    n = len(labels)
    cm = np.bincount(codes[:len(y)] * n + codes[len(y):], minlength=n * n).reshape(n, n)  # rows: true class
    tp, true, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    present = true > 0  # a class only predicted has no recall: balanced accuracy leaves it out
    f1 = 2.0 * tp / (true + predicted).astype(np.float64)  # every class of y or pred: no zero denominator
    return {"accuracy": float(tp.sum() / len(y)), "balanced_accuracy": float(np.mean(tp[present] / true[present])),
            "macro_f1": float(np.mean(f1))}


def score(head: nn.Module, X: torch.Tensor | RowSource, y: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and mean cross-entropy of ``head`` on (X, y); {} for no rows."""
    if len(X) == 0:
        return {}
    return proba_scores(predict_proba(head, X), y)


def proba_scores(proba: torch.Tensor, y: torch.Tensor) -> dict:
    """``score``'s figures from class probabilities (N, C) and labels (N,)."""
    loss = F.nll_loss(torch.log(proba.clamp_min(1e-12)), y).item()
    return {**label_scores(y.cpu().numpy(), proba.argmax(1).cpu().numpy()), "loss": loss}


def per_class(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> dict:
    """scikit-learn's classification_report as a dict: precision, recall, f1-score and support per
    class name (every class, support 0 included), plus its accuracy and averages."""
    return classification_report(y, pred, labels=list(range(len(class_names))), target_names=class_names,
                                 output_dict=True, zero_division=0)


def confusion(head: nn.Module, X: torch.Tensor | RowSource, y: torch.Tensor, n_classes: int) -> np.ndarray:
    pred = predict_proba(head, X).argmax(1).cpu().numpy()
    return confusion_matrix(y.cpu().numpy(), pred, labels=list(range(n_classes)))
