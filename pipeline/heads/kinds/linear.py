"""``--head linear``: multinomial logistic regression on the features, by one of two solvers.

- exact (the default for a plain L2 probe): scikit-learn's LogisticRegression objective solved by
  the batched L-BFGS of heads/exact.py along a C path;
- epochs: mini-batch training as a stack of configurations (lr, weight decay, L1, optimizer...),
  the same machinery as the MLP.

``solver="auto"`` picks exact unless an L1 penalty, augmented views to sample per epoch, --cv or
--train-sizes asks for epochs (the command line and ``fit_heads`` also pick epochs when an epoch
option such as --lr is given: see ``resolve``).
"""
from __future__ import annotations

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.kinds import register
from featcache.pipeline.heads.kinds.sequential import EPOCH_OPTIONS, EpochKind, class_weights, rows_of, with_views

SOLVERS = ("auto", "exact", "epochs")


def solver_of(cfg, data) -> str:
    """exact or epochs: see the module docstring."""
    if cfg.solver == "epochs":
        return "epochs"
    if cfg.cv or cfg.train_sizes:  # folds and sizes are masked heads of the epoch trainer
        if cfg.solver == "exact":
            raise FeatcacheError("--cv/--train-sizes train masked stacks of epoch-trained heads: use --solver epochs")
        return "epochs"
    if cfg.solver == "exact":
        return "exact"
    if any(v > 0 for v in cfg.l1) or data.views is not None:
        if cfg.class_weight is not None:
            raise FeatcacheError("--class-weight with an epoch-trained linear head (chosen for --l1 or augmented "
                                 "views) is not built yet: use --solver exact (views become weighted rows) or no --l1")
        return "epochs"
    return "exact"


def resolve(solver: str, C, given) -> tuple[str, tuple[float, ...]]:
    """(solver, C) before a HeadConfig is built: auto becomes epochs when an epoch option was given
    (an explicit --lr list asks for an epoch sweep); C defaults to the exact probe's 10-value path
    unless the solver is epochs."""
    from featcache.pipeline.config import HeadConfig
    from featcache.pipeline.heads.exact import DEFAULT_C_PATH

    if solver == "auto" and any(o in given for o in EPOCH_OPTIONS):
        solver = "epochs"
    if C is None:
        C = HeadConfig.C if solver == "epochs" else DEFAULT_C_PATH
    return solver, C


@register
class Linear(EpochKind):
    name = "linear"
    summary = "logistic regression: the exact L-BFGS probe over C, or an epoch-trained sweep"
    options = ("C", "solver", *EPOCH_OPTIONS)

    def check(self, cfg) -> list[str]:
        bad = []
        if cfg.solver not in SOLVERS:
            bad.append(f"--solver {cfg.solver!r} (choose from {', '.join(SOLVERS)})")
        if cfg.solver == "exact" and any(v > 0 for v in cfg.l1):
            bad.append("--solver exact with --l1 > 0 (the exact probe solves an L2 probe; use --solver epochs)")
        if cfg.solver == "epochs" or cfg.cv or cfg.train_sizes:
            bad += super().check(cfg)
        return bad

    def architectures(self, cfg) -> list[tuple[int, ...]]:
        return [()]

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int) -> int:
        """Epochs: the stack's (EpochKind). Exact: per pass over X, BLOCK heads' (N, H, K) logits
        and probabilities (4 temporaries), the L-BFGS history of the path (2 x 10 slots) and
        Sigma's (D, D) eigendecomposition (3 matrices; none above lbfgs.MAX_PRECOND_DIM)."""
        epochs = super().solver_bytes(cfg, n_train=n_train, dim=dim, n_classes=n_classes)
        if cfg.solver == "epochs" or cfg.cv or cfg.train_sizes or any(v > 0 for v in cfg.l1):
            return epochs
        from featcache.pipeline.heads.exact import BLOCK
        from featcache.pipeline.heads.lbfgs import MAX_PRECOND_DIM

        theta = BLOCK * n_classes * (dim + 1) * 4
        sigma = 3 * dim * dim * 4 if dim <= MAX_PRECOND_DIM else 0
        rotated = n_train * dim * 4 if n_train <= 2 * dim else 0  # X in Sigma's eigenbasis (exact.ROTATE_ROWS)
        return 4 * n_train * BLOCK * n_classes * 4 + theta * 30 + sigma + rotated

    def fit(self, cfg, data):
        if solver_of(cfg, data) == "epochs":
            return super().fit(cfg, data)
        from featcache.pipeline.heads.exact import fit_exact
        from featcache.pipeline.heads.leaderboard import exact_row
        from featcache.pipeline.heads.result import Candidate
        from featcache.pipeline.heads.sweep import c_values

        X, y, weights = with_views(*data.split("train"), data.views_of(data.rows["train"]))
        weights = class_weights(cfg, y, data.class_names, weights)
        results = fit_exact(c_values(cfg), X, y, len(data.class_names), sample_weight=weights)
        return [Candidate(exact_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]

    def refit(self, cfg, data, best, rows):
        if best.params is not None:
            return super().refit(cfg, data, best, rows)
        from featcache.pipeline.heads.exact import fit_exact

        X, y, weights = with_views(*rows_of(data, rows), data.views_of(rows))
        weights = class_weights(cfg, y, data.class_names, weights)
        return fit_exact([best.row["C"]], X, y, len(data.class_names), sample_weight=weights)[0].head, None

    def params(self, best) -> dict:
        return super().params(best) if best.params is not None else {"C": best.row["C"]}

    def label(self, row: dict) -> str:
        if "C" in row and row.get("solver", "exact") == "exact":
            return f"linear C={row['C']:g}"
        return super().label(row)

    def describe(self, params: dict) -> str:
        if "C" in params:
            return f"linear C={params['C']:g} (exact L-BFGS, scikit-learn's LogisticRegression objective)"
        return super().describe(params)
