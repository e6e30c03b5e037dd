"""``--head logreg``: scikit-learn's LogisticRegression over a C grid, the reference linear probe
(heads/logreg.py), saved as the same ``nn.Sequential(Linear)`` a linear head saves."""
from __future__ import annotations

from featcache.pipeline.errors import opt
from featcache.pipeline.heads.kinds import register
from featcache.pipeline.heads.kinds.sequential import SequentialKind, class_weights, rows_of, with_views

C_PATH = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # C values tried when none are given: one cold start each


@register
class Logreg(SequentialKind):
    name = "logreg"
    summary = "scikit-learn LogisticRegression over C, the reference linear probe"
    options = ("C",)

    def check(self, cfg) -> list[str]:
        if cfg.cv or cfg.train_sizes:
            return [f"{opt('cv')}/{opt('train_sizes')} with {opt('head')} logreg (scikit-learn fits one C at a time; "
                    f"use {opt('head')} linear, whose exact probe solves the same objective)"]
        return []

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int) -> int:
        """scikit-learn keeps float32 X as it is; its loss holds (N, K) float64 predictions and
        gradients (~6 of them)."""
        return 6 * n_train * n_classes * 8

    def fit(self, cfg, data):
        from featcache.pipeline.heads.leaderboard import logreg_row
        from featcache.pipeline.heads.logreg import fit_logreg
        from featcache.pipeline.heads.result import Candidate
        from featcache.pipeline.heads.sweep import c_values

        X, y, weights = with_views(*data.split("train"), data.views_of(data.rows["train"]))
        weights = class_weights(cfg, y, data.class_names, weights)
        results = fit_logreg(c_values(cfg, C_PATH), X, y, len(data.class_names), cfg.seed, weights)
        return [Candidate(logreg_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]

    def refit(self, cfg, data, best, rows):
        from featcache.pipeline.heads.logreg import fit_logreg

        X, y, weights = with_views(*rows_of(data, rows), data.views_of(rows))
        weights = class_weights(cfg, y, data.class_names, weights)
        return fit_logreg([best.row["C"]], X, y, len(data.class_names), cfg.seed, weights)[0].head, None

    def label(self, row: dict) -> str:
        return f"logreg C={row['C']:g}"

    def describe(self, params: dict) -> str:
        return f"logreg C={params['C']:g} (scikit-learn LogisticRegression)"
