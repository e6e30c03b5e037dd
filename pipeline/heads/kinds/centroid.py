"""``--head centroid``: nearest class mean under cosine similarity, the few-shot baseline.

Each class's centroid is the mean of its L2-normalised (standardised) training features, itself
normalised; a row's scores are its cosine similarities to the centroids divided by
``knn_temperature`` (so their softmax is a distribution; the argmax, the nearest centroid, does not
depend on it). A class without training rows is never predicted.
"""
from __future__ import annotations

import time

from featcache.pipeline.errors import opt
from featcache.pipeline.heads.kinds import HeadKind, register
from featcache.pipeline.heads.kinds.sequential import rows_of


@register
class Centroid(HeadKind):
    name = "centroid"
    summary = "nearest class mean under cosine similarity (no training)"
    options = ("knn_temperature",)
    trains = False

    def check(self, cfg) -> list[str]:
        bad = [f"{opt('knn_temperature')} {t} (must be > 0 and finite)" for t in cfg.knn_temperature if not 0 < t < float("inf")]
        if cfg.cv or cfg.train_sizes:
            bad.append(f"{opt('cv')}/{opt('train_sizes')} with {opt('head')} centroid (it trains nothing; compare it "
                       "on the val split)")
        return bad

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int) -> int:
        return n_train * dim * 4  # the normalised training rows

    def fit(self, cfg, data):
        from featcache.pipeline.heads.leaderboard import split_scores
        from featcache.pipeline.heads.result import Candidate
        from featcache.pipeline.heads.similarity import fit_centroids

        out = []
        X, y = data.split("train")
        for i, temp in enumerate(dict.fromkeys(cfg.knn_temperature)):
            t0 = time.perf_counter()
            head = fit_centroids(X, y, len(data.class_names), temp)
            row = {"index": i, "head": self.name, "knn_temperature": temp, **split_scores(head, data),
                   "seconds": round(time.perf_counter() - t0, 4)}
            out.append(Candidate(row, head))
        return out

    def refit(self, cfg, data, best, rows):
        from featcache.pipeline.heads.similarity import fit_centroids

        X, y = rows_of(data, rows)
        return fit_centroids(X, y, len(data.class_names), best.row["knn_temperature"]), None

    def label(self, row: dict) -> str:
        return f"centroid T={row.get('knn_temperature', 0):g}"

    def describe(self, params: dict) -> str:
        return "nearest class mean (cosine similarity, no training)"

    def architecture(self, best, head) -> dict:
        return {"knn_temperature": head.temperature}

    def build(self, meta: dict):
        import torch

        from featcache.pipeline.heads.similarity import CentroidHead

        c, d = meta["n_classes"], meta["in_dim"]
        return CentroidHead(torch.zeros(c, d), torch.zeros(c), meta["knn_temperature"]).eval()
