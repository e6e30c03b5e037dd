"""The exact linear probe solves scikit-learn's LogisticRegression objective, along a C path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from margins import assert_predictions_agree
from sklearn._loss.loss import HalfBinomialLoss, HalfMultinomialLoss
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model._linear_loss import LinearModelLoss

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
    from featcache.pipeline.heads.exact import sigma_of
    from featcache.pipeline.heads.source import TensorSource

    step = lbfgs_mod.sigma_step(60)
    pre = lbfgs_mod.Preconditioner(sigma_of(TensorSource(Xt), torch.full((60,), 1 / 60), step), 4, 60 // step, step)
    with pytest.raises(ValueError, match="every row"):
        real_rotate(pre, Xt)


# issue 24: valid features never crash the exact probe (dead ReLU channels, tiny datasets)


def _dead_relu_features(seed: int = 3, n: int = 80, d: int = 512, dead: int = 237, n_classes: int = 4):
    """ReLU features of a low-rank latent with ``dead`` all-zero channels, as a random-init CNN at
    32 px gives (timm resnet10t: 80 x 512, ~237 dead); standardised on their first 80 % of rows as
    heads.data does (constant columns stay 0). With seed 3, float32 eigh(Sigma) failed to converge
    in the solver before issue 24's fix on the development machine (AMD EPYC, MKL): the issue's
    crash. Other CPUs' LAPACK may not fail on it; the test holds either way."""
    from featcache.pipeline.heads.data import zscore_stats

    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    latent = rng.normal(size=(n, 40)) + rng.normal(size=(n_classes, 40))[y]
    F = np.maximum(latent @ rng.normal(size=(40, d)), 0).astype(np.float32)
    F[:, rng.choice(d, dead, replace=False)] = 0
    tr = int(0.8 * n)
    mean, scale = zscore_stats(F[:tr])
    return ((F[:tr] - mean) / scale).astype(np.float32), y[:tr]


def _assert_matches_sklearn(res, X, y, n_classes, C, sw=None, rel=1e-4):
    """Converged, sklearn's optimum within ``rel``, the reported objective is the head's, same predictions."""
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ref = _reference(X, y, C, sw)
    f_ref = objective(to_linear(ref, X.shape[1], n_classes), Xt, yt, C, sw)
    assert res.converged and res.C == C
    assert (res.objective - f_ref) / f_ref < rel  # lower than sklearn's is better, not a miss
    assert abs(objective(res.head, Xt, yt, C, sw) - res.objective) / res.objective < 1e-5
    assert_predictions_agree(_predict(res.head, X), ref.predict(X), ref.decision_function(X))


def test_dead_relu_columns_are_dropped_and_get_zero_weight():
    X, y = _dead_relu_features()
    const = X.std(0) == 0
    assert const.sum() >= 237  # the cache: 237 constant columns of 512 (a few more die by chance)
    cs = [1e-3, 0.1, 10.0]
    path = fit_exact(cs, torch.from_numpy(X), torch.from_numpy(y), 4)
    for res, C in zip(path, cs):
        _assert_matches_sklearn(res, X, y, 4, C)
        assert torch.all(res.head[0].weight[:, torch.from_numpy(const)] == 0)
        assert f"dropped {int(const.sum())} constant columns" in res.note


def test_constant_columns_off_zero_and_rows_of_weight_zero():
    """A column constant at 0.7 on every row of non-zero weight (and different on the rows of
    weight 0) has weight 0 at the optimum, whatever C: it is dropped too."""
    X, y = _problem(3, n=120, d=10, seed=9)
    sw = np.ones(len(y))
    sw[:20] = 0
    X[20:, 3] = 0.7
    X[20:, 7] = -2.0
    res = fit_exact([0.5], torch.from_numpy(X), torch.from_numpy(y), 3, sample_weight=sw)[0]
    _assert_matches_sklearn(res, X, y, 3, 0.5, sw)
    assert torch.all(res.head[0].weight[:, [3, 7]] == 0) and "dropped 2 constant columns" in res.note


def _tiny(kind: str):
    rng = np.random.default_rng(11)
    if kind == "fewer_rows_than_columns":
        X, y = _problem(3, n=30, d=200, seed=12)
    elif kind == "duplicate_rows":
        X, y = _problem(4, n=40, d=30, seed=13)
        X, y = np.concatenate([X, X[:25], X[:5]]), np.concatenate([y, y[:25], y[:5]])
    else:  # two rows per class
        y = np.repeat(np.arange(5), 2)
        X = (rng.normal(size=(10, 50)) + rng.normal(size=(5, 50))[y]).astype(np.float32)
    mean, sd = X.mean(0), X.std(0)
    return ((X - mean) / sd).astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("kind", ["fewer_rows_than_columns", "duplicate_rows", "two_rows_per_class"])
def test_tiny_and_degenerate_datasets_converge_to_sklearns_optimum(kind):
    X, y = _tiny(kind)
    n_classes = int(y.max()) + 1
    cs = [1e-3, 0.1, 10.0]
    for res, C in zip(fit_exact(cs, torch.from_numpy(X), torch.from_numpy(y), n_classes), cs):
        _assert_matches_sklearn(res, X, y, n_classes, C)


