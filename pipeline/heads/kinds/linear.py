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

from featcache.pipeline.errors import FeatcacheError, opt
from featcache.pipeline.heads.kinds import register
from featcache.pipeline.heads.kinds.sequential import EPOCH_OPTIONS, EpochKind, class_weights, rows_of, with_views

SOLVERS = ("auto", "exact", "epochs")


def solver_of(cfg, data) -> str:
    """exact or epochs: see the module docstring."""
    if cfg.solver == "epochs":
        return "epochs"
    if (cfg.cv or cfg.train_sizes) and data.views is not None:
        if cfg.solver == "exact":  # folds are row weights of the exact probe; views have no place in them
            raise FeatcacheError(f"{opt('cv')}/{opt('train_sizes')} with {opt('solver')} exact on a cache with "
                                 f"augmented views: pass {opt('use_augmented')} false, or {opt('solver')} epochs")
        return "epochs"
    if cfg.solver == "exact":
        return "exact"
    if any(v > 0 for v in cfg.l1) or data.views is not None:
        return "epochs"
    return "exact"


def resolve(solver: str, C, given) -> tuple[str, tuple[float, ...] | None, str | None]:
    """(solver, C, note) before a HeadConfig is built, from what the user gave (``given``: option names).

    auto becomes epochs when an epoch option was given (an explicit --lr list asks for an epoch
    sweep), and ``note`` says so (fit_sweep warns with it once the options are checked); an option
    the chosen solver would not read is refused, never dropped: --C with --solver epochs (or with
    epoch options), an epoch option with --solver exact. C None stays None: the exact probe's
    10-value path (or logreg's) is filled in by the kind.
    """
    note = None
    epoch_given = [o for o in EPOCH_OPTIONS if o in given]
    flags = ", ".join(opt(o) for o in epoch_given)
    if solver == "exact" and epoch_given:
        raise FeatcacheError(f"{flags} configure epoch training, which {opt('solver')} exact does not do; "
                             f"drop them, or use {opt('solver')} epochs")
    if solver == "auto" and epoch_given:
        if C is not None:
            raise FeatcacheError(f"{opt('C')} with {flags}: the exact probe takes {opt('C')}, epoch training takes "
                                 f"{flags}; choose one ({opt('solver')} exact or {opt('solver')} epochs)")
        note = (f"linear head: training by epochs because {flags} {'was' if len(epoch_given) == 1 else 'were'} "
                f"given (the default, the exact L-BFGS probe over a C path, takes {opt('C')} instead)")
        solver = "epochs"
    if solver == "epochs" and C is not None:
        raise FeatcacheError(f"{opt('C')} with {opt('solver')} epochs: epoch training regularises with "
                             f"{opt('weight_decay')}; drop {opt('C')}, or use {opt('solver')} exact")
    return solver, C, note


def _exact_selection(cfg, data) -> list:
    """--cv and/or --train-sizes with the exact probe: every (size, fold) is a 0/1 row weight over
    the train rows and every weight x C one head of one L-BFGS stack (exact.fit_exact_folds), each
    fold standardised with its own training rows' statistics (as sklearn's StandardScaler +
    LogisticRegression pipeline per fold). With --cv a row per (size, C) holds the mean and std of
    its held-out fold scores (the winner is then refitted on every train row: cv_refit); without,
    each size's head is scored on the splits, as the epoch trainer's learning curve is."""
    import time

    import numpy as np

    from featcache.pipeline.heads.cv import ALL, fold_splits, size_subset
    from featcache.pipeline.heads.exact import DEFAULT_C_PATH, fit_exact_folds
    from featcache.pipeline.heads.leaderboard import split_scores
    from featcache.pipeline.heads.metrics import score
    from featcache.pipeline.heads.result import Candidate
    from featcache.pipeline.heads.sweep import c_values

    t0 = time.perf_counter()
    X, y = data.split("train")
    labels = y.cpu().numpy()
    folds = fold_splits(labels, cfg.cv, cfg.seed) if cfg.cv >= 2 else [(np.arange(len(labels)), None)]
    sizes = [*sorted({s for s in cfg.train_sizes if s != ALL}), ALL]
    slots = [(size, tr_sub, ho) for size in sizes for tr, ho in folds
             for tr_sub in [size_subset(tr, labels, size, cfg.seed)]]
    weights = np.zeros((len(slots), len(labels)))
    for i, (_, rows, _) in enumerate(slots):
        weights[i, rows] = 1.0
    cs = c_values(cfg, DEFAULT_C_PATH)
    res = fit_exact_folds(cs, X, y, len(data.class_names), weights,
                          sample_weight=class_weights(cfg, y, data.class_names, None),
                          fold_stats=cfg.standardize and cfg.cv >= 2)
    share = (time.perf_counter() - t0) / (len(sizes) * len(cs))
    out = []
    for si, size in enumerate(sizes):
        mine = range(si * len(folds), (si + 1) * len(folds))
        for ci, C in enumerate(cs):
            rs = [res[i][ci] for i in mine]
            row = {"index": len(out), "head": "linear", "solver": "exact", "hidden": "0", "C": C, "seed": cfg.seed,
                   "train_size": "all" if size == ALL else size,
                   "n_train_rows": round(float(np.mean([len(slots[i][1]) for i in mine])), 1),
                   "n_iter": max(r.n_iter for r in rs), "converged": all(r.converged for r in rs),
                   "note": "; ".join(dict.fromkeys(r.note for r in rs if r.note)) or None}
            if cfg.cv >= 2:
                held = [score(r.head, X[torch_rows(X, slots[i][2])], y[torch_rows(X, slots[i][2])])
                        for r, i in zip(rs, mine)]
                acc, loss = [h["accuracy"] for h in held], [h["loss"] for h in held]
                row.update({"cv_folds": cfg.cv, "cv_accuracy_mean": float(np.mean(acc)),
                            "cv_accuracy_std": float(np.std(acc)), "cv_loss_mean": float(np.mean(loss)),
                            "cv_loss_std": float(np.std(loss)), "fold_accuracies": acc,
                            **{f"{s}_{m}": None for s in ("train", "val", "test")
                               for m in ("loss", "accuracy", "balanced_accuracy", "macro_f1")}})
            else:
                row.update(split_scores(rs[0].head, data))
            row["seconds"] = round(share, 4)
            out.append(Candidate(row, rs[0].head))
    return out


