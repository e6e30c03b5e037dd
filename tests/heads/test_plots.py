"""PNG plots of fit-head runs: which files appear when, and that each is a real, readable image."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from synthcache import fit, write_cache

from featcache.pipeline.heads import plots

SWEEP_PNGS = {"curves.png", "weight_norm.png", "confusion.png", "sweep.png"}


def _png(path) -> tuple[int, int]:
    """Open and fully decode a PNG; return its (width, height)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("plots") / "feats.h5", sep=0.8)


def test_sweep_run_writes_all_four_plots(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--head", "mlp", "--hidden", "0,8", "--lr", "1e-2,0.1", "--dropout", "0,0.3",
            "--epochs", "6")
    pngs = {p.name for p in (tmp_path / "r").glob("*.png")}
    assert pngs == SWEEP_PNGS and SWEEP_PNGS <= set(s["files"])
    for name in pngs:
        w, h = _png(tmp_path / "r" / name)
        assert w >= 300 and h >= 300
    # one panel per swept hyperparameter (hidden, dropout, lr): the sweep figure widens with them
    assert _png(tmp_path / "r" / "sweep.png")[0] >= 3 * 400


def test_single_configuration_has_no_sweep_plot(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--epochs", "4")
    assert {p.name for p in (tmp_path / "r").glob("*.png")} == SWEEP_PNGS - {"sweep.png"}
    assert "sweep.png" not in s["files"]


def test_no_plots_flag_writes_no_pictures(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--lr", "1e-3,1e-2", "--epochs", "3", "--no-plots")
    assert list((tmp_path / "r").glob("*.png")) == []
    assert not any(f.endswith(".png") for f in s["files"])
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["files"] == s["files"]


def test_logreg_run_has_confusion_and_sweep_but_no_epoch_curves(cache, tmp_path):
    fit(cache, tmp_path / "r", "--head", "logreg", "--C", "0.01,1")
    assert {p.name for p in (tmp_path / "r").glob("*.png")} == {"confusion.png", "sweep.png"}


def _history(epochs: int, val: bool = True) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        h = {"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e, "weight_norm": 1 + 0.1 * e}
        if val:
            h.update(val_loss=1.2 / e, val_accuracy=1 - 0.6 / e)
        out.append(h)
    return out


def test_plot_functions_handle_edge_cases(tmp_path):
    # curves without a validation split; many weight-norm curves (only the first ones drawn)
    plots.training_curves(_history(5, val=False), tmp_path / "c.png", best_epoch=5)
    curves = [(f"head {i}", _history(3 + i)) for i in range(plots.MAX_NORM_CURVES + 5)]
    plots.weight_norm_curves(curves, tmp_path / "w.png")
    # 12 classes: rotated labels; a matrix with an empty class row
    cm = np.diag(np.arange(12))
    plots.confusion_plot(cm, [f"class_{i}" for i in range(12)], tmp_path / "m.png", "test split")
    # rates that include 0 (symlog axis), a categorical column, and a column with one value only
    rows = [{"index": i, "lr": lr, "l1": l1, "optimizer": opt, "val_accuracy": 0.5 + 0.01 * i}
            for i, (lr, l1, opt) in enumerate([(1e-3, 0.0, "adam"), (1e-2, 1e-4, "sgd"), (1e-1, 1e-3, "adam")])]
    plots.sweep_plot(rows, ["lr", "l1", "optimizer"], tmp_path / "s.png")
    sizes = {name: _png(tmp_path / name) for name in ("c.png", "w.png", "m.png", "s.png")}
    assert sizes["m.png"][0] > 600  # grows with the number of classes
    assert sizes["s.png"][0] >= 3 * 400 - 10
