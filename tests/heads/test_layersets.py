"""fit-head --layers: layer sets of a multi-layer cache as a swept option (no re-extraction)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.layersets import parse_layer_sets

BACKBONE = ["--backbone", "timm:resnet18@64", "--weights", "none", "--workers", "0"]


@pytest.fixture(scope="module")
def multi_cache(tmp_path_factory, small_tree_ro):
    out = tmp_path_factory.mktemp("multi") / "multi.h5"
    res = invoke("extract", small_tree_ro, "-o", out, *BACKBONE, "--layer", "layer2,layer4,pre_logits")
    assert res.exit_code == 0, res.stderr
    return out


def _features(path):
    with h5py.File(path) as f:
        return f["features"][:], json.loads(f.attrs["layers"]), f.attrs["fingerprint"]


def test_layers_sweep_rows_columns_and_predictions(tmp_path, multi_cache):
    run = tmp_path / "run"
    res = invoke("fit-head", multi_cache, "-o", run, "--epochs", "3", "--no-plots", "--json",
                 "--layers", "layer4", "--layers", "layer4,layer2", "--layers", "layer2,layer4,pre_logits")
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert sorted(r["layers"] for r in s["leaderboard"]) == ["layer2,layer4", "layer2,layer4,pre_logits", "layer4"]
    X, layers, fp = _features(multi_cache)
    head = torch.load(run / "head.pt", weights_only=True)["metadata"]
    win = s["leaderboard"][0]["layers"]
    assert head["layers"] == win and s["layers"] == win
    wanted = [r for r in layers if r["name"] in win.split(",")]
    cols = np.concatenate([np.arange(r["start"], r["stop"]) for r in wanted])
    assert head["columns"] == cols.tolist() and head["in_dim"] == len(cols) and head["input_dim"] == X.shape[1]
    assert head["cache_fingerprint"] == fp  # --layers does not touch the cache's fingerprint
    # the saved model reads full cache rows and uses exactly the trained columns
    import featcache
    from featcache.pipeline.heads.headio import load_head

    model = featcache.load(run)
    h, meta = load_head(run)
    std = meta["standardize"]
    expected = torch.softmax(h(torch.as_tensor((X[:, cols] - std["mean"]) / np.asarray(std["scale"]),
                                               dtype=torch.float32)), 1).detach().numpy()
    np.testing.assert_allclose(model.predict_proba_features(X), expected, rtol=1e-4, atol=1e-6)
    ev = json.loads(invoke("evaluate", run, multi_cache, "--json").stdout)
    assert ev["test_accuracy"] == pytest.approx(s["test_accuracy"])


def test_standardisation_statistics_are_per_layer_set(multi_cache):
    import featcache

    X, layers, _ = _features(multi_cache)
    cache = featcache.open_cache(multi_cache)
    for names, (lo, hi) in (("layer2", (0, 128)), ("layer4", (128, 640))):
        r = featcache.fit_heads(cache, layers=names, epochs=2)
        train = np.flatnonzero(np.asarray(cache.features.split) == "train")
        np.testing.assert_allclose(r.data.mean, X[train, lo:hi].mean(0), rtol=1e-4, atol=1e-5)
        assert r.predict_proba(X).shape == (len(X), 3)  # full-width rows in, the set's columns used


def test_fit_heads_api_takes_the_same_sets():
    assert parse_layer_sets("b,c") == (("b", "c"),)
    assert parse_layer_sets(["c", "b,c", ["c"]]) == (("c",), ("b", "c"))
    with pytest.raises(FeatcacheError, match="more than once"):
        parse_layer_sets(["b,b"])


def test_unknown_layer_and_cache_without_layers_are_one_line(tmp_path, multi_cache, small_tree_ro):
    res = invoke("fit-head", multi_cache, "-o", tmp_path / "r", "--layers", "layer3")
    assert_one_line_error(res, "no layer 'layer3'", "layer2, layer4, pre_logits")
    old = tmp_path / "old.h5"
    assert invoke("extract", small_tree_ro, "-o", old, *BACKBONE, "--layer", "layer1").exit_code == 0
    with h5py.File(old, "a") as f:  # as a cache written before layers were recorded
        del f.attrs["layers"]
    assert_one_line_error(invoke("fit-head", old, "-o", tmp_path / "r2", "--layers", "layer1"), "records no layers")
