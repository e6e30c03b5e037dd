"""The exact linear probe solves scikit-learn's LogisticRegression objective, along a C path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn._loss.loss import HalfBinomialLoss, HalfMultinomialLoss
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model._linear_loss import LinearModelLoss

from margins import assert_predictions_agree

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads.exact import DEFAULT_C_PATH, fit_exact, objective
from featcache.pipeline.heads.logreg import ABSENT_CLASS_BIAS, to_linear


def _problem(n_classes: int, n: int = 400, d: int = 12, seed: int = 0, labels=None):
    rng = np.random.default_rng(seed)
    labels = np.arange(n_classes) if labels is None else np.asarray(labels)
    y = labels[rng.integers(0, len(labels), n)]
    X = rng.normal(size=(n, d)) + 0.6 * rng.normal(size=(int(labels.max()) + 1, d))[y]
    return X.astype(np.float32), y.astype(np.int64)


def _reference(X, y, C, sample_weight=None):
    """sklearn at a far tighter tol than its default, so it is the optimum to compare with."""
    return LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(X, y, sample_weight=sample_weight)


def _predict(head, X):
    with torch.no_grad():
        return head(torch.from_numpy(X)).argmax(1).numpy()


def _logits(head, X):
    with torch.no_grad():
        return head(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("n_classes", [2, 10])
@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_matches_sklearn_predictions_and_objective(n_classes, C):
    X, y = _problem(n_classes)
    ref = _reference(X, y, C)
    res = fit_exact([C], torch.from_numpy(X), torch.from_numpy(y), n_classes)[0]
    ref_head = to_linear(ref, X.shape[1], n_classes)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    f_ref, f_ours = objective(ref_head, Xt, yt, C), objective(res.head, Xt, yt, C)
    assert res.converged and res.n_iter >= 1 and res.C == C
    assert abs(f_ours - f_ref) / f_ref < 1e-4
    assert abs(res.objective - f_ours) / f_ours < 1e-5  # the value it reports is the value it reached
    assert_predictions_agree(_predict(res.head, X), ref.predict(X), ref.decision_function(X))


@pytest.mark.parametrize("n_classes", [2, 4])
def test_objective_is_sklearns_own_loss(n_classes):
    """objective() (used to compare solutions) is LinearModelLoss.loss, sklearn's lbfgs target."""
    X, y = _problem(n_classes, seed=3)
    C, sw = 0.3, np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    ref = _reference(X, y, C, sw)
    base = HalfBinomialLoss() if n_classes == 2 else HalfMultinomialLoss(n_classes=n_classes)
    lml = LinearModelLoss(base_loss=base, fit_intercept=True)
    coef = np.hstack([ref.coef_, ref.intercept_[:, None]]).astype(np.float64)
    target = y.astype(np.float64)
    coef = coef.ravel() if n_classes == 2 else coef.ravel(order="F")
    sk = lml.loss(coef, X.astype(np.float64), target, sample_weight=sw, l2_reg_strength=1.0 / (C * sw.sum()))
    ours = objective(to_linear(ref, X.shape[1], n_classes), torch.from_numpy(X), torch.from_numpy(y), C, sw)
    assert abs(ours - sk) / sk < 1e-9


def test_warm_started_path_equals_cold_starts():
    X, y = _problem(5, n=500, seed=1)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    cs = list(DEFAULT_C_PATH)
    for block in (1, 3):
        path = fit_exact(cs[::-1], Xt, yt, 5, block=block)  # any input order; results come back in it
        assert [r.C for r in path] == cs[::-1]
        for r in path:
            cold = fit_exact([r.C], Xt, yt, 5)[0]
            assert abs(r.objective - cold.objective) / cold.objective < 1e-5
            assert r.converged and cold.converged
            assert np.mean(_predict(r.head, X) == _predict(cold.head, X)) >= 0.998
    # warm starts along the path do not stop early: a larger C fits the data at least as well
    objs = [objective(r.head, Xt, yt, 1e12) for r in fit_exact(cs, Xt, yt, 5)]
    assert all(b <= a + 1e-6 for a, b in zip(objs, objs[1:]))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_sample_weights_match_sklearn(n_classes):
    X, y = _problem(n_classes, seed=2)
    sw = np.random.default_rng(5).uniform(0.1, 3.0, len(y))
    ref = _reference(X, y, 0.5, sw)
    res = fit_exact([0.5], torch.from_numpy(X), torch.from_numpy(y), n_classes, sample_weight=sw)[0]
    ref_head = to_linear(ref, X.shape[1], n_classes)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    f_ref, f_ours = objective(ref_head, Xt, yt, 0.5, sw), objective(res.head, Xt, yt, 0.5, sw)
    assert abs(f_ours - f_ref) / f_ref < 1e-4
    assert_predictions_agree(_predict(res.head, X), ref.predict(X), ref.decision_function(X))
    unweighted = fit_exact([0.5], Xt, yt, n_classes)[0]
    assert not torch.allclose(unweighted.head[0].weight, res.head[0].weight, atol=1e-3)


