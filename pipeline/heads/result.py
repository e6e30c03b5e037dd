"""What one fit-head sweep produced, held in memory: the ranked leaderboard, the winning head with its
history and metrics. ``SweepResult.save(run_dir)`` writes exactly the files ``featcache fit-head``
writes; the ``plot_*`` methods return matplotlib Figures (shown inline by a notebook).

A run folder is written whole or not at all: every file goes into a temporary folder beside
RUN_DIR, which is then renamed into place, so a reader never sees a new head beside old metrics.
"""
from __future__ import annotations

import glob
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.cache.atomic import check_output_name, disk_full_error, fsync_dir, is_disk_full, real_path, write_json
from featcache.cache.lock import cache_lock
from featcache.cache.store import FeatureCache
from featcache.pipeline.config import HeadConfig
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning
from featcache.pipeline.heads import kinds
from featcache.pipeline.heads.data import Prepared
from featcache.pipeline.heads.headio import StandardizedHead, save_head
from featcache.pipeline.heads.leaderboard import write_leaderboard
from featcache.pipeline.heads.metrics import predict_proba
from featcache.pipeline.heads.runs import RUN_REQUIRED
from featcache.pipeline.heads.sweep import swept
from featcache.pipeline.heads.train_types import HeadParams
from featcache.pipeline.outputs import contains, read_json

CV_KEYS = ("cv_folds", "cv_accuracy_mean", "cv_accuracy_std", "cv_loss_mean", "cv_loss_std", "fold_accuracies",
           "fold_best_epochs", "refit_rows", "refit_epochs")
BACKBONE_ATTRS = ("backbone", "weights", "layer", "pool", "preprocess", "feature_dim")  # what runs record of it


