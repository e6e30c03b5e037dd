"""--class-weight with epoch-trained heads (linear by epochs, mlp): per-row loss weights in the
stacked trainer (torch's CrossEntropyLoss(weight=...) mean, times each head's 0/1 row mask), the
weighted validation loss that early stopping follows, and what balanced or class=weight weights do
to an imbalanced problem through ``featcache.fit_heads`` and ``featcache fit-head``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthcache import fit, write_cache

import featcache
from featcache.pipeline.api import head_config
from featcache.pipeline.errors import FeatcacheWarning
from featcache.pipeline.heads import kinds
from featcache.pipeline.heads.masks import HeadTask
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many

# No L1 here: its sign(W) step on a weight near 0 would turn a rounding difference into a 1e-4 one.
PARAMS = [HeadParams(hidden=(), lr=0.05), HeadParams(hidden=(16,), dropout=0.2, lr=0.01),
          HeadParams(hidden=(16, 8), batchnorm=True, lr=0.01), HeadParams(hidden=(), optimizer="sgd", lr=0.1)]


def _blobs(n: int = 90, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping Gaussian classes of n/3 rows each."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(3, d, generator=torch.Generator().manual_seed(7))[y] * 1.2 + torch.randn(n, d, generator=g), y


def _close(a, b, tol: float = 1e-4) -> None:
    """Same best epoch, history and weights up to float rounding (accuracies: a row near a tie may flip)."""
    assert a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history):
        for key in ha:
            slack = 0.05 if key.endswith("accuracy") else 1e-5
            assert ha[key] == pytest.approx(hb[key], rel=tol, abs=slack), (key, ha["epoch"])
    for (name, va), (_, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=tol, atol=1e-5, msg=name)


# ---- the trainer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cv", [False, True], ids=["plain", "cv-folds"])
def test_constant_weights_train_exactly_as_no_weights(cv):
    """sum(w ce) / sum(w) with w constant is the plain mean: every configuration, fold mask, batch norm."""
    X, y = _blobs()
    if cv:
        folds = [(np.setdiff1d(np.arange(len(y)), np.arange(i, len(y), 3)), np.arange(i, len(y), 3)) for i in range(3)]
        tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for p in PARAMS for tr, ho in folds]
        Xv, yv = X, y
    else:
        tasks = PARAMS
        Xv, yv = _blobs(30, seed=1)
    settings = TrainSettings(epochs=8, batch_size=16, patience=0)
    plain = train_many(tasks, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    weighted = train_many(tasks, data=TrainData(X, y, 3, Xv, yv, sample_weight=torch.full((len(y),), 2.5),
                                                val_weight=torch.full((len(yv),), 2.5)), settings=settings)
    for a, b in zip(plain, weighted):
        _close(a, b)


def test_losses_are_torchs_class_weighted_mean_over_each_heads_own_rows():
    """One full-batch epoch of a fold head: its recorded train loss is F.cross_entropy(weight=...) of
    the initial head on its training rows only, its val loss that of the trained head on its
    held-out rows only; the accuracy stays the plain share of rows."""
    X, y = _blobs()
    per_class = torch.tensor([0.5, 2.0, 4.0])
    rows, held = np.arange(0, len(y), 2), np.arange(1, len(y), 2)
    task = HeadTask(HeadParams(lr=0.05, seed=3), rows=rows, eval_rows=held)
    data = TrainData(X, y, 3, X, y, sample_weight=per_class[y], val_weight=per_class[y])
    full_batch = len(y)
    (init,) = train_many([task], data=data, settings=TrainSettings(epochs=0, batch_size=full_batch, patience=0))
    (one,) = train_many([task], data=data, settings=TrainSettings(epochs=1, batch_size=full_batch, patience=0))
    r, h = torch.as_tensor(rows), torch.as_tensor(held)
    with torch.no_grad():
        train_loss = F.cross_entropy(init.head(X[r]), y[r], weight=per_class).item()
        val_loss = F.cross_entropy(one.head(X[h]), y[h], weight=per_class).item()
        plain_val = F.cross_entropy(one.head(X[h]), y[h]).item()
        train_acc = (init.head(X[r]).argmax(1) == y[r]).float().mean().item()
    rec = one.history[0]
    assert rec["train_loss"] == pytest.approx(train_loss, rel=1e-4)
    assert rec["val_loss"] == pytest.approx(val_loss, rel=1e-4)
    assert abs(plain_val - val_loss) > 1e-2  # the weights matter: this is not the plain mean
    assert rec["train_accuracy"] == pytest.approx(train_acc, abs=2 / len(rows))


def test_early_stopping_keeps_the_epoch_of_the_lowest_weighted_validation_loss():
    X, y = _blobs(seed=2)
    Xv, yv = _blobs(45, seed=3)
    per_class = torch.tensor([1.0, 1.0, 6.0])
    data = TrainData(X, y, 3, Xv, yv, sample_weight=per_class[y], val_weight=per_class[yv])
    (res,) = train_many([HeadParams(hidden=(32,), lr=0.05)], data=data,
                        settings=TrainSettings(epochs=60, batch_size=16, patience=4))
    losses = [r["val_loss"] for r in res.history]
    assert res.best_epoch == int(np.argmin(losses)) + 1 and len(res.history) in (60, res.best_epoch + 4)
    with torch.no_grad():
        kept = F.cross_entropy(res.head(Xv), yv, weight=per_class).item()
    assert kept == pytest.approx(min(losses), rel=1e-4)


def test_row_weights_must_be_one_per_row():
    X, y = _blobs()
    with pytest.raises(ValueError, match="sample_weight must be one weight per row"):
        TrainData(X, y, 3, sample_weight=torch.ones(len(y) - 1))
    with pytest.raises(ValueError, match="val_weight"):
        TrainData(X, y, 3, val_weight=torch.ones(3))  # no evaluation rows to weigh


def test_the_memory_plan_counts_the_row_weights():
    mlp = kinds.get("mlp")
    sizes = dict(n_train=1000, dim=16, n_classes=2)
    plain = mlp.solver_bytes(head_config(head="mlp"), **sizes)
    assert mlp.solver_bytes(head_config(head="mlp", class_weight="balanced"), **sizes) == plain + 1000 * 4 * 2


# ---- an imbalanced problem: 90/10, overlapping ---------------------------------------------------

def _imbalanced(seed: int = 0, d: int = 16, shift: float = 1.5) -> dict:
    """Two classes 9:1 in every split, standard normal in d dimensions, class 1 shifted by ``shift``
    along the first. The Bayes rule for these priors finds ~24% of class 1 (balanced accuracy
    ~0.61); weighting the classes equally moves the threshold to the midpoint: ~77% (~0.77)."""
    rng = np.random.default_rng(seed)

    def split(n0: int, n1: int):
        y = np.r_[np.zeros(n0, int), np.ones(n1, int)]
        X = rng.normal(0.0, 1.0, (len(y), d))
        X[:, 0] += shift * y
        p = rng.permutation(len(y))
        return X[p].astype(np.float32), y[p]

    return {"train": split(900, 100), "val": split(270, 30), "test": split(900, 100)}


@pytest.fixture(scope="module")
def imbalanced() -> dict:
    return _imbalanced()


EPOCH_HEADS = {"linear": dict(head="linear", solver="epochs", lr=1e-2), "mlp": dict(head="mlp", hidden=[32], lr=1e-2)}


@pytest.mark.parametrize("name", list(EPOCH_HEADS))
def test_balanced_weights_raise_minority_recall_and_balanced_accuracy(name, imbalanced):
    plain = featcache.fit_heads(imbalanced, epochs=30, **EPOCH_HEADS[name]).metrics
    balanced = featcache.fit_heads(imbalanced, epochs=30, class_weight="balanced", **EPOCH_HEADS[name]).metrics
    assert balanced["config"]["class_weight"] == "balanced"
    assert balanced["test_per_class"]["1"]["recall"] > plain["test_per_class"]["1"]["recall"] + 0.3
    assert balanced["test_balanced_accuracy"] > plain["test_balanced_accuracy"] + 0.08


def test_the_auto_solver_trains_by_epochs_with_class_weights_where_l1_asks_for_it(imbalanced):
    from types import SimpleNamespace

    from featcache.pipeline.heads.kinds.linear import solver_of

    cfg = head_config(head="linear", l1=1e-4, class_weight="balanced")
    assert solver_of(cfg, SimpleNamespace(views=None)) == "epochs"
    with pytest.warns(FeatcacheWarning, match="training by epochs"):
        s = featcache.fit_heads(imbalanced, head="linear", l1=1e-4, class_weight="balanced")
    assert "lr" in s.best.row and s.best.row["l1"] == 1e-4 and s.best.row["best_epoch"] >= 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A 2-class cache, 9:1 in every split; centres ~1.5 apart (seed 0), overlapping."""
    counts = {"train": [900, 100], "val": [270, 30], "test": [900, 100]}
    return write_cache(tmp_path_factory.mktemp("imbalanced") / "f.h5", counts, dim=16, classes=2, sep=0.37)


