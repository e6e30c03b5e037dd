"""Turn fit-head options and results into what people read (option parsing, printed tables)."""
from __future__ import annotations

from pipeline.cliutil import int_list


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


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def leaderboard_lines(rows: list[dict], limit: int = 20) -> list[str]:
    cols = ["hidden", "dropout", "weight_decay", "l1", "optimizer", "lr", "best_epoch", "train_accuracy",
            "val_accuracy", "test_accuracy"]
    table = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows[:limit]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in leaderboard.csv")
    return lines


def fit_lines(s: dict) -> list[str]:
    p = s["params"]
    arch = "linear" if not p["hidden"] else "mlp " + "x".join(map(str, p["hidden"]))
    lines = []
    if len(s["leaderboard"]) > 1:
        lines += leaderboard_lines(s["leaderboard"]) + [""]
    lines += [
        f"best head: {arch}, {p['optimizer']} lr={p['lr']} weight_decay={p['weight_decay']} l1={p['l1']} "
        f"dropout={p['dropout']} (epoch {s['best_epoch']} of {s['epochs_run']}, {s['n_configs']} configuration(s))",
        f"train accuracy {_fmt(s['train_accuracy'])}  val accuracy {_fmt(s['val_accuracy'])}"
        + (f"  test accuracy {_fmt(s['test_accuracy'])}" if s.get("test_accuracy") is not None else ""),
        f"validation: {s['val_source']}; saved {s['run_dir']}/head.pt and metrics.json ({s['seconds']:.1f}s)",
    ]
    return lines
