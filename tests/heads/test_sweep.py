"""fit-head sweeps: grid and random search, leaderboard files, batched == one at a time, refit."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from synthcache import fit, run_cli, write_cache

from featcache.pipeline.config import HeadConfig
from featcache.pipeline.heads.headio import StandardizedHead, load_head
from featcache.pipeline.heads.sweep import c_values, expand, sample
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many

HYPER = ("head", "hidden", "dropout", "batchnorm", "weight_decay", "l1", "optimizer", "lr", "momentum", "seed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # Overlapping classes (sep 0.6 in 16-d): accuracies below 1, so rankings are not all ties.
    return write_cache(tmp_path_factory.mktemp("sweep") / "feats.h5", sep=0.6)


@pytest.fixture(scope="module")
def grid_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "run"
    s = fit(cache, out, "--lr", "1e-2,0.3", "--weight-decay", "0,1e-3", "--l1", "0,1e-3", "--epochs", "15",
            "--patience", "2", "--batch-size", "32", "--no-plots")
    return out, s


def _cfg(**kw) -> HeadConfig:
    return HeadConfig(cache="-", output="-", **kw)


def test_grid_has_every_distinct_combination_once():
    cfg = _cfg(head="mlp", hidden=((), (16,)), dropout=(0.0, 0.5), lr=(1e-3, 1e-2), optimizer=("adam", "sgd"),
               momentum=(0.5, 0.9))
    params = expand(cfg)
    # linear: dropout is moot, Adam ignores momentum -> (1 + 2) per lr; mlp 16: x 2 dropouts
    assert len(params) == 2 * 3 + 2 * 2 * 3 == len(set(params))
    assert all(p.dropout == 0 for p in params if not p.hidden)
    assert all(p.momentum == 0 for p in params if p.optimizer == "adam")


def test_random_search_samples_log_uniform_rates_and_uniform_dropout():
    cfg = _cfg(head="mlp", hidden=((), (32,)), search="random", trials=400, lr=(1e-4, 1e-1),
               weight_decay=(0.0, 1e-2), dropout=(0.0, 0.5), optimizer=("adam", "sgd"), seed=3)
    params = sample(cfg)
    assert 350 <= len(params) <= 400  # duplicates removed, rounding to 3 digits rarely collides
    lrs = np.array([p.lr for p in params])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1
    # log-uniform over 3 decades: a third of the draws below 1e-3 (a uniform draw would give ~1%)
    assert 0.25 < np.mean(lrs < 1e-3) < 0.42
    wds = np.array([p.weight_decay for p in params])
    assert 0.35 < np.mean(wds == 0) < 0.65  # 0 in the list: drawn with probability 1/len
    assert wds[wds > 0].min() >= 1e-2 and wds.max() <= 1e-2  # the only positive value given
    drops = np.array([p.dropout for p in params if p.hidden])
    assert drops.min() >= 0 and drops.max() <= 0.5 and 0.2 < drops.mean() < 0.3
    assert {p.optimizer for p in params} == {"adam", "sgd"} and {p.hidden for p in params} == {(), (32,)}
    assert sample(cfg) == params  # reproducible from --seed
    assert sample(dataclasses.replace(cfg, seed=4)) != params


def test_random_search_over_logreg_c_is_log_uniform_within_range():
    cs = c_values(_cfg(head="logreg", search="random", trials=50, C=(1e-4, 1e2)))
    assert 40 <= len(cs) <= 50 and min(cs) >= 1e-4 and max(cs) <= 1e2
    assert 0.2 < np.mean(np.array(cs) < 1e-2) < 0.55  # 2 of 6 decades
    assert c_values(_cfg(head="logreg", C=(0.1, 1.0, 0.1))) == [0.1, 1.0]  # grid: as given, once each


def test_grid_run_writes_leaderboard_sorted_by_val_accuracy(grid_run):
    out, s = grid_run
    rows = json.loads((out / "leaderboard.json").read_text())
    assert len(rows) == 8 == s["n_configs"]
    assert [r["rank"] for r in rows] == list(range(1, 9))
    keys = [(-r["val_accuracy"], r["val_loss"]) for r in rows]
    assert keys == sorted(keys)
    assert {(r["lr"], r["weight_decay"], r["l1"]) for r in rows} == {
        (lr, wd, l1) for lr in (1e-2, 0.3) for wd in (0, 1e-3) for l1 in (0, 1e-3)}
    with open(out / "leaderboard.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8
    for col in (*HYPER, "best_epoch", "epochs_run", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "test_loss", "test_accuracy", "seconds"):
        assert col in table[0], col
    assert float(table[0]["val_accuracy"]) == rows[0]["val_accuracy"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_accuracy"] == rows[0]["val_accuracy"] and metrics["best_epoch"] == rows[0]["best_epoch"]
    assert metrics["params"]["lr"] == rows[0]["lr"] and len(metrics["history"]) == rows[0]["epochs_run"]
    # every configuration keeps its own early stopping: the 30x larger rate stops earlier
    assert len({r["epochs_run"] for r in rows}) > 1
    assert all(1 <= r["best_epoch"] <= r["epochs_run"] for r in rows)


def test_printed_table_lists_swept_columns_best_first(cache, tmp_path):
    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "r", "--lr", "1e-3,3e-2", "--epochs", "5",
                             "--device", "cpu", "--no-plots")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["rank", "lr"] and "val_accuracy" in header and "test_accuracy" in header
    assert lines[1].split()[0] == "1" and lines[2].split()[0] == "2"
    assert any(ln.startswith("best head: linear") for ln in lines)


def test_batched_sweep_rows_equal_separate_single_config_runs(cache, tmp_path):
    """The stacked trainer's promise at the CLI level: without dropout, each leaderboard row equals
    the row of a fit-head run given only that configuration (same seed, split and data order)."""
    sweep = fit(cache, tmp_path / "sweep", "--head", "mlp", "--hidden", "0,8", "--dropout", "0", "--lr", "1e-2,0.3",
                "--weight-decay", "0,1e-3", "--optimizer", "adam,sgd", "--l1", "0,1e-4", "--epochs", "12",
                "--patience", "2", "--batch-size", "32", "--seed", "5", "--no-plots")["leaderboard"]
    assert len(sweep) == 2 * 2 * 2 * 2 * 2
    assert len({r["epochs_run"] for r in sweep}) > 1  # some heads stop early and leave the stack
    for r in sweep:
        alone = fit(cache, tmp_path / f"alone{r['index']}", "--head", "mlp", "--hidden", r["hidden"], "--dropout", "0",
                    "--lr", r["lr"], "--weight-decay", r["weight_decay"], "--optimizer", r["optimizer"], "--l1", r["l1"],
                    "--epochs", "12", "--patience", "2",
                    "--batch-size", "32", "--seed", "5", "--no-plots")
        row = {**alone["params"], "hidden": ",".join(map(str, alone["params"]["hidden"])) or "0",
               "best_epoch": alone["best_epoch"],
               "epochs_run": alone["epochs_run"], **{k: alone.get(k) for k in r if k.endswith(("_loss", "_accuracy"))}}
        for k in (*HYPER[1:], "best_epoch", "epochs_run"):
            assert row[k] == r[k], (k, r)
        for k in r:
            if k.endswith(("_loss", "_accuracy")):
                assert math.isclose(row[k], r[k], rel_tol=1e-4, abs_tol=1e-5), (k, row[k], r[k], r)


def _blobs(n=240, d=12, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    X = torch.randn(c, d, generator=g)[y] * 0.8 + torch.randn(n, d, generator=g)
    return X[: n * 3 // 4], y[: n * 3 // 4], X[n * 3 // 4:], y[n * 3 // 4:]


@pytest.mark.parametrize("hidden,batchnorm,optimizer", [((), False, "adamw"), ((8,), False, "adam"),
                                                        ((8, 4), True, "sgd"), ((8,), True, "adam")])
def test_train_many_stacked_equals_alone_while_heads_drop_out(hidden, batchnorm, optimizer):
    X, y, Xv, yv = _blobs()
    params = [HeadParams(hidden=hidden, batchnorm=batchnorm, optimizer=optimizer, lr=lr, weight_decay=wd, l1=l1,
                         momentum=0.9 if optimizer == "sgd" else 0.0, seed=2)
              for lr in (3e-3, 0.3) for wd in (0.0, 1e-2) for l1 in (0.0, 1e-3)]
    settings = TrainSettings(epochs=25, batch_size=32, patience=2)
    stacked = train_many(params, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    assert len({len(r.history) for r in stacked}) > 1  # heads stopped at different epochs
    for p, s in zip(params, stacked):
        a = train_many([p], data=TrainData(X, y, 3, Xv, yv), settings=settings)[0]
        assert (a.best_epoch, len(a.history)) == (s.best_epoch, len(s.history))
        for ha, hs in zip(a.history, s.history):
            assert ha.keys() == hs.keys()
            for k in ha:
                assert math.isclose(ha[k], hs[k], rel_tol=1e-4, abs_tol=1e-5), (p, k, ha[k], hs[k])
        for ta, ts in zip(a.head.state_dict().values(), s.head.state_dict().values()):
            torch.testing.assert_close(ta, ts, rtol=1e-4, atol=1e-5)


def test_dropout_masks_are_drawn_per_configuration():
    X, y, Xv, yv = _blobs()
    settings = TrainSettings(epochs=3, batch_size=32, patience=0)

    def losses(dropout):
        # weight decays 0 and 1e-12 train identically up to rounding unless their masks differ
        ps = [HeadParams(hidden=(16,), dropout=dropout, weight_decay=wd, seed=1) for wd in (0.0, 1e-12)]
        return [[h["train_loss"] for h in r.history] for r in train_many(ps, data=TrainData(X, y, 3, Xv, yv), settings=settings)]

    a, b = losses(0.0)
    assert np.allclose(a, b, atol=1e-6)
    a, b = losses(0.5)
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-3


def test_refit_retrains_winner_on_train_plus_val(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--lr", "1e-3,3e-2", "--epochs", "10", "--patience", "3", "--refit", "--no-plots")
    r = s["refit"]
    assert r["n_rows"] == s["n_train"] + s["n_val"] and r["epochs"] == s["best_epoch"]
    assert "test_accuracy_before_refit" in s and s["test_accuracy"] == r["test_accuracy"]
    head, meta = load_head(tmp_path / "r" / "head.pt")
    assert meta["refit"] is True and meta["params"]["lr"] == s["params"]["lr"]
    from featcache.cache.store import read_cache

    c = read_cache(cache)
    test = c.split == "test"
    model = StandardizedHead(head, np.array(meta["standardize"]["mean"], np.float32),
                             np.array(meta["standardize"]["scale"], np.float32))
    with torch.no_grad():
        pred = model(torch.from_numpy(c.features[test])).argmax(1).numpy()
    assert math.isclose(float(np.mean(pred == c.labels[test])), s["test_accuracy"], abs_tol=1e-9)


@pytest.mark.parametrize("args,words", [
    (["--trials", "5"], ["--trials", "random"]),
    (["--search", "random", "--trials", "0"], ["--trials", "at least 1"]),
    (["--refit", "--val-fraction", "0"], ["--refit", "validation"]),
    (["--lr", "1e-3,-1"], ["--lr"]),
])
def test_bad_sweep_options_are_one_line_errors(tmp_path, args, words):
    flat = write_cache(tmp_path / "flat.h5", {"train": 20})
    code, out, err = run_cli("fit-head", flat, "-o", tmp_path / "r", "--device", "cpu", *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and out == "" and len(lines) == 1 and "Traceback" not in err
    assert all(w in lines[0] for w in words), lines[0]


def test_random_search_cli_samples_within_ranges(cache, tmp_path):
    s = fit(cache, tmp_path / "r", "--search", "random", "--trials", "6", "--lr", "1e-4,1e-1", "--weight-decay",
            "1e-5,1e-2", "--epochs", "4", "--no-plots")
    rows = s["leaderboard"]
    assert s["search"] == "random" and 1 <= len(rows) == s["n_configs"] <= 6
    assert all(1e-4 <= r["lr"] <= 1e-1 and 1e-5 <= r["weight_decay"] <= 1e-2 for r in rows)
    assert len({r["lr"] for r in rows}) == len(rows)  # continuous draws: no two alike
