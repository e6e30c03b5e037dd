"""predict/evaluate: a saved head + the rebuilt backbone reproduce the cached-feature results."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, assert_one_line_error, invoke


def _fit(cache: Path, out: Path, *extra) -> dict:
    res = invoke("fit-head", cache, "-o", out, "--epochs", "30", "--device", "cpu", "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def run_dir(split_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    _fit(split_cache, out)
    return out


def test_predict_reproduces_val_accuracy_exactly(run_dir, split_cache, split_tree_ro):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    res = invoke("predict", run_dir, split_tree_ro / "val", "--top-k", "2", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    preds = res.json()["predictions"]
    assert len(preds) == metrics["n_val"] and all("error" not in p for p in preds)
    acc = np.mean([p["label"] == Path(p["path"]).parent.name for p in preds])
    assert acc == metrics["val_accuracy"]
    # and image by image: the live path gives the cached-feature predictions
    from featcache.cache.store import read_cache
    from featcache.pipeline.heads.headio import StandardizedHead, load_head

    head, meta = load_head(run_dir)
    cache = read_cache(split_cache)
    model = StandardizedHead(head, meta["standardize"]["mean"], meta["standardize"]["scale"])
    with torch.no_grad():
        cached = torch.softmax(model(torch.from_numpy(cache.features)), 1).numpy()
    row = {p: i for i, p in enumerate(cache.paths)}
    for p in preds:
        rel = Path(p["path"]).relative_to(split_tree_ro).as_posix()
        assert p["top"][0]["probability"] == pytest.approx(float(cached[row[rel]].max()), abs=1e-5)
        assert p["label"] == cache.class_names[int(cached[row[rel]].argmax())]


def test_predict_top_k_csv_and_bad_files(run_dir, split_tree_ro, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = next((split_tree_ro / "test" / "red").iterdir())
    out_csv = tmp_path / "p.csv"
    res = invoke("predict", run_dir, good, bad, "--top-k", "5", "--csv", out_csv, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["path"] for r in rows] == [str(good), str(bad)]
    assert rows[1]["error"] and not rows[1]["class_1"]  # the CSV has no label column (it repeated class_1)
    probs = [float(rows[0][f"prob_{j}"]) for j in (1, 2, 3)]  # top-k is capped at the 3 classes
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert "prob_4" not in rows[0]
    assert "ERROR" in res.stdout and "1 unreadable" in res.stdout


def test_predict_bad_inputs_are_one_line_errors(run_dir, tmp_path):
    assert_one_line_error(invoke("predict", run_dir, tmp_path / "missing.png"), "no such file")
    assert_one_line_error(invoke("predict", tmp_path, tmp_path), "neither")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("predict", run_dir, tmp_path / "empty"), "no images")


def test_predict_float16_cache_rounds_like_the_cache(split_tree_ro, tmp_path):
    cache = tmp_path / "f16.h5"
    # extracted on the CPU like the prediction below: equality holds within one device and precision
    assert invoke("extract", split_tree_ro, "-o", cache, *FAST, "--dtype", "float16", "--workers", "0",
                  "--device", "cpu").exit_code == 0
    metrics = _fit(cache, tmp_path / "run16")
    res = invoke("predict", tmp_path / "run16", split_tree_ro / "val", "--json", "--device", "cpu")
    preds = res.json()["predictions"]
    assert np.mean([p["label"] == Path(p["path"]).parent.name for p in preds]) == metrics["val_accuracy"]


def test_evaluate_matches_and_refuses_mismatches(run_dir, split_cache, flat_cache, tmp_path):
    res = invoke("evaluate", run_dir, split_cache, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert res.json()["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert res.json()["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    # flat_cache: 64-d FAST features -> dimension mismatch
    assert_one_line_error(invoke("evaluate", run_dir, flat_cache), "expects 512-d")


def test_evaluate_refuses_other_fingerprint_or_classes(run_dir, split_tree_ro, split_cache, tmp_path):
    other = tmp_path / "seed1.h5"  # same architecture and dim, different random init -> other fingerprint
    assert invoke("extract", split_tree_ro, "-o", other, "--backbone", "resnet18", "--weights", "none",
                  "--seed", "1", "--workers", "0", "--device", "cpu").exit_code == 0
    assert_one_line_error(invoke("evaluate", run_dir, other), "fingerprint")
    import shutil

    two = tmp_path / "two"
    for split in ("train", "val"):
        for cls in ("red", "blue"):
            shutil.copytree(split_tree_ro / split / cls, two / split / cls)
    cache2 = tmp_path / "two.h5"
    assert invoke("extract", two, "-o", cache2, "--backbone", "resnet18", "--weights", "none",
                  "--workers", "0", "--device", "cpu").exit_code == 0
    assert_one_line_error(invoke("evaluate", run_dir, cache2), "classes")
