"""The Python API as a contract: featcache.extract / open_cache / fit_heads / load and HeadClassifier."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import FAST_KW, invoke
from matplotlib.figure import Figure
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import featcache


def _blobs(n=90, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    X = rng.normal(size=(n, d)).astype(np.float32) + 2.5 * np.eye(3, d)[y]
    return X, y


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """240 of scikit-learn's digits as 32x32 PNGs in train/val/test folders, extracted through the API."""
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for i in range(240):
        split = "train" if i < 160 else "val" if i < 200 else "test"
        folder = root / "images" / split / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (255 - d.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(folder / f"{i:04d}.png")
    result = featcache.extract(root / "images", root / "digits.h5", workers=0, device="cpu", **FAST_KW)
    return result


def test_extract_returns_a_typed_result_and_open_cache_gives_arrays(digits_cache):
    r = digits_cache
    assert isinstance(r, featcache.ExtractResult)
    assert (r.n_images, r.extracted, r.reused, r.removed, r.skipped, r.feature_dim) == (240, 240, 0, 0, 0, 64)
    c = featcache.open_cache(r.cache)
    assert c.splits == {"test": 40, "train": 160, "val": 40}
    assert c.class_names == [str(i) for i in range(10)]
    X, y = c.arrays("train")
    assert X.shape == (160, 64) and X.dtype == np.float32 and y.shape == (160,) and y.dtype == np.int64
    assert c.paths("train")[0].startswith("train/") and len(c.paths("val")) == 40
    assert c.attrs["backbone"] == "resnet18" and c.feature_dim == 64 and c.fingerprint == r.summary["fingerprint"]
    again = featcache.extract(r.cache.parent / "images", r.cache, workers=0, device="cpu", **FAST_KW)
    assert (again.extracted, again.reused) == (0, 240)


def test_extract_rejects_unknown_options_like_any_python_function(tmp_path):
    with pytest.raises(TypeError, match="batchsize"):
        featcache.extract(tmp_path, tmp_path / "c.h5", batchsize=3)
    with pytest.raises(featcache.FeatcacheError, match="not found"):
        featcache.open_cache(tmp_path / "missing.h5")


def test_every_option_takes_a_scalar_or_a_list():
    X, y = _blobs()
    one = featcache.fit_heads((X, y), head="mlp", hidden=(16,), dropout=0.5, lr=1e-2, optimizer="adamw",
                              weight_decay=1e-4, epochs=5, plots=False)
    assert len(one.leaderboard) == 1
    row = one.leaderboard[0]
    assert (row["hidden"], row["dropout"], row["lr"], row["optimizer"]) == ("16", 0.5, 0.01, "adamw")
    many = featcache.fit_heads((X, y), head="mlp", hidden=[16, (16, 8)], dropout=[0.0, 0.5], lr=[1e-2], epochs=3)
    assert sorted((r["hidden"], r["dropout"]) for r in many.leaderboard) == [
        ("16", 0.0), ("16", 0.5), ("16,8", 0.0), ("16,8", 0.5)]
    c_path = featcache.fit_heads((X, y), head="logreg", C=[0.1, 1.0])
    assert sorted(r["C"] for r in c_path.leaderboard) == [0.1, 1.0]
    with pytest.raises(TypeError, match="learning_rate"):
        featcache.fit_heads((X, y), learning_rate=1e-2)
    with pytest.raises(featcache.FeatcacheError, match="dropout"):
        featcache.fit_heads((X, y), head="mlp", dropout=1.5)


def test_in_memory_fit_writes_nothing_and_predicts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y = _blobs()
    order = np.random.default_rng(1).permutation(len(y))  # every split gets every class
    X, y = X[order], y[order]
    labels = np.array(["cat", "dog", "eel"])[y]
    split = {"train": (X[:60], labels[:60]), "val": (X[60:75], labels[60:75]), "test": (X[75:], labels[75:])}
    res = featcache.fit_heads(split, epochs=30, lr=1e-2, device="cpu")  # exact comparisons below: one device
    assert os.listdir(tmp_path) == []  # nothing written anywhere
    assert res.class_names == ["cat", "dog", "eel"]
    assert res.metrics["n_train"] == 60 and res.metrics["n_val"] == 15 and res.metrics["n_test"] == 15
    assert res.history and res.history[-1]["epoch"] == res.metrics["epochs_run"]
    pred = res.predict(X[75:])
    assert set(pred) <= {"cat", "dog", "eel"}
    assert np.mean(pred == labels[75:]) == pytest.approx(res.metrics["test_accuracy"])
    for fig in (res.plot_curves(), res.plot_weight_norms(), res.plot_confusion()):
        assert isinstance(fig, Figure)
    with pytest.raises(featcache.FeatcacheError, match="nothing was swept"):
        res.plot_sweep()
    assert len(repr(res)) <= 1024 and "val accuracy" in repr(res)
    assert "<pre>" in res._repr_html_() and "val_accuracy" in res._repr_html_()
    frame = featcache.fit_heads(split, lr=[1e-3, 1e-2], epochs=3).leaderboard.to_pandas()
    assert list(frame["rank"]) == [1, 2] and {"lr", "val_accuracy"} <= set(frame.columns)


def test_exact_probe_plots_say_why_there_are_no_curves():
    res = featcache.fit_heads(_blobs(), head="linear", C=[0.1, 1.0])
    assert res.best.row["solver"] == "exact"
    with pytest.raises(featcache.FeatcacheError, match="plot_curves: .*not trained by epochs"):
        res.plot_curves()
    with pytest.raises(featcache.FeatcacheError, match="plot_weight_norms"):
        res.plot_weight_norms()
    assert isinstance(res.plot_sweep(), Figure) and isinstance(res.plot_confusion(), Figure)


@pytest.mark.parametrize("value", ["abc", "1e-3,1e-2", True, None])
def test_bad_option_values_name_the_python_parameter(value):
    with pytest.raises(featcache.FeatcacheError, match=r"^lr takes a float or a list of them"):
        featcache.fit_heads(_blobs(), lr=value)


def test_bad_scalar_option_values_name_the_python_parameter():
    with pytest.raises(featcache.FeatcacheError, match=r"^epochs takes an int, got 2.5"):
        featcache.fit_heads(_blobs(), epochs=2.5)
    with pytest.raises(featcache.FeatcacheError, match=r"^standardize takes a bool"):
        featcache.fit_heads(_blobs(), standardize="yes")


@pytest.mark.parametrize("kind", ["int", "str", "bool"])
def test_labels_come_back_in_the_type_they_went_in(kind, tmp_path):
    X, y = _blobs()
    if kind == "int":
        labels = y * 10 + 3
    elif kind == "str":
        labels = np.array(["cat", "dog", "eel"])[y]
    else:
        labels = y > 0  # two classes
    res = featcache.fit_heads((X, labels), head="linear", C=1.0, val_fraction=0.25)
    pred = res.predict(X)
    assert pred.dtype.kind == np.asarray(labels).dtype.kind
    assert set(pred.tolist()) <= set(labels.tolist())
    assert (pred == labels).mean() > 0.8  # a natural accuracy check means what it says
    res.save(tmp_path / "run")
    loaded = featcache.load(tmp_path / "run").predict_features(X)
    assert loaded.dtype.kind == pred.dtype.kind and (loaded == pred).all()


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in ("seconds", "output", "memory")}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def test_save_writes_exactly_what_fit_head_writes(digits_cache, tmp_path):
    cache = digits_cache.cache
    opts = dict(head="mlp", hidden=32, dropout=[0.0, 0.3], lr=1e-2, epochs=8, patience=3, device="cpu")
    res = featcache.fit_heads(cache, **opts)
    files = res.save(tmp_path / "api")
    cli = invoke("fit-head", cache, "-o", tmp_path / "cli", "--head", "mlp", "--hidden", "32", "--dropout",
                 "0,0.3", "--lr", "1e-2", "--epochs", "8", "--patience", "3", "--device", "cpu", "--json")
    assert cli.exit_code == 0, cli.stderr
    assert sorted(os.listdir(tmp_path / "api")) == sorted(os.listdir(tmp_path / "cli")) == sorted(files)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("api", "cli"))
    assert _strip_timings(a) == _strip_timings(b)
    la, lb = (json.loads((tmp_path / d / "leaderboard.json").read_text()) for d in ("api", "cli"))
    assert _strip_timings(la) == _strip_timings(lb)
    ha, hb = (torch.load(tmp_path / d / "head.pt", weights_only=True) for d in ("api", "cli"))
    assert ha["state_dict"].keys() == hb["state_dict"].keys()
    for k in ha["state_dict"]:
        torch.testing.assert_close(ha["state_dict"][k], hb["state_dict"][k], rtol=0, atol=0)
    assert _strip_timings(ha["metadata"]) == _strip_timings(hb["metadata"])
    # fit_heads(output=...) is the same as save
    featcache.fit_heads(cache, output=tmp_path / "direct", **opts)
    assert sorted(os.listdir(tmp_path / "direct")) == sorted(files)


