"""``featcache fit-head``: cache -> configurations -> stacked training -> ranked SweepResult.

``fit_sweep`` trains in memory (the Python API's ``fit_heads`` and the CLI share it);
``run_fit_head`` then saves RUN_DIR through ``SweepResult.save``: head.pt (the winner, or its
refit), metrics.json, leaderboard.json/.csv (every configuration, best first) and the plots.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from featcache.cache.atomic import check_output_name, real_path
from featcache.cache.lock import cache_lock
from featcache.cache.store import FeatureCache, read_cache
from featcache.pipeline.config import SELECT_BY, HeadConfig
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning, opt
from featcache.pipeline.heads import kinds
from featcache.pipeline.heads.data import Prepared, make_splits, prepare
from featcache.pipeline.heads.kinds.sequential import EPOCH_OPTIONS  # given one: an epoch sweep (resolve_solver)
from featcache.pipeline.heads.layersets import layer_columns, layer_set_label
from featcache.pipeline.heads.leaderboard import rank, rank_key
from featcache.pipeline.heads.memory import MemoryPlan, parse_size, peak_rss_bytes, stream_plan
from featcache.pipeline.heads.memory import plan as memory_plan
from featcache.pipeline.heads.memory import size_text as _gb
from featcache.pipeline.heads.metrics import score
from featcache.pipeline.heads.optim import OPTIMIZERS
from featcache.pipeline.heads.progress import reporting
from featcache.pipeline.heads.result import Candidate, Leaderboard, SweepResult, check_run_dir
from featcache.pipeline.heads.stream import StreamSettings
from featcache.pipeline.heads.sweep import check_search

__all__ = ["EPOCH_OPTIONS", "check_config", "fit_sweep", "rank_key", "resolve_solver", "run_fit_head"]


def check_config(cfg: HeadConfig) -> None:
    """One-line errors for option values no configuration could train with."""
    kind = kinds.get(cfg.head)
    check_search(cfg)
    for o in cfg.optimizer:
        if o not in OPTIMIZERS:
            raise FeatcacheError(f"unknown optimizer {o!r}: choose from {', '.join(OPTIMIZERS)}")
    # Every comparison is written so that NaN fails it (NaN compares False): a NaN learning rate
    # would otherwise "train" an untouched epoch-0 head that looks like a result.
    ranges = {"dropout": (cfg.dropout, lambda v: 0 <= v < 1), "lr": (cfg.lr, lambda v: 0 < v < math.inf),
              "weight_decay": (cfg.weight_decay, lambda v: 0 <= v < math.inf),
              "l1": (cfg.l1, lambda v: 0 <= v < math.inf), "momentum": (cfg.momentum, lambda v: 0 <= v < 1),
              "C": (cfg.C or (), lambda v: 0 < v < math.inf)}
    bad = [f"{opt(name)} {v} (must be finite{', in [0, 1)' if name in ('dropout', 'momentum') else ''})"
           for name, (values, ok) in ranges.items() for v in values if not ok(v)]
    bad += [f"{opt('hidden')} {h}" for hs in cfg.hidden for h in hs if h < 1]
    if cfg.epochs < 1 or cfg.batch_size < 1:
        bad.append(f"{opt('epochs')} and {opt('batch_size')} must be at least 1")
    if cfg.patience < 0:
        bad.append(f"{opt('patience')} {cfg.patience} (0 disables early stopping; negative has no meaning)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        bad.append(f"{opt('val_fraction')} {cfg.val_fraction} (must be in [0, 1))")
    if cfg.cv == 1 or cfg.cv < 0:
        bad.append(f"{opt('cv')} {cfg.cv} (needs at least 2 folds; 0 = off)")
    bad += [f"{opt('train_sizes')} {v} (images per class; 0 or all = every train row)" for v in cfg.train_sizes if v < 0]
    if not 0 <= cfg.views_keep_original <= 1:
        bad.append(f"{opt('views_keep_original')} {cfg.views_keep_original} (a probability in [0, 1])")
    if cfg.select_by not in SELECT_BY:
        bad.append(f"{opt('select_by')} {cfg.select_by!r} (choose from {', '.join(SELECT_BY)})")
    elif cfg.select_by != "accuracy" and cfg.cv:
        bad.append(f"{opt('select_by')} {cfg.select_by} with {opt('cv')} (folds are ranked by their mean accuracy)")
    if cfg.class_weight is not None and not kind.trains:
        bad.append(f"{opt('class_weight')} with {opt('head')} {cfg.head} (it trains nothing to weight)")
    bad += kind.check(cfg)
    if bad:
        raise FeatcacheError(f"invalid value: {bad[0]}")
    lists = (cfg.dropout, cfg.weight_decay, cfg.l1, cfg.optimizer, cfg.lr, cfg.momentum, cfg.hidden,
             (1,) if cfg.C is None else cfg.C, cfg.k, cfg.knn_temperature, cfg.knn_voting)
    if not all(len(v) for v in lists):
        raise FeatcacheError("every swept option needs at least one value")


def resolve_solver(head: str, solver: str, C: tuple[float, ...] | None,
                   given) -> tuple[str, tuple[float, ...] | None, str | None]:
    """What ``fit-head`` and ``fit_heads`` do with --solver and --C before building a HeadConfig.

    Args:
        head, solver: as given; C: as given, None = the default; given: names of the options
            the user set (command line, or keyword arguments).
    Returns:
        (solver, C, note): for the linear head as kinds.linear.resolve settles them (auto becomes
        epochs when an epoch option was given, and ``note`` says so for fit_sweep to warn with;
        options the solver would not read are refused); other heads keep both as given (C None =
        the head's own path) and no note.
    """
    from featcache.pipeline.heads.kinds.linear import resolve

    if head == kinds.get("linear").name:
        return resolve(solver, C, given)
    return solver, C, None


def _refit(cfg: HeadConfig, data: Prepared, best: Candidate) -> tuple[nn.Module, dict]:
    """Retrain the winner's exact configuration on train+val (its best epoch count, no early
    stopping; C for logreg and the exact probe; the bank for k-NN) and score it. Standardisation
    keeps the train-only statistics."""
    t0 = time.perf_counter()
    rows = np.sort(np.concatenate([data.rows["train"], data.rows["val"]]))
    head, epochs = kind_of(best).refit(cfg, data, best, rows)
    fitted, test = score(head, *data.take(rows)), score(head, *data.split("test"))
    info = {"n_rows": len(rows), "epochs": epochs, "train_val_accuracy": fitted["accuracy"],
            "train_val_loss": fitted["loss"], "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
            "seconds": round(time.perf_counter() - t0, 3)}
    return head, info


def _plan(cfg: HeadConfig, kind: kinds.HeadKind, cache: FeatureCache, sets: list, use_views: bool) -> MemoryPlan:
    """The run's memory plan (heads/memory.py), from the cache's metadata alone: in memory when that
    fits (or the features are in memory already), else streamed, saying so in one line; a run that
    fits neither way is refused here, before any work."""
    with warnings.catch_warnings():  # prepare warns about the same split when it makes it
        warnings.simplefilter("ignore")
        rows, _ = make_splits(cache, cfg.val_fraction, cfg.seed)
    full = int(cache.attrs["feature_dim"])
    widths = sorted((full if cols is None else len(cols) for _, cols in sets), reverse=True)
    held = sum(widths[:2])  # the set being trained and the best set so far (fit_sweep keeps no other)
    contiguous = all(len(r) == 0 or r[-1] - r[0] == len(r) - 1 for r in rows.values())
    view_rows = int(np.isin(rows["train"], np.flatnonzero(cache.split == "train")).sum()) if use_views else 0
    n_train, n_classes, budget = len(rows["train"]), len(cache.class_names), parse_size(cfg.max_memory)
    solver = kind.solver_bytes(cfg, n_train=n_train, dim=widths[0], n_classes=n_classes)
    in_memory = memory_plan(n_rows=len(cache.labels), dim=held, contiguous=contiguous, view_rows=view_rows,
                            n_views=cache.n_views if use_views else 0, solver=solver, budget=budget)
    if in_memory.fits or cache.features is not None:
        in_memory.check()
        return in_memory
    why = _no_streaming(cfg, kind, use_views)
    if why:
        in_memory.check(why)

    def chunked(room: int) -> MemoryPlan:
        return stream_plan(n_rows=len(cache.labels), dim=widths[0], full_dim=full, epochs=kind.by_epochs(cfg),
                           n_train=n_train, batch_size=cfg.batch_size, budget=room,
                           solver_of=lambda rows: kind.solver_bytes(cfg, n_train=n_train, dim=widths[0],
                                                                    n_classes=n_classes, pass_rows=rows))

    limit = in_memory.limit_text
    half = len(cache.labels) * full * 2  # a float16 cache held as stored: half its float32 matrix
    if cache.attrs.get("dtype") == "float16" and in_memory.limit > half:
        kept = replace(chunked(in_memory.limit - half), features=half, mode="memory16", budget=budget)
        if kept.fits:
            warnings.warn(f"the features need {_gb(in_memory.work)} in memory as float32, more than {limit}: "
                          f"keeping them at float16 ({_gb(half)}) and upcasting {kept.chunk_rows:,} rows at a time",
                          FeatcacheWarning, stacklevel=3)
            return kept
    streamed = chunked(budget)
    streamed.check()
    warnings.warn(f"the features need {_gb(in_memory.work)} in memory, more than {limit}: streaming them from "
                  f"{cache.path} in chunks of {streamed.chunk_rows:,} rows", FeatcacheWarning, stacklevel=3)
    return streamed


def _no_streaming(cfg: HeadConfig, kind: kinds.HeadKind, use_views: bool) -> str | None:
    """Why this run cannot stream (an option streaming does not support), or None."""
    if not kind.streams:
        return f"{opt('head')} {kind.name} (it holds its training rows in memory; linear and mlp stream)"
    for name, on in (("cv", cfg.cv), ("train_sizes", cfg.train_sizes), ("use_augmented", use_views)):
        if on:
            return f"{opt(name)} (its heads index the training rows in memory)"
    return None


def _memory_record(memory: MemoryPlan, data: Prepared) -> dict:
    """metrics.json's memory: the plan, the measured peak and, streamed, what the passes cost."""
    io = {"stream_io": data.X.stats.record()} if data.streamed else {}
    return {"plan": memory.record(), "peak_rss_bytes": peak_rss_bytes(), **io}


