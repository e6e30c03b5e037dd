"""Head kinds as plug-ins: the registry's contract, and the k-NN and nearest-centroid kinds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import featcache
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads import kinds
from featcache.pipeline.heads.headio import load_head


def _blobs(n_per_class=60, classes=4, dim=12, sep=1.6, seed=0):
    """Overlapping Gaussian blobs, float32 features, integer labels (neighbours of other classes exist)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, sep, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    X = (centres[y] + rng.normal(0.0, 1.0, (len(y), dim))).astype(np.float32)
    p = rng.permutation(len(y))
    return X[p], y[p]


@pytest.fixture(scope="module")
def splits():
    X, y = _blobs()
    return {"train": (X[:160], y[:160]), "val": (X[160:200], y[160:200]), "test": (X[200:], y[200:])}


def test_registry_lists_every_kind_and_refuses_unknown_ones():
    assert {"linear", "mlp", "logreg", "knn", "centroid"} <= set(kinds.names())
    with pytest.raises(FeatcacheError, match="unknown head 'nope'.*knn"):
        kinds.get("nope")
    with pytest.raises(FeatcacheError, match="unknown head"):
        featcache.fit_heads(_blobs()[:2], head="nope")


@pytest.mark.parametrize("name", ["linear", "mlp", "logreg", "knn", "centroid"])
def test_every_kind_saves_loads_and_predicts_what_it_predicted(name, splits, tmp_path):
    """The kind's architecture metadata rebuilds its module; the loaded head scores as in memory."""
    opts = {"epochs": 3} if name == "mlp" else {}
    s = featcache.fit_heads(splits, head=name, **opts)
    s.save(tmp_path / "run")
    head, meta = load_head(tmp_path / "run")
    assert meta["kind"] == s.best.row["head"]
    Xv = splits["val"][0]
    model = featcache.load(tmp_path / "run")
    assert list(model.predict_features(Xv)) == list(s.predict(Xv))
    from featcache.pipeline.heads.headio import StandardizedHead

    with torch.no_grad():
        loaded = torch.softmax(StandardizedHead.from_metadata(head, meta)(torch.from_numpy(Xv)), 1).numpy()
    np.testing.assert_allclose(loaded, s.predict_proba(Xv), atol=1e-5)
    label = kinds.get(meta["kind"]).label(s.best.row)
    assert isinstance(label, str) and label


