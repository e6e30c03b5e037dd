"""PNG pictures of a fit-head run, written beside metrics.json (matplotlib, Agg backend, no display).

curves.png       train vs val loss and accuracy per epoch of the best head
weight_norm.png  Frobenius norm of the weights per epoch (best head bold, the next ones thin)
confusion.png    confusion matrix of the saved head (test split, else val)
sweep.png        val accuracy against each swept hyperparameter, one panel each
learning_curve.png  val (or mean CV) accuracy against training-set size, one line per head family
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, nothing left open): each
``*_figure`` function returns one (a notebook shows it inline), and the file writers below save it.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; sklearn's display imports pyplot, which must not look for a screen

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from featcache.pipeline.heads.sweep import LOG_SCALE  # noqa: E402

MAX_NORM_CURVES = 8  # weight-norm lines drawn besides the best head: more is unreadable
DPI = 100


def save_figure(fig: Figure, path: Path) -> str:
    """Write ``fig`` as a PNG at ``path``; returns the file name."""
    fig.savefig(path, dpi=DPI)
    return path.name


def training_curves(history: list[dict], path: Path, title: str = "", best_epoch: int | None = None) -> str:
    return save_figure(training_curves_figure(history, title, best_epoch), path)


def weight_norm_curves(curves: list[tuple[str, list[dict]]], path: Path) -> str:
    return save_figure(weight_norm_figure(curves), path)


def confusion_plot(cm: np.ndarray, class_names: list[str], path: Path, title: str) -> str:
    return save_figure(confusion_figure(cm, class_names, title), path)


def sweep_plot(rows: list[dict], fields: list[str], path: Path, metric: str = "val_accuracy") -> str:
    return save_figure(sweep_figure(rows, fields, metric), path)


def training_curves_figure(history: list[dict], title: str = "", best_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs val (val lines only when the history has them); a dotted
    line marks the epoch whose weights were kept."""
    fig = Figure(figsize=(10, 4), layout="tight")
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            key = f"{split}_{metric}"
            if history and key in history[0]:
                ax.plot(epochs, [h[key] for h in history], style, marker=".", label=split)
        if best_epoch:
            ax.axvline(best_epoch, linestyle=":", color="gray", label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy" if metric == "loss" else metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training curves")
    return fig


def weight_norm_figure(curves: list[tuple[str, list[dict]]]) -> Figure:
    """Frobenius norm of each head's weight matrices per epoch; ``curves`` = (label, history), best first."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    for n, (label, history) in enumerate(curves[: MAX_NORM_CURVES + 1]):
        ax.plot([h["epoch"] for h in history], [h["weight_norm"] for h in history], label=label,
                linewidth=2.5 if n == 0 else 1.0, alpha=1.0 if n == 0 else 0.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("||W||_F (all weight matrices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("weight norm per epoch (bold: best head)")
    return fig


def confusion_figure(cm: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    n = len(class_names)
    size = min(4 + 0.45 * n, 20)
    fig = Figure(figsize=(size, size * 0.85), layout="tight")
    ax = fig.subplots()
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(
        ax=ax, include_values=n <= 30, xticks_rotation="vertical" if n > 6 else "horizontal", colorbar=True)
    ax.set_title(title, fontsize="small", wrap=True)
    return fig


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sweep_figure(rows: list[dict], fields: list[str], metric: str = "val_accuracy") -> Figure:
    """One panel per swept hyperparameter: ``metric`` of every configuration against its value.
    Rates use a log axis (symlog when 0 is among the values); categories are spread on an axis."""
    fig = Figure(figsize=(4 * len(fields), 3.6), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(fields)))
    best = rows[0]
    for ax, field in zip(axes, fields):
        xs = [r.get(field) for r in rows]
        ys = [r.get(metric) for r in rows]
        if _numeric(xs):
            ax.scatter(xs, ys, s=18, alpha=0.7)
            ax.scatter([best[field]], [best[metric]], s=60, marker="*", color="tab:red", label="best")
            if field in LOG_SCALE:
                positive = [x for x in xs if x > 0]
                if len(positive) < len(xs):
                    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-8)
                else:
                    ax.set_xscale("log")
        else:
            cats = list(dict.fromkeys(str(x) for x in xs))
            pos = {c: i for i, c in enumerate(cats)}
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(xs))  # overlapping points stay visible
            ax.scatter([pos[str(x)] + j for x, j in zip(xs, jitter)], ys, s=18, alpha=0.7)
            ax.scatter([pos[str(best[field])]], [best[metric]], s=60, marker="*", color="tab:red", label="best")
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(field)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{metric.replace('_', ' ')} of {len(rows)} configurations")
    return fig


def learning_curve_figure(rows: list[dict], metric: str = "val_accuracy") -> Figure:
    """``metric`` against training-set size (mean training rows per head), one line per head family
    (architecture, with or without augmented views): at each size the best configuration of that
    family. With --cv the points are mean held-out fold accuracies with their std as error bars."""
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    families: dict[str, dict[float, dict]] = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        name = ("linear" if r.get("hidden") in (None, "0") else f"mlp {r['hidden']}") + (" + views" if r.get("views") else "")
        at = families.setdefault(name, {})
        x = r["n_train_rows"]
        if x not in at or r[metric] > at[x][metric]:
            at[x] = r
    std = metric.replace("_mean", "_std")
    for name, at in sorted(families.items()):
        xs = sorted(at)
        ys = [at[x][metric] for x in xs]
        err = [at[x].get(std) or 0.0 for x in xs] if std != metric else None
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linestyle="--" if "views" in name else "-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel(metric.replace("_", " ") + (" ± std over folds" if std != metric else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title("learning curve: best configuration per head family at each training-set size")
    return fig