def fit_sweep(cfg: HeadConfig, cache: FeatureCache, *, progress: bool = False, note: str | None = None) -> SweepResult:
    """Train every configuration of ``cfg`` on ``cache`` in memory and rank them; writes nothing.

    Args:
        cfg: the sweep (``cfg.output`` is not used here; ``SweepResult.save`` writes the run).
        cache: a cache's metadata (read_cache(features=False): prepare reads the features) or one
            built from arrays.
        note: said once as a FeatcacheWarning when the options are valid (resolve_solver's note).
    Returns:
        The ranked SweepResult with the head fit-head would save (the winner, or its refit).
    """
    t0 = time.perf_counter()
    check_config(cfg)
    kind = kinds.get(cfg.head)
    device = resolve_device(cfg.device)
    if cfg.use_augmented and not cache.n_views:
        raise FeatcacheError(f"{opt('use_augmented')}: {cache.path} has no augmented views (extract with --augment N)")
    if cfg.use_augmented and not kind.trains:
        raise FeatcacheError(f"{opt('use_augmented')} with {opt('head')} {cfg.head}: it trains nothing, so it has no "
                             "use for views")
    use_views = cache.n_views > 0 and cfg.use_augmented is not False and kind.trains
    # --layers: every layer set is one more swept option, prepared (and standardised) on its own
    columns_of = {layer_set_label(names, cache.attrs): cols for names in cfg.layers  # validated first
                  for cols in [layer_columns(cache.attrs, names, cache.path)]}  # one entry per distinct set
    sets = list(columns_of.items()) or [(None, None)]
    memory = _plan(cfg, kind, cache, sets, use_views)
    stream = None if memory.mode == "memory" else \
        StreamSettings(memory.chunk_rows, memory.window_rows or 0, in_memory=memory.mode == "memory16")
    with reporting(progress, f"fit-head {cfg.head}"):  # the solvers tick it: passes over X, epochs
        candidates, set_of, kept = _train_sets(cfg, kind, cache, sets, device, use_views, note, stream)
        ranked = Leaderboard(rank([c.row for c in candidates], cfg.select_by))
        if ranked[0].get("status") == "failed":
            raise FeatcacheError(f"every configuration diverged (non-finite training loss or weights) in all {len(ranked)}; "
                                 f"try a smaller {opt('lr')}")
        best = next(c for c in candidates if c.row["index"] == ranked[0]["index"])
        label, columns = set_of[best.row["index"]]
        data = kept[label]
        refit = None
        if cfg.cv >= 2:  # the winner of the folds, refitted on all train rows (train+val with --refit)
            candidates = [kind_of(best).cv_refit(cfg, data, best) if c is best else c for c in candidates]
            best = next(c for c in candidates if c.row["index"] == ranked[0]["index"])
            ranked[0] = {"rank": 1, **best.row}
            head = best.head
        else:
            head, refit = _refit(cfg, data, best) if cfg.refit else (best.head, None)
    return SweepResult(config=cfg, cache=cache, data=data, candidates=candidates, leaderboard=ranked, head=head,
                       refit=refit, device=str(device), seconds=time.perf_counter() - t0, columns=columns,
                       layers=label, memory=_memory_record(memory, data))