def test_knn_sweeps_every_k_from_one_neighbour_search(splits, monkeypatch):
    from featcache.pipeline.heads import similarity as sim

    calls = []
    real = sim.neighbours
    monkeypatch.setattr(sim, "neighbours", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    s = featcache.fit_heads(splits, head="knn", k=[1, 5, 20], knn_voting=["temperature", "majority"])
    assert sorted((r["k"], r["knn_voting"]) for r in s.leaderboard) == sorted(
        (k, v) for k in (1, 5, 20) for v in ("temperature", "majority"))
    assert calls == [20, 20, 20]  # train (leave-one-out), val, test: one search each, at the largest k


def test_knn_majority_vote_equals_scikit_learn_cosine_knn(splits):
    (Xt, yt), (Xv, yv) = splits["train"], splits["val"]
    s = featcache.fit_heads(splits, head="knn", k=[1, 5, 15], knn_voting="majority", standardize=False)
    for k in (1, 5, 15):
        ours = next(c for c in s.candidates if c.row["k"] == k)
        with torch.no_grad():
            pred = ours.head(torch.from_numpy(Xv)).argmax(1).numpy()
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(Xt, yt)
        assert np.mean(pred == ref.predict(Xv)) >= 0.975  # ties between equal vote counts may break apart
        assert ours.row["val_accuracy"] == pytest.approx(np.mean(pred == yv))


def test_knn_scores_training_rows_leave_one_out(splits):
    """k=1 on the bank itself would be 100 % train accuracy; leave-one-out is what a user can read."""
    s = featcache.fit_heads(splits, head="knn", k=1, standardize=False)
    Xt, yt = splits["train"]
    Xn = Xt / np.linalg.norm(Xt, axis=1, keepdims=True)
    sims = Xn @ Xn.T
    np.fill_diagonal(sims, -np.inf)
    loo = np.mean(yt[sims.argmax(1)] == yt)
    assert s.leaderboard[0]["train_accuracy"] == pytest.approx(loo)
    assert loo < 1.0


def test_knn_bank_keeps_a_float16_cache_dtype(tmp_path):
    import h5py
    from synthcache import write_cache

    path = write_cache(tmp_path / "c.h5", {"train": 20, "val": 5, "test": 5})
    with h5py.File(path, "r+") as f:  # the same rows stored as float16
        feats = f["features"][...]
        del f["features"]
        f.create_dataset("features", data=feats.astype(np.float16))
        f.attrs["dtype"] = "float16"
    s = featcache.fit_heads(path, head="knn", k=3)
    assert s.head.bank.dtype == torch.float16 and s.head.bank.shape == (60, 16)


def test_centroid_is_the_nearest_normalised_class_mean(splits):
    s = featcache.fit_heads(splits, head="centroid", standardize=False)
    (Xt, yt), (Xv, _) = splits["train"], splits["val"]
    Xn = Xt / np.linalg.norm(Xt, axis=1, keepdims=True)
    cents = np.stack([Xn[yt == c].mean(0) for c in range(4)])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    Vn = Xv / np.linalg.norm(Xv, axis=1, keepdims=True)
    np.testing.assert_array_equal(s.predict(Xv).astype(int), (Vn @ cents.T).argmax(1))


def test_knn_and_centroid_refuse_cv_and_options_they_cannot_use(splits):
    for head in ("knn", "centroid"):
        with pytest.raises(FeatcacheError, match="trains nothing"):
            featcache.fit_heads(splits, head=head, cv=3)
    with pytest.raises(FeatcacheError, match="invalid value: k 0"):
        featcache.fit_heads(splits, head="knn", k=[0, 5])
    with pytest.raises(FeatcacheError, match="knn_voting 'nope'"):
        featcache.fit_heads(splits, head="knn", knn_voting="nope")


def test_knn_refit_uses_train_and_val_rows(splits):
    s = featcache.fit_heads(splits, head="knn", k=5, refit=True)
    assert s.head.bank.shape[0] == 200 and s.refit["n_rows"] == 200


def test_knn_run_predicts_images_and_evaluates_its_cache(split_cache, split_tree_ro, tmp_path):
    """A k-NN run on a real cache: predict on image files (the backbone rebuilt) agrees with the cache's rows."""
    from featcache.pipeline.heads.evaluate import run_evaluate

    run = tmp_path / "knn"
    s = featcache.fit_heads(split_cache, head="knn", k=[1, 3], output=run)
    ev = run_evaluate(str(run), str(split_cache), device="cpu")
    assert ev["val_accuracy"] == pytest.approx(s.leaderboard[0]["val_accuracy"])
    images = sorted(str(p) for p in (split_tree_ro / "val").rglob("*.png"))[:3]
    preds = featcache.load(run).predict(images, device="cpu")
    assert len(preds) == 3 and all(p["top"][0]["class"] in s.class_names for p in preds)


# ------------------------------------------------------------------ imbalance: class weights, balanced metrics
def _imbalanced(seed=0):
    """900 rows of class 0 and 60 of each of classes 1, 2, overlapping: accuracy rewards ignoring the small ones."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(900, int), np.ones(60, int), np.full(60, 2)]
    X = (rng.normal(0, 1, (len(y), 6)) + 0.9 * np.eye(3, 6)[y]).astype(np.float32)
    p = rng.permutation(len(y))
    X, y = X[p], y[p]
    return {"train": (X[:700], y[:700]), "val": (X[700:860], y[700:860]), "test": (X[860:], y[860:])}


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_balanced_class_weight_raises_balanced_accuracy(head):
    data = _imbalanced()
    plain = featcache.fit_heads(data, head=head, C=1.0)
    balanced = featcache.fit_heads(data, head=head, C=1.0, class_weight="balanced")
    assert balanced.metrics["val_balanced_accuracy"] > plain.metrics["val_balanced_accuracy"] + 0.05
    assert balanced.metrics["config"]["class_weight"] == "balanced"


def test_class_weight_pairs_equal_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    data = _imbalanced()
    w = compute_class_weight("balanced", classes=np.arange(3), y=data["train"][1])
    a = featcache.fit_heads(data, head="linear", C=1.0, class_weight="balanced")
    b = featcache.fit_heads(data, head="linear", C=1.0, class_weight={c: float(w[c]) for c in range(3)})
    torch.testing.assert_close(a.head[0].weight, b.head[0].weight, atol=1e-4, rtol=1e-3)


def test_metrics_carry_balanced_scores_and_a_per_class_report(tmp_path):
    import json

    s = featcache.fit_heads(_imbalanced(), head="linear", C=1.0, output=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    report = m["val_per_class"]
    assert set(report) >= {"0", "1", "2", "macro avg", "weighted avg"}
    assert report["1"]["support"] == int((_imbalanced()["val"][1] == 1).sum())
    recalls = [report[c]["recall"] for c in ("0", "1", "2")]
    assert m["val_balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["test_macro_f1"] == pytest.approx(m["test_per_class"]["macro avg"]["f1-score"])
    row = s.leaderboard[0]
    assert {"val_balanced_accuracy", "val_macro_f1", "test_balanced_accuracy"} <= set(row)


def test_select_by_balanced_accuracy_ranks_by_it():
    s = featcache.fit_heads(_imbalanced(), head="linear", C=[1e-4, 1e-3, 1e-2, 1.0], select_by="balanced_accuracy")
    vals = [r["val_balanced_accuracy"] for r in s.leaderboard]
    assert vals == sorted(vals, reverse=True)
    with pytest.raises(FeatcacheError, match="select_by 'nope'"):
        featcache.fit_heads(_imbalanced(), select_by="nope")


def test_class_weight_is_refused_where_it_cannot_apply():
    with pytest.raises(FeatcacheError, match="trains nothing to weight"):
        featcache.fit_heads(_imbalanced(), head="knn", class_weight="balanced")
    with pytest.raises(FeatcacheError, match="class 'zebra'"):
        featcache.fit_heads(_imbalanced(), head="linear", class_weight={"zebra": 2.0})
    with pytest.raises(FeatcacheError, match="^class_weight takes"):
        featcache.fit_heads(_imbalanced(), head="linear", class_weight=3)


# ------------------------------------------------------------------ model selection for the exact probe
def test_exact_probe_cv_matches_scikit_learns_pipeline_per_c():
    """cv=5 on the default linear head: folds x C in one stack, each fold standardised on its own rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = _imbalanced()
    X, y = data["train"]
    cs = [0.01, 0.1, 1.0]
    s = featcache.fit_heads(data, head="linear", C=cs, cv=5)
    assert all(r["solver"] == "exact" and r["cv_folds"] == 5 for r in s.leaderboard)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for r in s.leaderboard:
        ref = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=r["C"], max_iter=1000)), X, y,
                              cv=folds).mean()
        assert abs(r["cv_accuracy_mean"] - ref) <= 0.01, (r["C"], r["cv_accuracy_mean"], ref)
    best = s.leaderboard[0]  # refitted on every train row and scored on the splits
    assert best["refit_rows"] == 700 and best["val_accuracy"] is not None
    assert s.metrics["cv"]["cv_folds"] == 5


def test_exact_probe_learning_curve_trains_each_size_as_a_row_weight():
    s = featcache.fit_heads(_imbalanced(), head="linear", C=[0.1, 1.0], train_sizes=[10, 30])
    sizes = {(r["train_size"], r["C"]) for r in s.leaderboard}
    assert sizes == {(n, c) for n in (10, 30, "all") for c in (0.1, 1.0)}
    assert s.leaderboard[0]["train_size"] == "all"  # the saved head is trained on every train row
    small = [r for r in s.leaderboard if r["train_size"] == 10]
    assert all(r["n_train_rows"] == 30 for r in small)  # 10 per class, 3 classes