def test_eigh_failures_fall_back_and_still_converge(monkeypatch):
    """eigh raising (LAPACK's 'failed to converge') never reaches the user: float32 failing is
    retried in float64; failing always turns the preconditioner off (scalar H0), and says so."""
    X, y = _problem(4, n=150, d=40, seed=14)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    real_eigh = torch.linalg.eigh

    def eigh_fails_in_float32(M, *a, **kw):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(M, *a, **kw)

    def eigh_always_fails(M, *a, **kw):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    for fake, note in ((eigh_fails_in_float32, "eigh in float64"), (eigh_always_fails, "preconditioner off")):
        monkeypatch.setattr(torch.linalg, "eigh", fake)
        for res, C in zip(fit_exact([0.01, 1.0], Xt, yt, 4), [0.01, 1.0]):
            _assert_matches_sklearn(res, X, y, 4, C)
            assert note in res.note
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    assert all(r.note is None for r in fit_exact([0.01, 1.0], Xt, yt, 4))


def test_all_columns_constant_fits_the_intercepts_only():
    X, y = np.zeros((60, 8), np.float32), np.arange(60) % 3
    y[:30] = 0  # priors 40 / 10 / 10 rows
    res = fit_exact([1.0], torch.from_numpy(X), torch.from_numpy(y), 3)[0]
    assert res.converged and torch.all(res.head[0].weight == 0)
    prior = np.bincount(y) / len(y)
    torch.testing.assert_close(torch.softmax(res.head[0].bias.double(), 0), torch.from_numpy(prior), atol=1e-4, rtol=0)


def test_a_class_of_weight_zero_only_is_absent():
    """Rows of class 2 all weigh 0: it is not trained on, so never predicted (its unpenalised bias
    would otherwise run to -inf); the rest is sklearn's fit on the other rows."""
    X, y = _problem(3, n=150, d=10, seed=15)
    sw = (y != 2).astype(float)
    res = fit_exact([1.0], torch.from_numpy(X), torch.from_numpy(y), 3, sample_weight=sw)[0]
    assert res.head[0].bias[2].item() == ABSENT_CLASS_BIAS and torch.all(res.head[0].weight[2] == 0)
    keep = y != 2
    _assert_matches_sklearn(res, X[keep], y[keep], 3, 1.0)


# issue 26: the stopping tests need full float32 matmuls, whatever the process set


@pytest.fixture
def restore_precision():
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def _matmul_settings():
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_global_matmul_precision_neither_changes_the_result_nor_is_lost(precision, restore_precision):
    """On a CPU with bf16 (oneDNN) "medium" moves an unpinned solve's weights by ~1e-6 to 1e-5
    (the development machine); on CUDA "high" is TF32 (see the GPU test below)."""
    X, y = _problem(4, n=400, d=64, seed=16)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    cs = [0.01, 1.0, 10.0]
    default = fit_exact(cs, Xt, yt, 4)
    torch.set_float32_matmul_precision(precision)
    before = _matmul_settings()
    pinned = fit_exact(cs, Xt, yt, 4)
    assert _matmul_settings() == before
    for a, b in zip(default, pinned):
        assert abs(a.objective - b.objective) / a.objective < 1e-9
        torch.testing.assert_close(a.head[0].weight, b.head[0].weight, atol=1e-7, rtol=1e-7)
    with pytest.raises(FeatcacheError):  # restored on the way out of an error too
        fit_exact([0.0], Xt, yt, 4)
    assert _matmul_settings() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_set_process_wide_does_not_reach_the_gpu_solve(restore_precision):
    X, y = _problem(10, n=2000, d=64, seed=7)
    Xg, yg = torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda()
    default = fit_exact([0.1, 10.0], Xg, yg, 10)
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    before = _matmul_settings()
    tf32 = fit_exact([0.1, 10.0], Xg, yg, 10)
    assert _matmul_settings() == before
    for a, b in zip(default, tf32):
        assert b.converged and abs(a.objective - b.objective) / a.objective < 1e-9


# issue 20: X as a row-chunked source (heads/source.py), for caches larger than memory

UNEVEN = [3, 41, 17, 90, 1, 58, 90]  # 7 chunks of 300 rows


@pytest.mark.parametrize("n_classes,weighted", [(4, False), (2, True)])
def test_a_source_of_uneven_chunks_solves_as_the_one_tensor(n_classes, weighted):
    """300 x 24 rows (N > ROTATE_ROWS * D: the tensor is not rotated either), 2 dead columns."""
    from featcache.pipeline.heads.source import TensorSource

    X, y = _problem(n_classes, n=300, d=24, seed=17)
    X[:, [5, 11]] = 0
    sw = np.random.default_rng(3).uniform(0, 2, len(y)) if weighted else None
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    cs = [1e-3, 0.1, 10.0]
    whole = fit_exact(cs, Xt, yt, n_classes, sample_weight=sw)
    chunked = fit_exact(cs, TensorSource(Xt, UNEVEN), yt, n_classes, sample_weight=sw)
    for a, b in zip(whole, chunked):
        assert b.converged and b.note == a.note == "dropped 2 constant columns (weight 0)"
        assert abs(a.objective - b.objective) / a.objective < 1e-6
        assert_predictions_agree(_predict(b.head, X), _predict(a.head, X), _logits(a.head, X))