class Leaderboard(list):
    """Leaderboard rows (dicts), best first, as leaderboard.json holds them."""

    def to_pandas(self):
        """The rows as a pandas DataFrame (pandas is optional: installed separately)."""
        try:
            import pandas as pd
        except ImportError:
            raise FeatcacheError("Leaderboard.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(list(self))


@dataclass
class Candidate:
    """One trained configuration: its leaderboard row, its head and what is needed to retrain it."""

    row: dict
    head: nn.Module  # standardised features (N, D) -> scores (N, C), softmax = probabilities
    history: list[dict] = field(default_factory=list)  # per epoch; empty for heads without epochs
    params: HeadParams | None = None  # epoch-trained heads: to retrain it; None for the others (row holds theirs)


def backbone_record(cache: FeatureCache) -> dict:
    """The backbone description a run records, read from the cache's attributes."""
    return {k: cache.attrs.get(k) for k in BACKBONE_ATTRS}


def label(row: dict) -> str:
    """Short description of a configuration for legends: its kind's own words."""
    return kinds.get(row["head"]).label(row)


@dataclass(repr=False)
class SweepResult:
    """Every configuration of one sweep, ranked, and the head fit-head would save.

    Attributes:
        config: the HeadConfig that ran (``output`` is None until saved).
        leaderboard: every configuration, best first (``.to_pandas()``).
        head: the saved head, (N, D) standardised features -> logits: the winner, or its refit.
        refit: what ``refit=True`` measured, else None.
    """

    config: HeadConfig
    cache: FeatureCache  # features not needed any more; attrs, fingerprint and views count are
    data: Prepared
    candidates: list[Candidate]
    leaderboard: Leaderboard
    head: nn.Module
    refit: dict | None
    device: str
    seconds: float  # training and scoring, wall clock
    columns: np.ndarray | None = None  # the winner's columns of the cache's features (fit-head --layers)
    layers: str | None = None  # the winner's layer set, e.g. "blocks.3,blocks.4"
    memory: dict | None = None  # the memory plan (bytes per part, available) and the process's peak RSS

    @property
    def best(self) -> Candidate:
        """The winning configuration (before any refit)."""
        return self._by_index[self.leaderboard[0]["index"]]

    @property
    def _by_index(self) -> dict[int, Candidate]:
        return {c.row["index"]: c for c in self.candidates}

    @property
    def history(self) -> list[dict]:
        """Per-epoch train/val loss, accuracy and weight norm of the winner (empty for logreg)."""
        return self.best.history

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def metrics(self) -> dict:
        """What metrics.json holds (without ``files``)."""
        cfg, win, best, cache, data = self.config, self.leaderboard[0], self.best, self.cache, self.data
        m = {
            "head": cfg.head, "winner_kind": win["head"],
            **{k: win.get(k) for k in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss",
                                       "test_loss", "train_balanced_accuracy", "train_macro_f1", "best_epoch",
                                       "epochs_run")},
            "history": best.history, "params": self.best_kind.params(best),
            "config": asdict(cfg), "search": cfg.search, "n_configs": len(self.candidates),
            "n_train": len(data.rows["train"]), "n_val": len(data.rows["val"]), "n_test": len(data.rows["test"]),
            "val_source": data.val_source, "class_names": data.class_names, "cache": cfg.cache,
            "cache_fingerprint": cache.fingerprint, "backbone": cache.attrs.get("backbone"),
            "backbone_info": backbone_record(cache), "device": self.device, "augmented": self._augmented(),
            **({"layers": self.layers} if self.layers else {}),
        }
        if "cv_folds" in win:  # --cv: the winner's fold scores and its refit on all train rows
            m["cv"] = {k: win.get(k) for k in CV_KEYS}
        if cfg.train_sizes:
            m["train_size"] = win.get("train_size")
        if self.refit is not None:
            m.update(refit=self.refit, test_accuracy_before_refit=win.get("test_accuracy"),
                     test_accuracy=self.refit["test_accuracy"], test_loss=self.refit["test_loss"])
        if m["test_accuracy"] is None:
            for key in ("test_accuracy", "test_loss", "test_accuracy_before_refit"):
                m.pop(key, None)
        m.update(self._label_report())
        if self.memory is not None:
            m["memory"] = self.memory
        m["seconds"] = round(self.seconds, 3)
        return m

    def _label_report(self) -> dict:
        """The saved head's balanced accuracy, macro-F1 and per-class report (precision, recall, F1,
        support per class: scikit-learn's classification_report) on the val and test splits."""
        if getattr(self, "_report_cache", None) is None:
            from featcache.pipeline.heads.metrics import label_scores, per_class, predict_proba

            out = {}
            for split in ("val", "test"):
                X, y = self.data.split(split)
                if len(X):
                    pred, yn = predict_proba(self.head, X).argmax(1).cpu().numpy(), y.cpu().numpy()
                    scores = label_scores(yn, pred)
                    out.update({f"{split}_balanced_accuracy": scores["balanced_accuracy"],
                                f"{split}_macro_f1": scores["macro_f1"],
                                f"{split}_per_class": per_class(yn, pred, self.class_names)})
            self._report_cache = out
        return self._report_cache

    def _augmented(self) -> dict:
        """What the training rows were: views sampled per epoch, or the un-augmented features."""
        data, cache = self.data, self.cache
        if data.views is None:
            return {"used": False, "views_in_cache": cache.n_views}
        with_views = int((data.view_pos[data.rows["train"]] >= 0).sum())
        return {"used": True, "views_in_cache": cache.n_views, "train_rows_with_views": with_views,
                "train_rows": len(data.rows["train"]), "keep_original": self.config.views_keep_original,
                "augment": cache.attrs.get("augment"),
                "augment_fingerprint": cache.attrs.get("augment_fingerprint")}

    @property
    def best_kind(self) -> kinds.HeadKind:
        """The head kind of the winner (an mlp sweep's winner can be its linear member)."""
        return kinds.get(self.best.row["head"])

    def head_metadata(self) -> dict:
        """head.pt's metadata: the kind and its architecture, standardisation and where the features came from."""
        cfg, best, data, cache = self.config, self.best, self.data, self.cache
        kind = self.best_kind
        return {
            "kind": kind.name, "in_dim": int(data.X.shape[1]), "n_classes": len(data.class_names),
            **kind.architecture(best, self.head), "class_names": data.class_names,
            "label_values": self.label_values.tolist(),
            "standardize": None if data.mean is None else {"mean": data.mean.tolist(), "scale": data.scale.tolist()},
            "cache": cfg.cache, "cache_fingerprint": cache.fingerprint, "backbone": backbone_record(cache),
            "extract_config": cache.attrs.get("config"),  # predict/export/finetune rebuild the backbone from it
            "config": asdict(cfg), "head_type": cfg.head, "params": kind.params(best),
            "best_epoch": best.row.get("best_epoch"), "refit": cfg.refit, "augmented": self._augmented(),
            **({"layers": self.layers, "columns": self.columns.tolist(),
                "input_dim": int(cache.attrs["feature_dim"])}
               if self.columns is not None else {}),
        }

    # ------------------------------------------------------------------ prediction on features
    def model(self) -> StandardizedHead:
        """The saved head behind its standardisation: raw cached features (N, D) -> logits (N, C)."""
        d = self.data
        return StandardizedHead(self.head, d.mean, d.scale, self.columns, int(d.X.shape[1])).eval()

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, C) for raw (unstandardised) features X (N, D)."""
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        return predict_proba(self.model(), X).numpy()

    @property
    def label_values(self) -> np.ndarray:
        """(C,) what ``predict`` returns for each class: the labels as given when trained on arrays
        (ints, strings, bools keep their type), the class indices when trained on a cache (the
        labels ``Cache.arrays`` returns; ``class_names[i]`` names index i)."""
        values = self.cache.attrs.get("label_values")
        return np.asarray(values) if values is not None else np.arange(len(self.class_names))

    def predict(self, X) -> np.ndarray:
        """Labels (N,) for raw features X (N, D), in the label space of the training data (``label_values``)."""
        return self.label_values[self.predict_proba(X).argmax(1)]

    # ------------------------------------------------------------------ pictures
    def _plot_curves(self):
        """Train/val loss and accuracy per epoch of the winner (None for heads without epochs)."""
        from featcache.pipeline.heads import plots

        best = self.best
        if not best.history:
            return None
        return plots.training_curves_figure(best.history, f"best head: {label(best.row)}", best.row["best_epoch"])

    def _plot_weight_norms(self):
        """Weight norm per epoch of the best configurations (None for logreg)."""
        from featcache.pipeline.heads import plots

        if not self.best.history:
            return None
        return plots.weight_norm_figure([(label(r), self._by_index[r["index"]].history) for r in self.leaderboard])

    def _plot_confusion(self):
        """Confusion matrix of the saved head on the test split (val when there is none), or None."""
        from featcache.pipeline.heads import plots
        from featcache.pipeline.heads.metrics import confusion

        split = "test" if len(self.data.rows["test"]) else "val"
        X, y = self.data.split(split)
        if not len(X):
            return None
        title = f"{split} split, {'refit of ' if self.config.refit else ''}best head\n{label(self.best.row)}"
        return plots.confusion_figure(confusion(self.head, X, y, len(self.class_names)), self.class_names, title)

    def _plot_sweep(self):
        """Val accuracy against each swept hyperparameter (None when nothing was swept)."""
        from featcache.pipeline.heads import plots

        fields = swept(self.leaderboard)
        if not fields:
            return None
        metric = "val_accuracy" if self.leaderboard[0].get("val_accuracy") is not None else "train_accuracy"
        metric = "cv_accuracy_mean" if self.config.cv >= 2 else metric
        return plots.sweep_figure([r for r in self.leaderboard if r.get(metric) is not None], fields, metric)

    def _plot_learning_curve(self):
        """Val accuracy (mean held-out fold accuracy with --cv) against training-set size, one line
        per head family; None without ``train_sizes``."""
        from featcache.pipeline.heads import plots

        if not self.config.train_sizes:
            return None
        metric = "cv_accuracy_mean" if self.config.cv >= 2 else "val_accuracy"
        if all(r.get(metric) is None for r in self.leaderboard):
            return None
        return plots.learning_curve_figure(self.leaderboard, metric)

    def _figure(self, make, why: str):
        fig = make()
        if fig is None:
            raise FeatcacheError(why)
        return fig

    def plot_curves(self):
        """Train/val loss and accuracy per epoch of the winner: a matplotlib Figure.

        Raises:
            FeatcacheError: the winner has no epochs (exact probe, logreg, k-NN, centroid).
        """
        return self._figure(self._plot_curves, f"plot_curves: the winner ({label(self.best.row)}) is not trained "
                            "by epochs, so it has no per-epoch curves (solver='epochs' trains linear heads by epochs)")

    def plot_weight_norms(self):
        """Weight norm per epoch of the best configurations: a Figure (FeatcacheError without epochs)."""
        return self._figure(self._plot_weight_norms, f"plot_weight_norms: the winner ({label(self.best.row)}) is not "
                            "trained by epochs, so there is no weight norm per epoch")

    def plot_confusion(self):
        """Confusion matrix of the saved head on the test split (val when there is none): a Figure."""
        return self._figure(self._plot_confusion, "plot_confusion: this run has no test or val rows to count")

    def plot_sweep(self):
        """Val accuracy against each swept hyperparameter: a Figure (FeatcacheError when nothing was swept)."""
        return self._figure(self._plot_sweep, "plot_sweep: nothing was swept (every option had one value)")

    def plot_learning_curve(self):
        """Accuracy against training-set size: a Figure (FeatcacheError without ``train_sizes``)."""
        return self._figure(self._plot_learning_curve, "plot_learning_curve: the run has no train_sizes "
                            "(or no scores for them)")

    # ------------------------------------------------------------------ notebooks
    def __repr__(self) -> str:
        """One short line (the dataclass repr would print every history and array)."""
        win = self.leaderboard[0]
        score = "cv_accuracy_mean" if "cv_folds" in win else "val_accuracy"
        value = win.get(score)
        return (f"SweepResult({len(self.candidates)} configuration(s) of head {self.config.head!r}, best "
                f"{label(win)}: {score.replace('_', ' ')} {'-' if value is None else f'{value:.4f}'}, "
                f"{len(self.class_names)} classes, {self.seconds:.1f}s)")

    def _repr_html_(self) -> str:
        """The leaderboard as a table (notebooks), at most 20 rows."""
        from html import escape

        from featcache.pipeline.heads.report import leaderboard_lines

        body = "\n".join(leaderboard_lines(list(self.leaderboard)))
        return f"<p>{escape(repr(self))}</p><pre>{escape(body)}</pre>"

    # ------------------------------------------------------------------ files
    def save(self, run_dir: str | os.PathLike, *, overwrite: bool | None = None, plots: bool | None = None,
             lock: bool = True) -> list[str]:
        """Write the run folder exactly as ``featcache fit-head`` does (head.pt, metrics.json,
        leaderboard.json/.csv and, unless ``plots`` is False, the PNGs); returns the file names.

        The folder is assembled beside ``run_dir`` and renamed into place: an interrupted save leaves
        the previous run as it was, and a reader never sees a mix of two runs. An existing run is
        replaced only with ``overwrite`` (default: the config's ``overwrite``).

        Args:
            lock: hold RUN_DIR.lock while writing (False: the caller holds it).
        """
        t0 = time.perf_counter()
        out = Path(run_dir)
        overwrite = self.config.overwrite if overwrite is None else overwrite
        check_run_dir(out, overwrite, self.config.cache)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FeatcacheError(f"cannot create the folder of run {out}: {e.strerror or e}") from None
        check_output_name(real_path(out), "run folder")  # name too long / read-only folder: one line, now
        if lock:
            with cache_lock(out, writer="featcache fit-head"):
                return self.save(out, overwrite=overwrite, plots=plots, lock=False)
        self.config = replace(self.config, output=str(out), overwrite=overwrite)
        for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # left by a killed save; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            files = self._write(tmp, self.config.plots if plots is None else plots, t0)
            _replace_dir(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and is_disk_full(e):
                raise disk_full_error(out, None) from None
            if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
                raise FeatcacheError(f"cannot write run folder {out}: {e.strerror or e}") from None
            raise
        return files

    def _write(self, folder: Path, with_plots: bool, t0: float) -> list[str]:
        save_head(folder / "head.pt", self.head, self.head_metadata())
        if os.environ.get("FEATCACHE_TEST_KILL_AFTER_HEAD"):  # fault injection: tests/heads/test_trust_fit.py
            os.kill(os.getpid(), 9)
        files = ["head.pt", "metrics.json", *write_leaderboard(folder, self.leaderboard)]
        if with_plots:
            from featcache.pipeline.heads import plots

            for name, make in (("curves.png", self._plot_curves), ("weight_norm.png", self._plot_weight_norms),
                               ("confusion.png", self._plot_confusion), ("sweep.png", self._plot_sweep),
                               ("learning_curve.png", self._plot_learning_curve)):
                fig = make()
                if fig is not None:
                    files.append(plots.save_figure(fig, folder / name))
        metrics = {**self.metrics, "files": files}
        metrics["seconds"] = round(self.seconds + time.perf_counter() - t0, 3)
        write_json(folder / "metrics.json", metrics)
        for name in files:  # on disk before the rename makes the run visible
            with open(folder / name, "rb") as fh:
                os.fsync(fh.fileno())
        return files


def check_run_dir(out: Path, overwrite: bool, cache: str | os.PathLike | None = None) -> None:
    """One-line error, before any training, for a run folder that could not or should not be
    written: it is a file, it holds files and ``overwrite`` is off, it holds anything but a fit-head
    run's own files (``overwrite`` replaces runs, never a user's folder), it holds or is the input
    ``cache``, or its nearest existing ancestor is a file or not writable."""
    if cache is not None and contains(out, cache):
        raise FeatcacheError(f"run folder {out} holds the input cache {cache}: choose a folder of its own for the run")
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"run folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FeatcacheError(f"run folder {out} already holds files; pass --overwrite to replace it "
                                 "(the old run stays as it is until the new one is complete)")
        ours = run_files(out)
        if ours is None:
            raise FeatcacheError(f"--overwrite replaces fit-head runs only, and {out} is not one (no fit-head "
                                 "metrics.json); choose a new run folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise FeatcacheError(f"--overwrite replaces fit-head runs only, and {out} also holds "
                                 f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which fit-head "
                                 "did not write; choose a new run folder")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FeatcacheError(f"cannot write run folder {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FeatcacheError(f"cannot write run folder {out}: {ancestor} is not writable")


def run_files(folder: Path) -> set[str] | None:
    """The names of the files a fit-head run folder's metrics.json says fit-head wrote there
    (metrics.json included), or None when ``folder`` holds no fit-head metrics.json."""
    m = read_json(folder / "metrics.json")
    if m is None or not all(k in m for k in RUN_REQUIRED) or not isinstance(m.get("files"), list):
        return None
    return {"metrics.json", *(str(f) for f in m["files"])}


def _replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``: the old run (if any) is moved aside, then its own files
    are removed (a file that appeared there meanwhile is kept, and the old folder with it)."""
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)  # the rename itself survives a power loss, as for every atomic write
        return
    ours = run_files(target) or set()
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the previous run back
        raise
    fsync_dir(target.parent)
    for p in old.iterdir():
        if p.name in ours and p.is_file():
            p.unlink()
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"the replaced run's folder kept files fit-head did not write: they are in {old}",
                      FeatcacheWarning, stacklevel=3)