def torch_rows(X, rows):
    """``rows`` (numpy) as an index tensor on X's device."""
    import torch

    return torch.as_tensor(rows, device=X.device)


@register
class Linear(EpochKind):
    name = "linear"
    summary = "logistic regression: the exact L-BFGS probe over C, or an epoch-trained sweep"
    options = ("C", "solver", *EPOCH_OPTIONS)

    def check(self, cfg) -> list[str]:
        bad = []
        if cfg.solver not in SOLVERS:
            bad.append(f"{opt('solver')} {cfg.solver!r} (choose from {', '.join(SOLVERS)})")
        if cfg.solver == "exact" and any(v > 0 for v in cfg.l1):
            bad.append(f"{opt('solver')} exact with {opt('l1')} > 0 (the exact probe solves an L2 probe; use "
                       f"{opt('solver')} epochs)")
        if cfg.solver == "epochs":
            bad += super().check(cfg)
        return bad

    def architectures(self, cfg) -> list[tuple[int, ...]]:
        return [()]

    def by_epochs(self, cfg) -> bool:
        return cfg.solver == "epochs" or any(v > 0 for v in cfg.l1)

    def solver_bytes(self, cfg, *, n_train: int, dim: int, n_classes: int, pass_rows: int | None = None) -> int:
        """Epochs: the stack's (EpochKind). Exact: per pass over X, BLOCK heads' (rows, H, K) logits
        and probabilities (4 temporaries) for every train row in memory, for a chunk's
        (``pass_rows``) streamed; the L-BFGS history of the path (2 x 10 slots) and Sigma's (D, D)
        eigendecomposition (3 matrices; none above lbfgs.MAX_PRECOND_DIM); X rotated into Sigma's
        eigenbasis when rows are few, or with --cv each fold's own rotated rows
        (exact.fold_rotation_bytes; D counts every column, an upper bound of the non-constant ones
        the solver keeps)."""
        epochs = super().solver_bytes(cfg, n_train=n_train, dim=dim, n_classes=n_classes, pass_rows=pass_rows)
        if self.by_epochs(cfg):
            return epochs
        from featcache.pipeline.heads.exact import BLOCK, fold_rotation_bytes, rotates_folds
        from featcache.pipeline.heads.lbfgs import MAX_PRECOND_DIM

        folds = max(cfg.cv, 1) * (1 + len(cfg.train_sizes))  # folds x sizes, one stack
        heads = BLOCK * folds
        theta = heads * n_classes * (dim + 1) * 4
        sigma = 3 * dim * dim * 4 if dim <= MAX_PRECOND_DIM else 0
        # X in Sigma's eigenbasis (exact.ROTATE_ROWS), in memory only; with --cv instead each fold's
        # own rows in its own basis (exact.FOLD_ROTATE_ROWS)
        rotated = n_train * dim * 4 if n_train <= 2 * dim and pass_rows is None else 0
        largest = n_train - n_train // max(cfg.cv, 1)  # rows of the largest fold
        if cfg.cv >= 2 and cfg.standardize and pass_rows is None and rotates_folds(largest, dim, folds):
            rotated = fold_rotation_bytes(largest, dim, folds)
        rows = n_train if pass_rows is None else min(pass_rows, n_train)
        return 4 * rows * heads * n_classes * 4 + n_train * 8 * 4 + theta * 30 + sigma + rotated

    def fit(self, cfg, data):
        if solver_of(cfg, data) == "epochs":
            return super().fit(cfg, data)
        if cfg.cv or cfg.train_sizes:
            return _exact_selection(cfg, data)
        from featcache.pipeline.heads.exact import DEFAULT_C_PATH, fit_exact
        from featcache.pipeline.heads.leaderboard import exact_row
        from featcache.pipeline.heads.result import Candidate
        from featcache.pipeline.heads.sweep import c_values

        X, y, weights = with_views(*data.split("train"), data.views_of(data.rows["train"]))
        weights = class_weights(cfg, y, data.class_names, weights)
        results = fit_exact(c_values(cfg, DEFAULT_C_PATH), X, y, len(data.class_names), sample_weight=weights)
        return [Candidate(exact_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]

    def cv_refit(self, cfg, data, best):
        if best.params is not None:
            return super().cv_refit(cfg, data, best)
        import time

        import numpy as np

        from featcache.pipeline.heads.leaderboard import split_scores
        from featcache.pipeline.heads.result import Candidate

        t0 = time.perf_counter()
        rows = np.sort(np.concatenate([data.rows[s] for s in (("train", "val") if cfg.refit else ("train",))]))
        head, _ = self.refit(cfg, data, best, rows)
        row = {**best.row, **split_scores(head, data), "refit_rows": len(rows),
               "refit_seconds": round(time.perf_counter() - t0, 3)}
        return Candidate(row, head)

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