def test_a_source_with_folds_and_fold_statistics_solves_as_the_one_tensor():
    from featcache.pipeline.heads.exact import fit_exact_folds
    from featcache.pipeline.heads.source import TensorSource

    X, y = _problem(3, n=300, d=16, seed=18)
    X = X * 2 + 1
    folds = np.random.default_rng(0).integers(0, 3, len(y))
    fw = (folds[None] != np.arange(3)[:, None]).astype(float)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    whole = fit_exact_folds([0.01, 1.0], Xt, yt, 3, fw, fold_stats=True)
    chunked = fit_exact_folds([0.01, 1.0], TensorSource(Xt, UNEVEN), yt, 3, fw, fold_stats=True)
    for ra, rb in zip(whole, chunked):
        for a, b in zip(ra, rb):
            assert b.converged and abs(a.objective - b.objective) / a.objective < 1e-6
            assert_predictions_agree(_predict(b.head, X), _predict(a.head, X), _logits(a.head, X))


def test_few_rows_in_a_source_are_not_rotated_and_reach_the_same_optimum():
    """60 x 64: the tensor is rotated into Sigma's eigenbasis, a source never is."""
    from featcache.pipeline.heads.source import TensorSource

    X, y = _problem(4, n=60, d=64, seed=8)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for a, b in zip(fit_exact([0.05, 1.0], Xt, yt, 4), fit_exact([0.05, 1.0], TensorSource(Xt, 16), yt, 4)):
        assert b.converged and abs(a.objective - b.objective) / a.objective < 1e-5


def test_chunked_passes_sum_what_the_one_tensor_sums(monkeypatch):
    """Sigma over every step-th row and the weighted column statistics, chunk by chunk (chunks that
    start off the stride), against numpy over the whole matrix."""
    from featcache.pipeline.heads.exact import column_moments, sigma_of
    from featcache.pipeline.heads.source import TensorSource

    rng = np.random.default_rng(19)
    X = rng.normal(size=(300, 9)).astype(np.float32) * 3 + 1
    w = rng.uniform(0, 1, (300, 2))
    w[::7] = 0
    src = TensorSource(torch.from_numpy(X), UNEVEN)
    step = 4
    ws = w[::step, 0] / w[::step, 0].sum()
    ref = (X[::step].astype(np.float64) * ws[:, None]).T @ X[::step]
    sigma = sigma_of(src, torch.from_numpy(w[:, 0]).float(), step).numpy()
    np.testing.assert_allclose(sigma, ref, rtol=1e-5, atol=1e-5)
    total, mean, var = column_moments(src, torch.from_numpy(w))
    for g in range(2):
        m = np.average(X, axis=0, weights=w[:, g])
        np.testing.assert_allclose(mean[g].numpy(), m, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(var[g].numpy(), np.average((X - m) ** 2, axis=0, weights=w[:, g]), rtol=1e-8)
    assert torch.allclose(total, torch.from_numpy(w.sum(0)))


def test_tensor_source_chunks_cover_the_rows_once():
    from featcache.pipeline.heads.source import RowSource, TensorSource

    X = torch.arange(300.0).view(100, 3)
    for spec in (None, 7, [50, 1, 49]):
        src = TensorSource(X, spec)
        assert isinstance(src, RowSource)
        parts = list(src.chunks())
        assert torch.equal(torch.cat([c for _, c in parts]), X)
        assert all(torch.equal(X[rows], c) for rows, c in parts)
    with pytest.raises(ValueError, match="chunk_rows"):
        TensorSource(X, [50, 49])


def test_inputs_are_left_as_they_were():
    """No pass over X works in place on it: a float64 X is its own float64 copy's view (the
    column statistics once squared it, and every later solve saw X**2)."""
    from featcache.pipeline.heads.exact import fit_exact_folds

    X, y = _problem(3, n=90, d=6, seed=20)
    X[:, 2] = 0  # a dropped column: X itself keeps it
    Xt, yt = torch.from_numpy(X.astype(np.float64)), torch.from_numpy(y)
    fw = np.stack([np.arange(90) % 3 != f for f in range(3)]).astype(float)
    copies = Xt.clone(), yt.clone(), fw.copy()
    first = fit_exact([0.5], Xt, yt, 3)[0].objective
    fit_exact_folds([0.5], Xt, yt, 3, fw, fold_stats=True)
    fit_exact_folds([0.5], Xt, yt, 3, fw)
    assert torch.equal(Xt, copies[0]) and torch.equal(yt, copies[1]) and np.array_equal(fw, copies[2])
    assert fit_exact([0.5], Xt, yt, 3)[0].objective == pytest.approx(first, rel=1e-12)
