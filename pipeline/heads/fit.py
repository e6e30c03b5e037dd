"""``featcache fit-head``: cache -> configurations -> stacked training -> ranked SweepResult.

``fit_sweep`` trains in memory (the Python API's ``fit_heads`` and the CLI share it);
``run_fit_head`` then saves RUN_DIR through ``SweepResult.save``: head.pt (the winner, or its
refit), metrics.json, leaderboard.json/.csv (every configuration, best first) and the plots.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.cache.lock import cache_lock
from featcache.cache.store import FeatureCache, read_cache
from featcache.pipeline.config import HeadConfig
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.cv import refit_cv_winner, train_torch
from featcache.pipeline.heads.data import Prepared, prepare
from featcache.pipeline.heads.exact import fit_exact
from featcache.pipeline.heads.layersets import layer_columns, layer_set_label
from featcache.pipeline.heads.leaderboard import exact_row, logreg_row, rank, rank_key
from featcache.pipeline.heads.logreg import fit_logreg
from featcache.pipeline.heads.metrics import score
from featcache.pipeline.heads.optim import OPTIMIZERS
from featcache.pipeline.heads.sweep import c_values, check_search, expand
from featcache.pipeline.heads.result import Candidate, Leaderboard, SweepResult, check_run_dir
from featcache.pipeline.heads.train import TrainData, TrainSettings, train_many

HEADS = ("linear", "mlp", "logreg")
SOLVERS = ("auto", "exact", "epochs")  # of --head linear, see _solver
# options only the epoch trainer reads: giving one asks for an epoch sweep (resolve_solver)
EPOCH_OPTIONS = ("lr", "weight_decay", "optimizer", "momentum", "epochs", "batch_size", "patience")
__all__ = ["HEADS", "check_config", "expand", "fit_sweep", "rank_key", "resolve_solver", "run_fit_head"]


def check_config(cfg: HeadConfig) -> None:
    """One-line errors for option values no configuration could train with."""
    if cfg.head not in HEADS:
        raise FeatcacheError(f"unknown head {cfg.head!r}: choose from {', '.join(HEADS)}")
    check_search(cfg)
    if cfg.solver not in SOLVERS:
        raise FeatcacheError(f"unknown --solver {cfg.solver!r}: choose from {', '.join(SOLVERS)}")
    if cfg.solver == "exact" and (cfg.head != "linear" or any(v > 0 for v in cfg.l1)):
        raise FeatcacheError("--solver exact solves an L2 linear probe: it needs --head linear and no --l1 > 0")
    for opt in cfg.optimizer:
        if opt not in OPTIMIZERS:
            raise FeatcacheError(f"unknown optimizer {opt!r}: choose from {', '.join(OPTIMIZERS)}")
    # Every comparison is written so that NaN fails it (NaN compares False): a NaN learning rate
    # would otherwise "train" an untouched epoch-0 head that looks like a result.
    ranges = {"--dropout": (cfg.dropout, lambda v: 0 <= v < 1), "--lr": (cfg.lr, lambda v: 0 < v < math.inf),
              "--weight-decay": (cfg.weight_decay, lambda v: 0 <= v < math.inf),
              "--l1": (cfg.l1, lambda v: 0 <= v < math.inf), "--momentum": (cfg.momentum, lambda v: 0 <= v < 1),
              "--C": (cfg.C, lambda v: 0 < v < math.inf)}
    bad = [f"{flag} {v} (must be finite{', in [0, 1)' if flag in ('--dropout', '--momentum') else ''})"
           for flag, (values, ok) in ranges.items() for v in values if not ok(v)]
    bad += [f"--hidden {h}" for hs in cfg.hidden for h in hs if h < 1]
    if cfg.epochs < 1 or cfg.batch_size < 1:
        bad.append("--epochs and --batch-size must be at least 1")
    if cfg.patience < 0:
        bad.append(f"--patience {cfg.patience} (0 disables early stopping; negative has no meaning)")
    if cfg.batchnorm and cfg.batch_size < 2 and cfg.head == "mlp":
        bad.append("--batchnorm needs --batch-size of at least 2 (batch norm cannot normalise one row)")
    if cfg.cv == 1 or cfg.cv < 0:
        bad.append(f"--cv {cfg.cv} (needs at least 2 folds; 0 = off)")
    bad += [f"--train-sizes {v} (images per class; 0 or all = every train row)" for v in cfg.train_sizes if v < 0]
    if not 0 <= cfg.views_keep_original <= 1:
        bad.append(f"--views-keep-original {cfg.views_keep_original} (a probability in [0, 1])")
    if cfg.head == "logreg" and (cfg.cv or cfg.train_sizes):
        bad.append("--cv/--train-sizes with --head logreg (they train linear/mlp heads as masked stacks)")
    if bad:
        raise FeatcacheError(f"invalid value: {bad[0]}")
    lists = (cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer, cfg.lr, cfg.momentum, cfg.hidden, cfg.C)
    if not all(len(v) for v in lists):
        raise FeatcacheError("every swept option needs at least one value")


def _with_views(X: torch.Tensor, y: torch.Tensor, views: torch.Tensor | None):
    """logreg has no epochs to sample views in: it fits the rows plus all their views as extra rows,
    each weighted 1/(1+V) so the data term (a sum over rows in sklearn) keeps its scale and C means
    what it means without views. Returns (X, y, sample_weight or None)."""
    if views is None:
        return X, y, None
    k = 1 + views.shape[1]
    return (torch.cat([X, views.reshape(-1, X.shape[1])]), torch.cat([y, y.repeat_interleave(views.shape[1])]),
            np.full(len(y) * k, 1.0 / k))


def resolve_solver(head: str, solver: str, C: tuple[float, ...] | None, given) -> tuple[str, tuple[float, ...]]:
    """What ``fit-head`` and ``fit_heads`` do with --solver and --C before building a HeadConfig.

    Args:
        head, solver: as given; C: as given, None = the default; given: names of the options
            the user set (command line, or keyword arguments).
    Returns:
        (solver, C): auto becomes epochs when an epoch option (EPOCH_OPTIONS) was given (an explicit
        --lr list asks for an epoch sweep); C defaults to the exact probe's 10-value path where the
        exact probe may run, else to logreg's 5 values.
    """
    from featcache.pipeline.heads.exact import DEFAULT_C_PATH

    if solver == "auto" and any(o in given for o in EPOCH_OPTIONS):
        solver = "epochs"
    if C is None:
        C = HeadConfig.C if head != "linear" or solver == "epochs" else DEFAULT_C_PATH
    return solver, C


def _solver(cfg: HeadConfig, data: Prepared) -> str:
    """exact or epochs for a linear head. auto = exact for a plain L2 probe: no --l1 > 0 and no
    augmented views to sample per epoch (the CLI also picks epochs when --lr, --weight-decay,
    --optimizer, --momentum, --epochs, --batch-size or --patience is given: those configure epochs)."""
    if cfg.head != "linear" or cfg.solver == "epochs":
        return "epochs"
    if cfg.cv or cfg.train_sizes:  # folds and sizes are masked heads of the epoch trainer
        if cfg.solver == "exact":
            raise FeatcacheError("--cv/--train-sizes train masked stacks of epoch-trained heads: use --solver epochs")
        return "epochs"
    if cfg.solver == "exact":
        return "exact"
    return "epochs" if any(v > 0 for v in cfg.l1) or data.views is not None else "exact"


def _train_exact(cfg: HeadConfig, data: Prepared) -> list[Candidate]:
    """One candidate per C (``cfg.C``, grid or random as logreg): the exact L-BFGS probe. With
    --solver exact and augmented views, views are extra rows weighted as for logreg."""
    X, y, weights = _with_views(*data.split("train"), data.views_of(data.rows["train"]))
    results = fit_exact(c_values(cfg), X, y, len(data.class_names), sample_weight=weights)
    return [Candidate(exact_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]


def _train_logreg(cfg: HeadConfig, data: Prepared) -> list[Candidate]:
    X, y, weights = _with_views(*data.split("train"), data.views_of(data.rows["train"]))
    results = fit_logreg(c_values(cfg), X, y, len(data.class_names), cfg.seed, weights)
    return [Candidate(logreg_row(i, r, data, cfg.seed), r.head) for i, r in enumerate(results)]


def _refit(cfg: HeadConfig, data: Prepared, best: Candidate) -> tuple[nn.Sequential, dict]:
    """Retrain the winner's exact configuration on train+val (its best epoch count, no early
    stopping; logreg and the exact linear probe: its C) and score it. Standardisation keeps the train-only statistics."""
    t0 = time.perf_counter()
    rows = np.sort(np.concatenate([data.rows["train"], data.rows["val"]]))
    idx = torch.as_tensor(rows, device=data.X.device)
    X, y = data.X[idx], data.y[idx]
    n_classes = len(data.class_names)
    views = data.views_of(rows)
    if best.params is None:
        Xr, yr, weights = _with_views(X, y, views)
        if best.row.get("solver") == "exact":
            head = fit_exact([best.row["C"]], Xr, yr, n_classes, sample_weight=weights)[0].head
        else:
            head = fit_logreg([best.row["C"]], Xr, yr, n_classes, cfg.seed, weights)[0].head
        epochs = None
    else:
        epochs = best.row["best_epoch"]
        head = train_many([best.params], data=TrainData(X, y, n_classes, None, None, views=views), settings=TrainSettings(epochs, cfg.batch_size, patience=0))[0].head
    fitted, test = score(head, X, y), score(head, *data.split("test"))
    info = {"n_rows": len(rows), "epochs": epochs, "train_val_accuracy": fitted["accuracy"],
            "train_val_loss": fitted["loss"], "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
            "seconds": round(time.perf_counter() - t0, 3)}
    return head, info


def fit_sweep(cfg: HeadConfig, cache: FeatureCache, *, progress: bool = False) -> SweepResult:
    """Train every configuration of ``cfg`` on ``cache`` in memory and rank them; writes nothing.

    Args:
        cfg: the sweep (``cfg.output`` is not used here; ``SweepResult.save`` writes the run).
        cache: a loaded cache (features included), from a file or built from arrays.
    Returns:
        The ranked SweepResult with the head fit-head would save (the winner, or its refit).
    """
    t0 = time.perf_counter()
    check_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.use_augmented and not cache.n_views:
        raise FeatcacheError(f"--use-augmented: {cache.path} has no augmented views (extract with --augment N)")
    use_views = cache.n_views > 0 and cfg.use_augmented is not False
    # --layers: every layer set is one more swept option, prepared (and standardised) on its own
    columns_of = {layer_set_label(names, cache.attrs): cols for names in cfg.layers  # validated first
                  for cols in [layer_columns(cache.attrs, names, cache.path)]}  # one entry per distinct set
    sets = list(columns_of.items()) or [(None, None)]
    candidates: list[Candidate] = []
    set_of: dict[int, tuple[str | None, np.ndarray | None, Prepared]] = {}  # row index -> its set
    for label, columns in sets:
        data = prepare(cache, cfg.val_fraction, cfg.seed, cfg.standardize, device, use_views, val_views=cfg.refit,
                       drop_nonfinite=cfg.drop_nonfinite, columns=columns)
        if cfg.refit and not len(data.rows["val"]):
            raise FeatcacheError("--refit retrains on train+val, but this run has no validation split (--val-fraction 0)")
        train = {"logreg": _train_logreg, "exact": _train_exact}.get(
            "logreg" if cfg.head == "logreg" else _solver(cfg, data), train_torch)
        for c in train(cfg, data):
            c.row = {"index": len(candidates), **({"layers": label} if label else {}),
                     **{k: v for k, v in c.row.items() if k != "index"}}
            set_of[len(candidates)] = (label, columns, data)
            candidates.append(c)
    ranked = Leaderboard(rank([c.row for c in candidates]))
    if ranked[0].get("status") == "failed":
        raise FeatcacheError(f"every configuration diverged (non-finite training loss) in all {len(ranked)}; "
                             "try a smaller --lr")
    best = next(c for c in candidates if c.row["index"] == ranked[0]["index"])
    label, columns, data = set_of[best.row["index"]]
    if cfg.cv >= 2:  # the winner of the folds, refitted on all train rows (train+val with --refit)
        candidates = [refit_cv_winner(cfg, data, best) if c is best else c for c in candidates]
        best = next(c for c in candidates if c.row["index"] == ranked[0]["index"])
        ranked[0] = {"rank": 1, **best.row}
        return SweepResult(config=cfg, cache=cache, data=data, candidates=candidates, leaderboard=ranked,
                           head=best.head, refit=None, device=str(device), seconds=time.perf_counter() - t0,
                           columns=columns, layers=label)
    head, refit = _refit(cfg, data, best) if cfg.refit else (best.head, None)
    return SweepResult(config=cfg, cache=cache, data=data, candidates=candidates, leaderboard=ranked, head=head,
                       refit=refit, device=str(device), seconds=time.perf_counter() - t0, columns=columns,
                       layers=label)


def run_fit_head(cfg: HeadConfig, progress: bool = True) -> dict:
    """``featcache fit-head``: train every configuration, save the run folder, return the summary."""
    check_config(cfg)
    out = Path(cfg.output)
    check_run_dir(out, cfg.overwrite, cfg.cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Held from before training to the rename: a second fit-head into RUN_DIR is refused at once.
    with cache_lock(out, writer="featcache fit-head"):
        result = fit_sweep(cfg, read_cache(cfg.cache), progress=progress)
        files = result.save(out, lock=False)
    return summary(result, files)


def summary(result: SweepResult, files: list[str]) -> dict:
    """What ``fit-head --json`` prints: metrics.json without the history, plus the leaderboard."""
    metrics = result.metrics
    metrics.pop("history")
    return {"run_dir": result.config.output, **metrics, "files": files, "leaderboard": list(result.leaderboard)}
