"""Heads that classify by cosine similarity to stored training features: k-NN (DINO's weighted
vote) and nearest class centroid. The kinds that train them are heads/kinds/knn.py and centroid.py;
this module holds the torch side, imported only when a head is fitted or loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featcache.pipeline.heads.logreg import ABSENT_CLASS_BIAS

CHUNK = 4096  # evaluated rows per similarity block: (CHUNK, M) float32



def vote_log_shares(sims: torch.Tensor, labels: torch.Tensor, n_classes: int, temperature: float,
                    voting: str) -> torch.Tensor:
    """(B, k) similarities of the k nearest and their (B, k) labels -> (B, C) log vote shares."""
    weights = torch.exp(sims / temperature) if voting == "temperature" else torch.ones_like(sims)
    votes = torch.zeros(len(sims), n_classes, dtype=weights.dtype, device=sims.device)
    votes.scatter_add_(1, labels, weights)
    return torch.log(votes / votes.sum(1, keepdim=True) + 1e-12)


class KNNHead(nn.Module):
    """k-NN over a bank of L2-normalised training features: standardised features (N, D) -> (N, C)."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int, temperature: float,
                 voting: str):
        super().__init__()
        self.register_buffer("bank", bank)  # (M, D) L2-normalised rows, the cache's dtype
        self.register_buffer("labels", labels.long())  # (M,)
        self.n_classes, self.k, self.temperature, self.voting = n_classes, min(k, len(bank)), temperature, voting
        # rows per forward for callers that chunk (metrics.predict_proba): (rows, M) similarities <= ~256 MB
        self.eval_chunk = max(1, (256 << 20) // (4 * max(len(bank), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(x.float(), dim=1) @ self.bank.float().t()  # (N, M)
        top, idx = sims.topk(self.k, dim=1)
        return vote_log_shares(top, self.labels[idx], self.n_classes, self.temperature, self.voting)


def normalized(X: torch.Tensor) -> torch.Tensor:
    return F.normalize(X.float(), dim=1)


def neighbours(Q: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (similarities, bank indices), each (len(Q), k), in CHUNK-row blocks; with ``exclude_self``
    Q is the bank itself and row i never counts itself."""
    sims_out, idx_out = [], []
    for s in range(0, len(Q), CHUNK):
        sims = Q[s: s + CHUNK] @ bank.t()  # (b, M)
        if exclude_self:
            rows = torch.arange(s, s + len(sims), device=sims.device)
            sims[torch.arange(len(sims), device=sims.device), rows] = -float("inf")
        top, idx = sims.topk(k, dim=1)
        sims_out.append(top)
        idx_out.append(idx)
    return torch.cat(sims_out), torch.cat(idx_out)


def scores(log_shares: torch.Tensor, y: torch.Tensor) -> dict:
    from featcache.pipeline.heads.metrics import label_scores

    return {**label_scores(y.cpu().numpy(), log_shares.argmax(1).cpu().numpy()), "loss": float(F.nll_loss(log_shares, y))}


class CentroidHead(nn.Module):
    """Standardised features (N, D) -> cosine similarity to each class centroid / T + bias, (N, C)."""

    def __init__(self, centroids: torch.Tensor, bias: torch.Tensor, temperature: float):
        super().__init__()
        self.register_buffer("centroids", centroids)  # (C, D), unit rows (zero for absent classes)
        self.register_buffer("bias", bias)  # (C,): 0, or ABSENT_CLASS_BIAS for a class without rows
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1) @ self.centroids.t() / self.temperature + self.bias


def fit_centroids(X: torch.Tensor, y: torch.Tensor, n_classes: int, temperature: float) -> CentroidHead:
    """The centroid head of rows X (N, D) with labels y (N,)."""
    Xn = F.normalize(X.float(), dim=1)
    sums = torch.zeros(n_classes, X.shape[1], device=X.device).index_add_(0, y, Xn)
    counts = torch.bincount(y, minlength=n_classes)
    bias = torch.where(counts > 0, 0.0, ABSENT_CLASS_BIAS).float()
    return CentroidHead(F.normalize(sums, dim=1).cpu(), bias.cpu(), temperature).eval()


def saved_bank(bank: torch.Tensor, data) -> torch.Tensor:
    """The bank as saved: CPU, at the cache's dtype (float16 caches keep a float16 bank)."""
    dtype = torch.float16 if getattr(data, "feature_dtype", "float32") == "float16" else torch.float32
    return bank.detach().to("cpu", dtype)