def test_load_predicts_from_features_and_from_images(digits_cache, tmp_path):
    cache = featcache.open_cache(digits_cache.cache)
    res = featcache.fit_heads(cache, epochs=20, lr=1e-2, output=tmp_path / "run", device="cpu")
    model = featcache.load(tmp_path / "run")
    Xv, yv = cache.arrays("val")
    np.testing.assert_array_equal(model.predict_features(Xv), res.predict(Xv))
    # a head trained on a cache predicts in the label space Cache.arrays returns (class indices)
    assert (model.predict_features(Xv) == yv).mean() == pytest.approx(res.metrics["val_accuracy"])
    assert (res.predict(Xv) == yv).mean() == pytest.approx(res.metrics["val_accuracy"])
    images = [digits_cache.cache.parent / "images" / p for p in cache.paths("val")[:6]]
    rows = model.predict(images, device="cpu")
    assert [r["label"] for r in rows] == [cache.class_names[i] for i in model.predict_features(Xv[:6])]
    with pytest.raises(featcache.FeatcacheError, match="shape"):
        model.predict_features(Xv[:, :10])


def test_head_classifier_in_grid_search_and_pipelines_on_the_digits_features(digits_cache):
    X, y = featcache.open_cache(digits_cache.cache).arrays("all")
    grid = GridSearchCV(featcache.HeadClassifier(max_iter=40, batch_size=64),
                        {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 1e-2]}, cv=3).fit(X, y)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_score_ > 0.5  # 10 classes: chance is 0.1
    assert grid.best_estimator_.score(X, y) == pytest.approx(np.mean(grid.predict(X) == y))
    scores = cross_val_score(make_pipeline(StandardScaler(), featcache.HeadClassifier(
        hidden=(32,), dropout=0.2, lr=1e-2, max_iter=30, standardize=False)), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.3  # random-init stem features; chance is 0.1


def test_cache_to_pandas_has_one_row_per_image(digits_cache):
    cache = featcache.open_cache(digits_cache.cache)
    frame = cache.to_pandas()
    assert list(frame.columns) == ["path", "label", "label_index", "split"]
    assert len(frame) == sum(cache.splits.values())
    X, y = cache.arrays("val")
    val = frame[frame.split == "val"]
    assert list(val.label_index) == list(y) and list(val.path) == cache.paths("val")
    assert all(cache.class_names[i] == name for i, name in zip(val.label_index, val.label))


@pytest.mark.parametrize(("kw", "words"), [(dict(batch_size=0), r"^batch_size must be at least 1"),
                                           (dict(batch_size="64"), r"^batch_size takes an int"),
                                           (dict(max_skipped=2.0), r"^max_skipped must be a fraction")])
def test_extract_errors_name_the_python_parameter(kw, words, tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(featcache.FeatcacheError, match=words):
        featcache.extract(tmp_path / "imgs", tmp_path / "c.h5", **kw)


def test_reprs_are_short(digits_cache):
    assert len(repr(featcache.open_cache(digits_cache.cache))) <= 1024
    assert len(repr(digits_cache)) <= 1024 and "extracted 240" in repr(digits_cache)
