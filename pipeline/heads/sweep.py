"""Which head configurations a fit-head run trains: the full grid, or random samples from it.

``--search grid`` takes the product of every list. ``--search random --trials N`` reads each list
as a range instead: rates (lr, weight decay, L1, logreg's C) are drawn log-uniformly between the
smallest and largest value, dropout and momentum uniformly, and categorical options (optimizer,
architecture) are chosen from the list. Samples are rounded to 3 significant digits so that a
leaderboard stays readable and a winner can be typed back in exactly.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from featcache.pipeline.config import HeadConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.train import HeadParams

SEARCHES = ("grid", "random")
DEFAULT_TRIALS = 20
LOG_SCALE = ("lr", "weight_decay", "l1", "C")  # swept on a log axis: their effect is multiplicative
# Leaderboard columns that can be swept, in the order tables and plots show them.
HYPERPARAMETERS = ("layers", "hidden", "dropout", "batchnorm", "weight_decay", "l1", "optimizer", "lr", "momentum", "C",
                   "k", "knn_temperature", "knn_voting")


def check_search(cfg: HeadConfig) -> None:
    """One-line errors for --search/--trials combinations that cannot be run."""
    if cfg.search not in SEARCHES:
        raise FeatcacheError(f"unknown --search {cfg.search!r}: choose from {', '.join(SEARCHES)}")
    if cfg.search == "grid" and cfg.trials is not None:
        raise FeatcacheError("--trials needs --search random (a grid trains every combination)")
    if cfg.trials is not None and cfg.trials < 1:
        raise FeatcacheError(f"--trials must be at least 1, got {cfg.trials}")


def _round(v: float) -> float:
    return float(f"{v:.3g}")


def _log_uniform(rng: np.random.Generator, values: tuple[float, ...]) -> float:
    """Log-uniform between the smallest positive and the largest value. A 0 in the list means
    "also try none": it is drawn with probability 1/len(values), since 0 has no place on a log axis."""
    positive = [v for v in values if v > 0]
    if not positive or (len(positive) < len(values) and rng.random() < 1 / len(values)):
        return 0.0
    lo, hi = math.log(min(positive)), math.log(max(positive))
    return _round(math.exp(rng.uniform(lo, hi)))


def _uniform(rng: np.random.Generator, values: tuple[float, ...]) -> float:
    lo, hi = min(values), max(values)
    return _round(rng.uniform(lo, hi)) if hi > lo else float(lo)


def _choice(rng: np.random.Generator, values: list):
    return values[int(rng.integers(len(values)))]


def _architectures(cfg: HeadConfig) -> list[tuple[int, ...]]:
    from featcache.pipeline.heads import kinds

    return kinds.get(cfg.head).architectures(cfg)


def _params(cfg: HeadConfig, h: tuple[int, ...], d: float, wd: float, l1: float, opt: str, lr: float,
            mom: float) -> HeadParams:
    """Normalise values that cannot matter (dropout of a linear head, momentum of Adam) so that two
    configurations that train identically are one configuration."""
    return HeadParams(hidden=h, dropout=d if h else 0.0, batchnorm=cfg.batchnorm and bool(h), weight_decay=wd,
                      l1=l1, optimizer=opt, lr=lr, momentum=mom if opt == "sgd" else 0.0, seed=cfg.seed)


def expand(cfg: HeadConfig) -> list[HeadParams]:
    """The grid of configurations, without duplicates, in a stable order."""
    out: dict[HeadParams, None] = {}
    for combo in itertools.product(_architectures(cfg), cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer,
                                   cfg.lr, cfg.momentum):
        out[_params(cfg, *combo)] = None
    return list(out)


def sample(cfg: HeadConfig) -> list[HeadParams]:
    """``cfg.trials`` random configurations (fewer when the space has fewer distinct points),
    reproducible from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    archs = _architectures(cfg)
    out: dict[HeadParams, None] = {}
    for _ in range(cfg.trials or DEFAULT_TRIALS):
        opt = _choice(rng, list(cfg.optimizer))
        out[_params(cfg, _choice(rng, archs), _uniform(rng, cfg.dropout), _log_uniform(rng, cfg.weight_decay),
                    _log_uniform(rng, cfg.l1), opt, _log_uniform(rng, cfg.lr), _uniform(rng, cfg.momentum))] = None
    return list(out)


def configurations(cfg: HeadConfig) -> list[HeadParams]:
    """The stacked-trainer configurations of a linear/mlp run."""
    return sample(cfg) if cfg.search == "random" else expand(cfg)


def c_values(cfg: HeadConfig, default: tuple[float, ...] = ()) -> list[float]:
    """Inverse regularisation strengths tried (grid, or log-uniform samples): ``cfg.C``, or the
    head's own ``default`` path when C was not given."""
    cs = cfg.C if cfg.C is not None else default
    if cfg.search == "grid":
        return list(dict.fromkeys(cs))
    rng = np.random.default_rng(cfg.seed)
    return list(dict.fromkeys(_log_uniform(rng, cs) for _ in range(cfg.trials or DEFAULT_TRIALS)))


def swept(rows: list[dict]) -> list[str]:
    """Hyperparameters that take more than one value across leaderboard rows."""
    return [k for k in HYPERPARAMETERS if len({str(r.get(k)) for r in rows if k in r}) > 1]
