"""Turn fit-head options and results into what people read (option parsing, printed tables)."""
from __future__ import annotations

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.options import int_list


def parse_hidden(values: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """``--hidden`` values -> architectures.

    ``512,256`` is one MLP with two hidden layers; repeating ``--hidden`` sweeps architectures.
    A width of 0 is no layer at all, so a list containing 0 (``0,512``) is read as a sweep of
    single-layer widths where 0 means the linear head.
    """
    archs: list[tuple[int, ...]] = []
    for v in values:
        sizes = int_list(v, "--hidden")
        if 0 in sizes:
            archs += [() if s == 0 else (s,) for s in sizes]
        else:
            archs.append(sizes)
    return tuple(dict.fromkeys(archs))


def parse_class_weight(value: str | None):
    """``--class-weight balanced`` or ``cat=2,dog=0.5`` -> HeadConfig's class_weight."""
    if value is None or value.strip() == "balanced":
        return None if value is None else "balanced"
    pairs = []
    for item in value.split(","):
        name, sep, weight = item.partition("=")
        try:
            pairs.append((name.strip(), float(weight)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise FeatcacheError(f"invalid value for --class-weight: expected balanced or CLASS=WEIGHT,..., got {value!r}")
    return tuple(sorted(pairs))


def parse_train_sizes(value: str | None) -> tuple[int, ...]:
    """``--train-sizes 10,50,all`` -> (10, 50, 0): images per class, 0 = every train row."""
    if value is None:
        return ()
    items = [v.strip().lower() for v in str(value).split(",")]
    return tuple(0 if v == "all" else int_list(v, "--train-sizes")[0] for v in items)


def fmt(v, col: str = "") -> str:
    """Scores with 4 decimals, seconds with 2, hyperparameters in short %g form."""
    if v is None:
        return "-"
    if not isinstance(v, float):
        return str(v)
    return f"{v:.4f}" if col.endswith(("accuracy", "loss", "f1")) else f"{v:.2f}" if col == "seconds" else f"{v:.4g}"


def table(header: list[str], rows: list[list[str]], left: tuple[str, ...] = ()) -> list[str]:
    """Columns two spaces apart: right-aligned (numbers), or left-aligned for the ``left`` names."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    just = [str.ljust if h in left else str.rjust for h in header]
    return ["  ".join(j(cell, w) for cell, w, j in zip(r, widths, just)).rstrip() for r in [header, *rows]]


def leaderboard_lines(rows: list[dict], limit: int = 20, select_by: str = "accuracy") -> list[str]:
    """The best ``limit`` configurations: swept hyperparameters, best epoch, scores (and the
    selection metric when it is not accuracy), seconds."""
    from featcache.pipeline.heads.sweep import HYPERPARAMETERS, swept

    # L-BFGS iterations (logreg, exact probe), the kept epoch (epoch-trained), or none (k-NN, centroid)
    epochs = [c for c in ("n_iter", "best_epoch") if rows and c in rows[0]][:1]
    shown = swept(rows) or [c for c in HYPERPARAMETERS if rows and c in rows[0] and c != "layers"][-1:]
    chosen = () if select_by == "accuracy" else (f"val_{select_by}",)
    scores = [c for c in ("cv_accuracy_mean", "cv_accuracy_std", "train_accuracy", "val_accuracy", *chosen, "val_loss",
                          "test_accuracy") if any(r.get(c) is not None for r in rows)]
    extra = [c for c in ("train_size", "views") if len({str(r.get(c)) for r in rows}) > 1]
    extra += ["status"] if any(r.get("status") == "failed" for r in rows) else []
    cols = ["rank", *shown, *extra, *epochs, *scores, "seconds"]
    lines = table(cols, [[fmt(r.get(c), c) for c in cols] for r in rows[:limit]])
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in leaderboard.csv")
    return lines


def _describe(s: dict) -> str:
    from featcache.pipeline.heads import kinds

    return kinds.get(s["winner_kind"]).describe(s["params"])


def per_class_lines(split: str, report: dict) -> list[str]:
    """A per-class table (precision, recall, F1, support) from classification_report's dict."""
    names = [k for k, v in report.items() if isinstance(v, dict) and k not in ("macro avg", "weighted avg")]
    rows = [[n, *(fmt(float(report[n][m]), "accuracy") for m in ("precision", "recall", "f1-score")),
             str(int(report[n]["support"]))] for n in [*names, "macro avg"]]
    return [f"{split} per class:", *("  " + ln for ln in table(["class", "precision", "recall", "f1", "support"], rows,
                                                             left=("class",)))]


def fit_lines(s: dict) -> list[str]:
    """Human summary of a fit-head run: leaderboard (when swept), winner, scores, files."""
    lines = []
    if len(s["leaderboard"]) > 1:
        lines += leaderboard_lines(s["leaderboard"], select_by=s["config"].get("select_by", "accuracy")) + [""]
    when = f"epoch {s['best_epoch']} of {s['epochs_run']}, " if s.get("best_epoch") is not None else ""
    lines += [
        f"best head: {_describe(s)} ({when}{s['n_configs']} configuration(s), {s['search']} search)",
        f"train accuracy {fmt(s['train_accuracy'], 'accuracy')}  val accuracy {fmt(s['val_accuracy'], 'accuracy')}"
        + (f"  test accuracy {fmt(s.get('test_accuracy_before_refit', s.get('test_accuracy')), 'accuracy')}"
           if s.get("test_accuracy") is not None else ""),
    ]
    if s.get("refit"):
        r = s["refit"]
        lines.append(f"refit on train+val ({r['n_rows']} rows" + (f", {r['epochs']} epochs" if r["epochs"] else "")
                     + f"): train+val accuracy {fmt(r['train_val_accuracy'], 'accuracy')}"
                     + (f"  test accuracy {fmt(r['test_accuracy'], 'accuracy')}" if r["test_accuracy"] is not None else ""))
    lines.append(f"validation: {s['val_source']}; saved {s['run_dir']}/: {', '.join(s['files'])} ({s['seconds']:.1f}s)")
    return lines
