"""``--head logreg``: scikit-learn's LogisticRegression on fit-head's split, saved as a linear head.pt."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from margins import assert_predictions_agree
from sklearn.linear_model import LogisticRegression
from synthcache import fit, run_cli, write_cache

from featcache.cache.store import read_cache
from featcache.pipeline.heads.data import prepare
from featcache.pipeline.heads.headio import load_head
from featcache.pipeline.heads.logreg import ABSENT_CLASS_BIAS, to_linear


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("logreg") / "feats.h5", sep=0.5, dim=12)


def _prepared(cache_path, val_fraction=0.2, seed=0):
    return prepare(read_cache(cache_path), val_fraction, seed, True, torch.device("cpu"))


def test_logreg_head_reproduces_sklearn_on_the_same_split(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--head", "logreg", "--C", "0.3")
    data = _prepared(cache)
    Xtr, ytr = (t.numpy() for t in data.split("train"))
    Xv, yv = (t.numpy() for t in data.split("val"))
    ref = LogisticRegression(C=0.3, max_iter=1000).fit(Xtr, ytr)
    head, meta = load_head(tmp_path / "r" / "head.pt")
    with torch.no_grad():
        proba = torch.softmax(head(torch.from_numpy(Xv)), 1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(Xv), atol=1e-5)
    assert math.isclose(s["val_accuracy"], ref.score(Xv, yv), abs_tol=1e-9)
    assert s["head"] == "logreg" and s["params"] == {"C": 0.3} and meta["hidden"] == [] and meta["head_type"] == "logreg"
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["best_epoch"] is None and metrics["history"] == []  # no epochs: L-BFGS iterations


def test_logreg_c_grid_fills_the_leaderboard(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--head", "logreg", "--C", "0.001,0.1,10")
    rows = json.loads((tmp_path / "r" / "leaderboard.json").read_text())
    assert sorted(r["C"] for r in rows) == [0.001, 0.1, 10] and s["n_configs"] == 3
    for r in rows:
        assert r["head"] == "logreg" and r["n_iter"] >= 1 and isinstance(r["converged"], bool)
        assert 0 <= r["val_accuracy"] <= 1 and r["test_accuracy"] is not None and r["seconds"] >= 0
    keys = [(-r["val_accuracy"], r["val_loss"]) for r in rows]
    assert keys == sorted(keys) and s["params"]["C"] == rows[0]["C"]
    # stronger regularisation (smaller C) gives a smaller weight norm
    norms = {}
    for c in (0.001, 10):
        head, _ = load_head(fit(cache, tmp_path / f"c{c}", "--head", "logreg", "--C", c, "--no-plots")["run_dir"])
        norms[c] = head[0].weight.norm().item()
    assert norms[0.001] < norms[10]


def test_binary_model_converts_to_two_logits_with_the_same_probabilities():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=80) > 0).astype(np.int64)
    ref = LogisticRegression().fit(X, y)
    head = to_linear(ref, 5, 2)
    with torch.no_grad():
        proba = torch.softmax(head(torch.from_numpy(X)), 1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(X), atol=1e-5)


def test_class_missing_from_training_rows_is_never_predicted():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 2, 3], 30)  # class 1 has no training rows
    X = (rng.normal(size=(90, 4)) + y[:, None]).astype(np.float32)
    ref = LogisticRegression().fit(X, y)
    head = to_linear(ref, 4, 4)
    assert head[0].bias[1].item() == ABSENT_CLASS_BIAS and torch.all(head[0].weight[1] == 0)
    with torch.no_grad():
        pred = head(torch.from_numpy(X)).argmax(1).numpy()
    assert_predictions_agree(pred, ref.predict(X), ref.decision_function(X))


def test_logreg_refit_uses_train_and_val(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--head", "logreg", "--C", "0.1,1", "--refit", "--no-plots")
    assert s["refit"]["n_rows"] == s["n_train"] + s["n_val"] and s["refit"]["epochs"] is None
    data = _prepared(cache)
    rows = np.sort(np.concatenate([data.rows["train"], data.rows["val"]]))
    ref = LogisticRegression(C=s["params"]["C"], max_iter=1000).fit(data.X[rows].numpy(), data.y[rows].numpy())
    Xt, yt = (t.numpy() for t in data.split("test"))
    assert math.isclose(s["test_accuracy"], ref.score(Xt, yt), abs_tol=1e-9)


def test_logreg_random_search_draws_c_in_range(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--head", "logreg", "--search", "random", "--trials", "4", "--C", "1e-3,1e1",
            "--no-plots")
    assert 1 <= s["n_configs"] <= 4 and all(1e-3 <= r["C"] <= 10 for r in s["leaderboard"])


def test_non_positive_c_is_a_one_line_error(cache, tmp_path):
    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "r", "--head", "logreg", "--C", "0.1,0")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and out == "" and len(lines) == 1 and "--C" in lines[0]