MLP_ARGS = ("--head", "mlp", "--hidden", "32", "--epochs", "30", "--lr", "1e-2", "--no-plots")


@pytest.fixture(scope="module")
def plain_run(cache, tmp_path_factory) -> dict:
    return fit(cache, tmp_path_factory.mktemp("plain") / "run", *MLP_ARGS)


def test_fit_head_balanced_mlp_raises_balanced_accuracy(cache, plain_run, tmp_path):
    s = fit(cache, tmp_path / "run", *MLP_ARGS, "--class-weight", "balanced")
    assert s["config"]["class_weight"] == "balanced"
    assert s["test_per_class"]["class1"]["recall"] > plain_run["test_per_class"]["class1"]["recall"] + 0.3
    assert s["test_balanced_accuracy"] > plain_run["test_balanced_accuracy"] + 0.08


def test_fit_head_a_class_weight_pair_changes_the_result(cache, plain_run, tmp_path):
    """class1=5 (of a 9:1 imbalance): the threshold moves most of the way to balanced's."""
    s = fit(cache, tmp_path / "run", *MLP_ARGS, "--class-weight", "class1=5")
    assert s["test_per_class"]["class1"]["recall"] > plain_run["test_per_class"]["class1"]["recall"] + 0.2
    assert s["val_loss"] != pytest.approx(plain_run["val_loss"], rel=1e-3)


def test_fit_head_cv_with_class_weights_ranks_folds_and_refits_the_winner(cache, tmp_path):
    s = fit(cache, tmp_path / "run", "--head", "mlp", "--hidden", "16", "--lr", "1e-3,1e-2", "--cv", "3",
            "--epochs", "6", "--patience", "3", "--class-weight", "balanced")
    rows = s["leaderboard"]
    assert len(rows) == 2 and s["config"]["class_weight"] == "balanced"
    for r in rows:
        assert r["status"] == "ok" and r["cv_folds"] == 3 and len(r["fold_accuracies"]) == 3
        assert r["cv_accuracy_mean"] is not None and np.isfinite(r["cv_loss_mean"])
    assert rows[0]["refit_rows"] == s["n_train"] == 1000 and s["test_balanced_accuracy"] is not None