def kind_of(candidate: Candidate) -> kinds.HeadKind:
    """The kind that trained ``candidate`` (an mlp sweep's winner can be its linear member)."""
    return kinds.get(candidate.row["head"])


def _train_sets(cfg: HeadConfig, kind: kinds.HeadKind, cache: FeatureCache, sets: list, device, use_views: bool,
                note: str | None, stream: StreamSettings | None):
    """Every layer set prepared and trained in turn. Returns (candidates, row index -> its layer set,
    {label: prepared data}) holding only the best set so far's data: one matrix more, never all."""
    candidates: list[Candidate] = []
    set_of: dict[int, tuple[str | None, np.ndarray | None]] = {}
    kept: dict[str | None, Prepared] = {}
    for label, columns in sets:
        data = prepare(cache, cfg.val_fraction, cfg.seed, cfg.standardize, device, use_views, val_views=cfg.refit,
                       drop_nonfinite=cfg.drop_nonfinite, columns=columns, stream=stream)
        if cfg.refit and not len(data.rows["val"]):
            raise FeatcacheError(f"{opt('refit')} retrains on train+val, but this run has no validation split "
                                 f"({opt('val_fraction')} 0)")
        if note:  # options valid and data read: now say what was chosen for the user, once
            warnings.warn(note, FeatcacheWarning, stacklevel=3)
            note = None
        for c in kind.fit(cfg, data):
            c.row = {"index": len(candidates), **({"layers": label} if label else {}),
                     **{k: v for k, v in c.row.items() if k != "index"}}
            set_of[len(candidates)] = (label, columns)
            candidates.append(c)
        kept[label] = data
        leader = set_of[min((c.row for c in candidates), key=lambda r: rank_key(r, cfg.select_by))["index"]][0]
        kept = {leader: kept[leader]}
        del data
    return candidates, set_of, kept


def run_fit_head(cfg: HeadConfig, progress: bool = True, note: str | None = None) -> dict:
    """``featcache fit-head``: train every configuration, save the run folder, return the summary."""
    check_config(cfg)
    out = Path(cfg.output)
    check_run_dir(out, cfg.overwrite, cfg.cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output_name(real_path(out), "run folder")  # name too long / read-only folder: before training
    # Held from before training to the rename: a second fit-head into RUN_DIR is refused at once.
    with cache_lock(out, writer="featcache fit-head"):
        # features=False: prepare reads the matrix itself, once, straight into its training array
        result = fit_sweep(cfg, read_cache(cfg.cache, features=False), progress=progress, note=note)
        files = result.save(out, lock=False)
    return summary(result, files)


def summary(result: SweepResult, files: list[str]) -> dict:
    """What ``fit-head --json`` prints: metrics.json without the history, plus the leaderboard."""
    metrics = result.metrics
    metrics.pop("history")
    return {"run_dir": result.config.output, **metrics, "files": files, "leaderboard": list(result.leaderboard)}
