"""Scores for a trained head on prepared features (sklearn metrics on top of torch logits)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix
from torch import nn


@torch.no_grad()
def predict_proba(head: nn.Module, X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Softmax of ``head``'s scores for X (N, D), in row chunks: ``chunk`` rows, or fewer when a
    module of the head says it needs less (``eval_chunk``: k-NN's (rows, M) similarities)."""
    chunk = min([chunk, *(m.eval_chunk for m in head.modules() if hasattr(m, "eval_chunk"))])
    head = head.to(X.device).eval()
    return torch.cat([F.softmax(head(X[s: s + chunk]), dim=1) for s in range(0, len(X), chunk)]) if len(X) else torch.zeros(0)


def score(head: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy and mean cross-entropy of ``head`` on (X, y); empty dict for no rows."""
    if len(X) == 0:
        return {}
    proba = predict_proba(head, X)
    loss = F.nll_loss(torch.log(proba.clamp_min(1e-12)), y).item()
    return {"accuracy": float(accuracy_score(y.cpu().numpy(), proba.argmax(1).cpu().numpy())), "loss": loss}


def confusion(head: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int) -> np.ndarray:
    pred = predict_proba(head, X).argmax(1).cpu().numpy()
    return confusion_matrix(y.cpu().numpy(), pred, labels=list(range(n_classes)))