def test_integer_weights_equal_repeated_rows():
    X, y = _problem(3, n=200, seed=4)
    reps = np.random.default_rng(1).integers(1, 4, len(y))
    weighted = fit_exact([1.0], torch.from_numpy(X), torch.from_numpy(y), 3, sample_weight=reps.astype(float))[0]
    Xr, yr = np.repeat(X, reps, 0), np.repeat(y, reps)
    repeated = fit_exact([1.0], torch.from_numpy(Xr), torch.from_numpy(yr), 3)[0]
    assert abs(weighted.objective - repeated.objective) / repeated.objective < 1e-5
    torch.testing.assert_close(weighted.head[0].weight, repeated.head[0].weight, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("labels", [[0, 2, 3], [1, 3]])  # 3 present classes, or a binary problem, of 5
def test_absent_classes_are_never_predicted(labels):
    X, y = _problem(5, labels=labels, seed=6)
    ref = _reference(X, y, 1.0)
    res = fit_exact([1.0], torch.from_numpy(X), torch.from_numpy(y), 5)[0]
    lin = res.head[0]
    assert lin.weight.shape == (5, X.shape[1])
    for c in set(range(5)) - set(labels):
        assert lin.bias[c].item() == ABSENT_CLASS_BIAS and torch.all(lin.weight[c] == 0)
    assert_predictions_agree(_predict(res.head, X), ref.predict(X), ref.decision_function(X))
    f_ref = objective(to_linear(ref, X.shape[1], 5), torch.from_numpy(X), torch.from_numpy(y), 1.0)
    assert abs(res.objective - f_ref) / f_ref < 1e-4


def test_bad_input_is_a_featcache_error():
    X, y = _problem(3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    with pytest.raises(FeatcacheError, match="positive"):
        fit_exact([0.1, 0.0], Xt, yt, 3)
    with pytest.raises(FeatcacheError, match="two classes"):
        fit_exact([1.0], Xt, torch.zeros_like(yt), 3)
    with pytest.raises(FeatcacheError, match="weights"):
        fit_exact([1.0], Xt, yt, 3, sample_weight=-np.ones(len(y)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_solves_the_same_problem():
    X, y = _problem(10, n=2000, d=64, seed=7)
    cs = [1e-3, 0.1, 10.0]
    cpu = fit_exact(cs, torch.from_numpy(X), torch.from_numpy(y), 10)
    gpu = fit_exact(cs, torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda(), 10)
    for a, b in zip(cpu, gpu):
        assert b.head[0].weight.device.type == "cpu" and b.converged
        assert abs(a.objective - b.objective) / a.objective < 1e-5
        assert np.mean(_predict(a.head, X) == _predict(b.head, X)) >= 0.998


# fit-head wiring: --head linear is the exact probe unless the run asks for epochs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from synthcache import write_cache

    return write_cache(tmp_path_factory.mktemp("exact") / "feats.h5", sep=0.5, dim=12)


def test_fit_head_linear_is_the_exact_c_path(cache, tmp_path):
    from synthcache import fit

    from featcache.cache.store import read_cache
    from featcache.pipeline.heads.data import prepare

    s = fit(cache, tmp_path / "r", "--no-plots")
    rows = s["leaderboard"]
    assert sorted(r["C"] for r in rows) == sorted(DEFAULT_C_PATH) and s["n_configs"] == len(DEFAULT_C_PATH)
    for r in rows:
        assert r["solver"] == "exact" and r["head"] == "linear" and r["n_iter"] >= 1 and r["converged"]
        assert r["val_accuracy"] is not None and r["test_accuracy"] is not None
    data = prepare(read_cache(cache), 0.2, 0, True, torch.device("cpu"))
    Xtr, ytr = data.split("train")
    ref = _reference(Xtr.numpy(), ytr.numpy(), s["params"]["C"])
    Xv, yv = data.split("val")
    assert s["val_accuracy"] == pytest.approx(ref.score(Xv.numpy(), yv.numpy()), abs=1e-9)
    refit = fit(cache, tmp_path / "rf", "--C", "0.01,1", "--refit", "--no-plots")
    assert refit["refit"]["n_rows"] == refit["n_train"] + refit["n_val"] and refit["refit"]["epochs"] is None


def test_epoch_options_or_solver_epochs_keep_the_epoch_trainer(cache, tmp_path):
    from synthcache import fit

    for args in (["--lr", "1e-3,1e-2", "--epochs", "3"], ["--solver", "epochs", "--epochs", "3"], ["--l1", "1e-4"]):
        s = fit(cache, tmp_path / args[0].strip("-"), *args, "--no-plots")
        rows = json.loads((tmp_path / args[0].strip("-") / "leaderboard.json").read_text())
        assert len(rows) == s["n_configs"] and s["best_epoch"] >= 1
        assert all("solver" not in r and r["best_epoch"] >= 1 for r in rows), args


def test_solver_exact_with_l1_is_a_one_line_error(cache, tmp_path):
    from synthcache import run_cli

    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "r", "--solver", "exact", "--l1", "0.1")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and out == "" and len(lines) == 1 and "--solver exact" in lines[0]


def test_python_api_defaults_to_the_exact_probe_as_the_cli_does(cache):
    """fit_heads resolves solver and C as fit-head does (heads.fit.resolve_solver)."""
    import featcache

    plain = featcache.fit_heads(cache, plots=False)
    assert [r["solver"] for r in plain.leaderboard] == ["exact"] * len(DEFAULT_C_PATH)
    assert sorted(r["C"] for r in plain.leaderboard) == sorted(DEFAULT_C_PATH)
    picked = featcache.fit_heads(cache, C=[0.1, 1.0], plots=False)
    assert sorted(r["C"] for r in picked.leaderboard) == [0.1, 1.0]
    epochs = featcache.fit_heads(cache, lr=[1e-3, 1e-2], epochs=3, plots=False)  # an epoch option: epoch sweep
    assert len(epochs.leaderboard) == 2 and all("solver" not in r for r in epochs.leaderboard)
    forced = featcache.fit_heads(cache, solver="epochs", epochs=2, plots=False)
    assert all("solver" not in r and r["best_epoch"] >= 1 for r in forced.leaderboard)


def test_without_the_preconditioner_it_reaches_the_same_optimum(monkeypatch):
    """Above MAX_PRECOND_DIM features L-BFGS runs with a scalar H0: slower, same answer."""
    import featcache.pipeline.heads.exact as exact

    X, y = _problem(4, n=300, seed=5)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    with_pre = fit_exact([0.05, 2.0], Xt, yt, 4)
    monkeypatch.setattr(exact, "MAX_PRECOND_DIM", 0)
    plain = fit_exact([0.05, 2.0], Xt, yt, 4)
    for a, b, C in zip(with_pre, plain, (0.05, 2.0)):
        ref = objective(to_linear(_reference(X, y, C), X.shape[1], 4), Xt, yt, C)
        assert a.converged and b.converged
        assert abs(a.objective - ref) / ref < 1e-5 and abs(b.objective - ref) / ref < 1e-5
        assert_predictions_agree(_predict(a.head, X), _predict(b.head, X), _logits(b.head, X))


def _max_grad(head, X, y, C, sample_weight=None) -> float:
    """max |df/d(W, b)| of the reported head, by autograd in float64 over the present classes
    (for two, over sklearn's one binomial logit row)."""
    present = torch.unique(y)
    lin = head[0]
    W, b = lin.weight.detach().double()[present], lin.bias.detach().double()[present]
    if len(present) == 2:  # sklearn's binomial parameters: one logit row, the difference of the two
        W, b = W[1:] - W[:1], b[1:] - b[:1]
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    z = X.double() @ W.t() + b
    if len(present) == 2:
        z = torch.cat([torch.zeros_like(z), z], 1)
    pos = torch.searchsorted(present, y)
    w = torch.ones(len(y), dtype=torch.float64) if sample_weight is None else torch.as_tensor(sample_weight).double()
    ce = torch.logsumexp(z, 1) - z.gather(1, pos[:, None]).squeeze(1)
    f = (w * ce).sum() / w.sum() + 0.5 * (W ** 2).sum() / (C * w.sum())
    gW, gb = torch.autograd.grad(f, (W, b))
    return max(gW.abs().max().item(), gb.abs().max().item())


@pytest.mark.parametrize("n_classes,n,weighted", [(4, 60, False), (4, 60, True), (2, 60, False), (4, 100, False)])
def test_fewer_rows_than_features_solves_in_the_rotated_basis_to_the_same_optimum(monkeypatch, n_classes, n, weighted):
    """N <= ROTATE_ROWS * D: X is rotated into Sigma's eigenbasis without its null space (60 rows
    of 64 features; rows of weight 0 shrink it further; 100 rows have none). Same optimum and
    predictions as the unrotated solve and sklearn, along a path whose second C starts from the
    first's carried curvature pairs (block=1); the stop test is sklearn's max |grad| in the
    original features (the head's own gradient, by autograd, is within tol)."""
    import featcache.pipeline.heads.exact as exact
    import featcache.pipeline.heads.lbfgs as lbfgs_mod

    d = 64
    X, y = _problem(n_classes, n=n, d=d, seed=8)
    sw = np.random.default_rng(2).integers(0, 3, len(y)).astype(float) if weighted else None
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    rotations = []
    real_rotate = lbfgs_mod.Preconditioner.rotate
    monkeypatch.setattr(lbfgs_mod.Preconditioner, "rotate",
                        lambda self, X_: rotations.append(real_rotate(self, X_)) or rotations[-1])
    cs = [0.05, 1.0]
    rotated = fit_exact(cs, Xt, yt, n_classes, sample_weight=sw, block=1)
    assert len(rotations) == 1
    Xr, V = rotations[0]
    n_rows = n if sw is None else int((sw > 0).sum())
    assert V.shape == (d, min(d, n_rows)) and Xr.shape == (n, V.shape[1])
    monkeypatch.setattr(exact, "ROTATE_ROWS", 0)
    plain = fit_exact(cs, Xt, yt, n_classes, sample_weight=sw, block=1)
    assert len(rotations) == 1
    for a, b, C in zip(rotated, plain, cs):
        ref = _reference(X, y, C, sw)
        f_ref = objective(to_linear(ref, d, n_classes), Xt, yt, C, sw)
        assert a.converged and b.converged
        assert abs(a.objective - f_ref) / f_ref < 1e-4 and abs(b.objective - f_ref) / f_ref < 1e-4  # the target
        assert abs(a.objective - b.objective) / b.objective < 1e-6
        assert abs(objective(a.head, Xt, yt, C, sw) - a.objective) / a.objective < 1e-5
        assert_predictions_agree(_predict(a.head, X), ref.predict(X), ref.decision_function(X))
        assert_predictions_agree(_predict(a.head, X), _predict(b.head, X), _logits(b.head, X))
        for r in (a, b):  # 2x: the float32 head's rounding of W
            assert _max_grad(r.head, Xt, yt, C, sw) <= 2 * exact.TOL


def test_no_rotation_unless_sigma_came_from_every_row(monkeypatch):
    """Dropping Sigma's null space is exact only if Sigma saw every row: with strided rows the
    solve stays unrotated (and still reaches sklearn's optimum), and rotate() refuses."""
    import featcache.pipeline.heads.lbfgs as lbfgs_mod

    monkeypatch.setattr(lbfgs_mod, "SIGMA_ROWS", 16)  # 60 rows -> every 3rd row estimates Sigma
    called = []
    real_rotate = lbfgs_mod.Preconditioner.rotate
    monkeypatch.setattr(lbfgs_mod.Preconditioner, "rotate", lambda self, X_: called.append(1) or real_rotate(self, X_))
    X, y = _problem(4, n=60, d=64, seed=8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    res = fit_exact([0.05], Xt, yt, 4)[0]
    assert not called and res.converged
    f_ref = objective(to_linear(_reference(X, y, 0.05), 64, 4), Xt, yt, 0.05)
    assert abs(res.objective - f_ref) / f_ref < 1e-4
    pre = lbfgs_mod.Preconditioner(Xt, torch.full((60,), 1 / 60), 4)
    with pytest.raises(ValueError, match="every row"):
        real_rotate(pre, Xt)
