"""fit-head --cv, --train-sizes and --views-keep-original: folds and sizes as masked heads of one
stack sharing its batches. Fold masks never leak held-out rows (bitwise); a fold head in the stack
equals that fold trained alone; CV in one pass matches K separate runs statistically."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from synthcache import fit, write_cache

from featcache.pipeline.heads.cv import fold_splits, size_subset
from featcache.pipeline.heads.masks import HeadTask, head_statistics
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_group, train_many


def _problem(n: int = 62, d: int = 6, seed: int = 0, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    X = torch.randn(3, d, generator=torch.Generator().manual_seed(7))[y] * spread + torch.randn(n, d, generator=g)
    return X * 4.0 + 2.0, y  # far from standardised: per-fold statistics matter


def _zscore(X: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    r = X[torch.as_tensor(rows)].double()
    return r.mean(0).float(), r.std(0, unbiased=False).float()


def _same(a, b, tol=1e-4):
    assert a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history):
        for key in ha:
            assert ha[key] == pytest.approx(hb[key], rel=tol, abs=1e-5), (key, ha["epoch"])
    for (ka, va), (_, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=tol, atol=1e-5, msg=ka)


# ---- folds and sizes -----------------------------------------------------------------------------

def test_folds_are_stratified_disjoint_and_cover_every_row():
    labels = np.array([0] * 20 + [1] * 10 + [2] * 15)
    folds = fold_splits(labels, 5, seed=0)
    held = np.concatenate([ho for _, ho in folds])
    assert sorted(held.tolist()) == list(range(len(labels)))  # every row held out exactly once
    for tr, ho in folds:
        assert not set(tr) & set(ho) and len(tr) + len(ho) == len(labels)
        assert np.bincount(labels[ho]).tolist() == [4, 2, 3]
    assert [ho.tolist() for _, ho in fold_splits(labels, 5, 0)] == [ho.tolist() for _, ho in folds]  # seeded


def test_train_size_subsets_are_per_class_and_nested():
    labels = np.array([0] * 30 + [1] * 8 + [2] * 20)
    pos = np.arange(len(labels))
    small, big = size_subset(pos, labels, 5, 0), size_subset(pos, labels, 10, 0)
    assert np.bincount(labels[small]).tolist() == [5, 5, 5]
    assert np.bincount(labels[big]).tolist() == [10, 8, 10]  # a class with fewer gives what it has
    assert set(small) <= set(big)
    tr = np.arange(0, len(labels), 2)  # within one fold's training rows only
    assert set(size_subset(tr, labels, 3, 0)) <= set(tr)


def test_head_statistics_of_every_row_set_match_numpy_even_far_from_zero(monkeypatch):
    import featcache.pipeline.heads.masks as masks

    monkeypatch.setattr(masks, "STATS_BLOCK", 64)  # several blocks
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(1e3, 2.0, (300, 5)), dtype=torch.float32)
    X[:, 3] = 7.0  # a constant feature keeps scale 1
    sets = [np.sort(rng.choice(300, n, replace=False)) for n in (200, 120, 200)]
    tasks = [HeadTask(HeadParams(), rows=r, standardize=True) for r in sets]
    tasks += [HeadTask(HeadParams()), HeadTask(HeadParams(), standardize=True)]  # no statistics, every row
    mean, scale = head_statistics(X, tasks)
    for j, rows in enumerate([*sets, None, np.arange(300)]):
        if j == 3:
            assert torch.equal(mean[j], torch.zeros(5)) and torch.equal(scale[j], torch.ones(5))
            continue
        r = X.numpy().astype(np.float64)[rows]
        sd = r.std(0)
        sd[sd < 1e-6] = 1.0
        np.testing.assert_allclose(mean[j].numpy(), r.mean(0), rtol=1e-7)
        np.testing.assert_allclose(scale[j].numpy(), sd, rtol=1e-5)


LEAK_PARAMS = [HeadParams(hidden=(8,), lr=0.02), HeadParams(lr=0.05, weight_decay=1e-3),
               HeadParams(hidden=(8,), batchnorm=True, optimizer="sgd", lr=0.05)]


@pytest.mark.parametrize("params", LEAK_PARAMS, ids=["mlp", "linear", "mlp-batchnorm"])
def test_fold_heads_never_see_held_out_rows_in_training_or_standardisation(params):
    X, y = _problem()
    (tr, ho), *_ = fold_splits(y.numpy(), 4, seed=1)
    mean, scale = head_statistics(X, [HeadTask(HeadParams(), rows=tr, standardize=True)])
    m, s = _zscore(X, tr)
    torch.testing.assert_close(mean[0], m)
    torch.testing.assert_close(scale[0], s)
    task = HeadTask(params, rows=tr, eval_rows=ho, standardize=True)
    s = TrainSettings(epochs=8, batch_size=16, patience=0)
    (a,) = train_group([task], data=TrainData(X, y, 3, X, y), settings=s)
    X2, y2 = X.clone(), y.clone()
    X2[torch.as_tensor(ho)] = 1e4 * torch.randn(len(ho), X.shape[1])  # held-out rows changed beyond recognition
    y2[torch.as_tensor(ho)] = (y2[torch.as_tensor(ho)] + 1) % 3
    (b,) = train_group([task], data=TrainData(X2, y2, 3, X2, y2), settings=s)
    for key in ("train_loss", "train_accuracy", "weight_norm"):
        assert [h[key] for h in a.history] == pytest.approx([h[key] for h in b.history], rel=1e-6)
    for va, vb in zip(a.head.state_dict().values(), b.head.state_dict().values()):
        assert torch.equal(va, vb)
    assert a.history[-1]["val_loss"] != b.history[-1]["val_loss"]  # scored on the held-out rows, and only them


def test_in_a_whole_cv_stack_a_fold_head_ignores_its_held_out_rows():
    """The held-out rows share every batch with the fold head (other folds train on them) and still
    weigh exactly zero in its loss, gradients and batch-norm statistics."""
    X, y = _problem(n=90)
    folds = fold_splits(y.numpy(), 3, seed=2)
    p = HeadParams(hidden=(8,), batchnorm=True, lr=0.02)
    tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for tr, ho in folds]
    s = TrainSettings(epochs=6, batch_size=16, patience=0)
    a = train_many(tasks, data=TrainData(X, y, 3, X, y), settings=s)
    ho = torch.as_tensor(folds[0][1])
    X2, y2 = X.clone(), y.clone()
    X2[ho] = 1e3 * torch.randn(len(ho), X.shape[1])
    y2[ho] = (y2[ho] + 1) % 3
    b = train_many(tasks, data=TrainData(X2, y2, 3, X2, y2), settings=s)
    for va, vb in zip(a[0].head.state_dict().values(), b[0].head.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7)  # fold 0 is untouched
    assert not torch.allclose(a[1].head[0].weight, b[1].head[0].weight)  # fold 1 trains on those rows


@pytest.mark.parametrize("params", [
    [HeadParams(lr=0.05), HeadParams(lr=0.01, weight_decay=1e-2)],
    [HeadParams(hidden=(16,), lr=0.02), HeadParams(hidden=(16,), optimizer="sgd", lr=0.1, momentum=0.9)],
    [HeadParams(hidden=(8,), batchnorm=True, optimizer="adamw", lr=0.02, weight_decay=1e-2)],
], ids=["linear", "mlp", "mlp-batchnorm"])
def test_a_fold_head_in_the_cv_stack_equals_that_fold_trained_alone(params):
    """Stacking masked heads changes nothing for any of them (one fold task alone takes the same
    shared batches, the same masks and the same early stopping)."""
    X, y = _problem()
    folds = fold_splits(y.numpy(), 5, seed=0)
    assert len({len(tr) for tr, _ in folds}) > 1  # folds of unequal size
    tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for p in params for tr, ho in folds]
    s = TrainSettings(epochs=30, batch_size=16, patience=4)
    together = train_many(tasks, data=TrainData(X, y, 3, X, y), settings=s)
    for t, r in zip(tasks, together):
        (alone,) = train_many([t], data=TrainData(X, y, 3, X, y), settings=s)
        _same(r, alone)
    assert len({r.best_epoch for r in together}) > 1 or len({round(r.history[-1]["val_loss"], 5) for r in together}) > 1


def test_fold_accuracies_match_k_separate_runs_within_noise():
    """Shared batches make a fold head train with ~4/5-size batches: not bitwise a lone run on its
    own z-scored rows any more, but the same model statistically (mean over folds and seeds)."""
    params = [HeadParams(lr=0.02), HeadParams(hidden=(16,), lr=0.01)]
    s = TrainSettings(epochs=15, batch_size=32, patience=0)
    gaps, accs = {p: [] for p in params}, []
    for seed in range(3):
        X, y = _problem(n=200, d=8, seed=seed, spread=0.7)
        folds = fold_splits(y.numpy(), 5, seed=seed)
        tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for p in params for tr, ho in folds]
        together = train_many(tasks, data=TrainData(X, y, 3, X, y), settings=s)
        alone = []
        for tr, ho in folds:
            m, sd = _zscore(X, tr)
            Xs = (X - m) / sd
            trt, hot = torch.as_tensor(tr), torch.as_tensor(ho)
            alone += train_many(params, data=TrainData(Xs[trt], y[trt], 3, Xs[hot], y[hot]), settings=s)
        for t, r in zip(tasks, together):
            f = next(i for i, (tr, _) in enumerate(folds) if tr is t.rows)
            a = alone[f * len(params) + params.index(t.params)]
            gaps[t.params].append(r.history[-1]["val_accuracy"] - a.history[-1]["val_accuracy"])
            accs.append(a.history[-1]["val_accuracy"])
    assert 0.55 < np.mean(accs) < 0.97  # a problem with room for error: equal accuracies are no accident
    for p, g in gaps.items():
        assert abs(np.mean(g)) <= 0.02, (p, g)  # 15 folds: the mean held-out accuracy agrees
        assert max(abs(v) for v in g) <= 0.1, (p, g)  # and no fold is far off


def test_standardising_heads_equal_lone_runs_on_z_scored_rows_and_export_raw_input_heads():
    """Per-head statistics folded into the first layer == training on z-scored copies; the saved
    head takes the raw rows (the statistics, and before batch norm the shift, are inside it)."""
    X, y = _problem()
    Xv, yv = _problem(n=30, seed=5)
    m, sd = _zscore(X, np.arange(len(X)))
    s = TrainSettings(epochs=10, batch_size=16, patience=3)
    for p in (HeadParams(lr=0.02), HeadParams(hidden=(8,), batchnorm=True, lr=0.02)):
        (folded,) = train_many([HeadTask(p, standardize=True)], data=TrainData(X, y, 3, Xv, yv), settings=s)
        (copied,) = train_many([p], data=TrainData((X - m) / sd, y, 3, (Xv - m) / sd, yv), settings=s)
        assert folded.best_epoch == copied.best_epoch
        for hf, hc in zip(folded.history, copied.history):
            for key in hf:
                assert hf[key] == pytest.approx(hc[key], rel=1e-4, abs=1e-5), key
        torch.testing.assert_close(folded.head(Xv), copied.head((Xv - m) / sd), rtol=1e-4, atol=1e-4)
        best = folded.history[folded.best_epoch - 1]
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(folded.head(Xv), yv).item()
        assert loss == pytest.approx(best["val_loss"], rel=1e-4)


def test_a_mask_of_every_row_trains_as_the_plain_head():
    X, y = _problem()
    p = HeadParams(hidden=(8,), lr=0.02)
    s = TrainSettings(epochs=6, batch_size=16, patience=0)
    (masked,) = train_many([HeadTask(p, rows=np.arange(len(X)))], data=TrainData(X, y, 3, X, y), settings=s)
    (plain,) = train_many([p], data=TrainData(X, y, 3, X, y), settings=s)
    _same(masked, plain)


def test_learning_curve_sizes_train_in_one_stack_on_their_own_rows_only(monkeypatch):
    """Nested training-set sizes are row masks of one stack; rows outside a size never touch it,
    even when no row of a small size falls in a batch (that head sits the step out)."""
    import featcache.pipeline.heads.train as train_mod

    X, y = _problem(n=120)
    labels = y.numpy()
    pos = np.arange(len(labels))
    sizes = [size_subset(pos, labels, n, seed=0) for n in (1, 5, 20)]
    p = HeadParams(hidden=(8,), lr=0.02)
    tasks = [HeadTask(p, rows=r) for r in sizes] + [HeadTask(p)]
    calls = []
    real = train_mod.train_group
    monkeypatch.setattr(train_mod, "train_group", lambda ts, **kw: calls.append(len(ts)) or real(ts, **kw))
    s = TrainSettings(epochs=5, batch_size=16, patience=0)
    a = train_many(tasks, data=TrainData(X, y, 3), settings=s)
    assert calls == [4]  # one stack, every size
    outside = torch.as_tensor(np.setdiff1d(pos, sizes[0]))
    X2, y2 = X.clone(), y.clone()
    X2[outside] = 1e3 * torch.randn(len(outside), X.shape[1])
    y2[outside] = (y2[outside] + 1) % 3
    b = train_many(tasks, data=TrainData(X2, y2, 3), settings=s)
    for va, vb in zip(a[0].head.state_dict().values(), b[0].head.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7)
    (alone,) = train_many([tasks[0]], data=TrainData(X, y, 3), settings=s)
    _same(a[0], alone)  # 3 rows in 8 batches a epoch: most steps are sat out, identically alone
    assert [h["train_loss"] for h in a[3].history] != [h["train_loss"] for h in b[3].history]


def test_evaluation_chunks_are_sized_by_heads_and_widths_not_by_the_feature_dimension():
    from featcache.pipeline.heads.masks import eval_chunk_rows

    assert eval_chunk_rows(100, (10,), budget=64 << 20) == (64 << 20) // (4 * 100 * 10)
    assert eval_chunk_rows(100, (512, 10), budget=64 << 20) == (64 << 20) // (4 * 100 * 522)
    assert eval_chunk_rows(10**6, (10**4,), budget=1000) == 1  # at least one row


def test_evaluating_a_hundred_folded_heads_builds_no_per_head_copy_of_the_rows(monkeypatch):
    """K=100 standardising heads at D=2048: no (K, rows, D) tensor, only the folded (K, D, C) weights
    and (rows, C, K) logits; chunking changes nothing but memory."""
    from torch.overrides import TorchFunctionMode

    import featcache.pipeline.heads.masks as masks
    from featcache.pipeline.heads.stacked import StackedHead
    from featcache.pipeline.heads.train import stacked_logits

    k, d, c, n = 100, 2048, 10, 300
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    model = StackedHead(d, (), c, list(range(k)))
    model.set_input_stats(torch.randn(k, d, generator=g), torch.rand(k, d, generator=g) + 0.5)

    class Largest(TorchFunctionMode):
        numel = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        loss, acc = masks.masked_evaluate(model, X, y, stacked_logits, None)
    assert Largest.numel <= k * d * c  # the folded weights; a standardised copy would be k * n * d
    assert k * n * d > 10 * Largest.numel
    monkeypatch.setattr(masks, "EVAL_BUDGET", 4 * k * c * 7)  # 7 rows a chunk
    loss7, acc7 = masks.masked_evaluate(model, X, y, stacked_logits, None)
    torch.testing.assert_close(loss7, loss)
    torch.testing.assert_close(acc7, acc)


def test_keep_original_one_is_training_without_views_and_zero_is_plain_views():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    Xv, yv = torch.randn(12, 6, generator=g), torch.arange(12) % 3
    views = X[:, None].repeat(1, 3, 1) + torch.randn(40, 3, 6, generator=g)
    p = [HeadParams(hidden=(8,), lr=1e-2)]
    s = TrainSettings(epochs=5, batch_size=16, patience=0)
    plain = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=s)[0]
    kept = train_group(p, data=TrainData(X, y, 3, Xv, yv, views=views, keep_original=1.0), settings=s)[0]
    viewed = train_group(p, data=TrainData(X, y, 3, Xv, yv, views=views), settings=s)[0]
    half = train_group(p, data=TrainData(X, y, 3, Xv, yv, views=views, keep_original=0.5), settings=s)[0]
    _same(plain, kept, tol=1e-6)
    assert plain.history != viewed.history and half.history not in (plain.history, viewed.history)


# ---- fit-head ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cv") / "f.h5", sep=0.8)


def test_fit_head_cv_ranks_by_mean_fold_accuracy_and_refits_the_winner(cache, tmp_path):
    s = fit(cache, tmp_path / "run", "--lr", "1e-3,3e-2", "--cv", "4", "--epochs", "25", "--patience", "3")
    rows = s["leaderboard"]
    assert [r["cv_accuracy_mean"] for r in rows] == sorted((r["cv_accuracy_mean"] for r in rows), reverse=True)
    win = rows[0]
    assert win["cv_folds"] == 4 and len(win["fold_accuracies"]) == 4
    assert win["cv_accuracy_mean"] == pytest.approx(np.mean(win["fold_accuracies"]))
    assert win["cv_accuracy_std"] == pytest.approx(np.std(win["fold_accuracies"]))
    assert win["refit_rows"] == s["n_train"] == 120  # all train rows, none of val
    assert win["refit_epochs"] == win["best_epoch"] == max(1, round(float(np.median(win["fold_best_epochs"]))))
    assert s["val_accuracy"] == win["val_accuracy"] is not None and s["cv"]["cv_folds"] == 4
    assert rows[1]["val_accuracy"] is None  # only the winner is refitted and scored on val
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert len(history) == win["refit_epochs"] and "val_loss" not in history[0]  # the saved head is the refit


def test_learning_curve_on_a_cache_with_views_trains_with_and_without_them(small_tree_ro, tmp_path):
    from conftest import FAST

    res = invoke("extract", small_tree_ro, "-o", tmp_path / "aug.h5", *FAST, "--device", "cpu", "--workers", "0",
                 "--augment", "2", "--json")
    assert res.exit_code == 0, res.stderr
    s = fit(tmp_path / "aug.h5", tmp_path / "run", "--train-sizes", "1,all", "--epochs", "4",
            "--views-keep-original", "0.25")
    assert {(r["train_size"], r["views"]) for r in s["leaderboard"]} == {(1, True), (1, False), ("all", True),
                                                                          ("all", False)}
    assert s["augmented"]["keep_original"] == 0.25 and s["config"]["views_keep_original"] == 0.25
    assert "learning_curve.png" in s["files"]
    off = fit(tmp_path / "aug.h5", tmp_path / "off", "--train-sizes", "1,all", "--epochs", "2", "--no-use-augmented")
    assert {r["views"] for r in off["leaderboard"]} == {False}


def test_fit_head_train_sizes_leaderboard_and_plot(cache, tmp_path):
    s = fit(cache, tmp_path / "run", "--head", "mlp", "--hidden", "0,16", "--train-sizes", "5,all", "--epochs", "10")
    sizes = {(r["head"], r["train_size"]) for r in s["leaderboard"]}
    assert sizes == {("linear", 5), ("linear", "all"), ("mlp", 5), ("mlp", "all")}
    assert all(r["n_train_rows"] == (15 if r["train_size"] == 5 else 120) for r in s["leaderboard"])
    assert s["leaderboard"][0]["train_size"] == "all" and "learning_curve.png" in s["files"]
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000


def test_python_api_takes_cv_and_train_sizes_as_lists_or_scalars(cache):
    from matplotlib.figure import Figure

    import featcache

    r = featcache.fit_heads(str(cache), cv=3, train_sizes=[5, "all"], lr=[1e-2], epochs=5, device="cpu")
    assert r.config.cv == 3 and r.config.train_sizes == (5, 0)
    assert isinstance(r.plot_learning_curve(), Figure)
    assert {"cv_accuracy_mean", "train_size"} <= set(r.leaderboard.to_pandas().columns)
    assert featcache.fit_heads(str(cache), train_sizes=5, epochs=2, device="cpu").config.train_sizes == (5,)


def test_a_diverging_configuration_is_ranked_last_as_failed_never_saved(cache, tmp_path):
    s = fit(cache, tmp_path / "run", "--lr", "1e30,1e-2", "--epochs", "6", "--no-plots")
    last = s["leaderboard"][-1]
    assert last["lr"] == 1e30 and last["status"] == "failed" and last["val_accuracy"] is None
    assert s["leaderboard"][0]["status"] == "ok" and s["params"]["lr"] == 1e-2
    lb = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    assert lb[-1]["status"] == "failed"
    r = invoke("fit-head", cache, "-o", tmp_path / "bad", "--solver", "epochs", "--lr", "1e30", "--epochs", "3",
               "--device", "cpu")
    assert_one_line_error(r, "diverged")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, words", [
    (["--cv", "1"], ["--cv 1"]), (["--views-keep-original", "1.5"], ["keep-original"]),
    (["--train-sizes", "10,x"], ["--train-sizes"]), (["--head", "logreg", "--cv", "3"], ["logreg"]),
    (["--cv", "50"], ["at least 50"]),
])
def test_bad_cv_options_fail_in_one_line(cache, tmp_path, args, words):
    r = invoke("fit-head", cache, "-o", tmp_path / "run", "--device", "cpu", *args)
    assert_one_line_error(r, *words)


def test_runs_table_carries_the_cv_and_learning_curve_columns(cache, tmp_path):
    fit(cache, tmp_path / "exp" / "cv", "--cv", "3", "--epochs", "4", "--no-plots", "--train-sizes", "5,all")
    fit(cache, tmp_path / "exp" / "plain", "--epochs", "4", "--no-plots")
    r = invoke("runs", tmp_path / "exp", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["run"]: row for row in r.json()["runs"]}
    cv = json.loads((tmp_path / "exp" / "cv" / "metrics.json").read_text())["cv"]
    assert rows["cv"]["cv_folds"] == 3 and rows["cv"]["cv_accuracy_mean"] == cv["cv_accuracy_mean"]
    assert rows["cv"]["train_sizes"] == "5,all" and rows["plain"]["cv_accuracy_mean"] is None
    text = invoke("runs", tmp_path / "exp").stdout
    assert "cv_acc" in text and f"{cv['cv_accuracy_mean']:.4f}±" in text and "(3-fold)" in text


@pytest.mark.parametrize("bad", [["x"], [2.5], [True], [None]])
def test_python_api_refuses_a_train_size_that_is_not_a_whole_number(bad):
    from featcache.pipeline.api import head_config
    from featcache.pipeline.errors import FeatcacheError

    with pytest.raises(FeatcacheError, match="train_sizes"):
        head_config(train_sizes=bad)
