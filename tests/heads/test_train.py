"""Head training on in-memory features: accuracy, early stopping + restore, stacked == alone,
dropout masks, regularisation, and data preparation (splits, standardisation)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featcache.pipeline.heads.metrics import score
from featcache.pipeline.heads.stacked import StackedHead
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_group, train_many


def blobs(n_per: int, d: int = 8, sep: float = 1.0, seed: int = 0, flip: float = 0.0):
    """Three Gaussian classes; ``flip`` relabels that fraction at random (label noise -> overfitting)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, d, generator=torch.Generator().manual_seed(1234)) * sep
    X = torch.cat([centers[c] + torch.randn(n_per, d, generator=g) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n_per)
    if flip:
        mask = torch.rand(len(y), generator=g) < flip
        y = torch.where(mask, torch.randint(0, 3, (len(y),), generator=g), y)
    return X, y


@pytest.fixture(scope="module")
def noisy():
    """A problem that overfits: label noise in train, clean validation."""
    X, y = blobs(20, sep=1.0, seed=0, flip=0.2)
    Xv, yv = blobs(10, sep=1.0, seed=1)
    return X, y, Xv, yv


# ---- accuracy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    HeadParams(hidden=(), lr=0.05),
    HeadParams(hidden=(16,), dropout=0.2, lr=0.01),
    HeadParams(hidden=(16, 8), batchnorm=True, lr=0.01),
    HeadParams(hidden=(), optimizer="sgd", lr=0.1, momentum=0.9),
    HeadParams(hidden=(16,), optimizer="adamw", lr=0.01, weight_decay=0.01),
])
def test_separable_problem_reaches_high_accuracy(params):
    X, y = blobs(30, sep=4.0, seed=2)
    Xv, yv = blobs(15, sep=4.0, seed=3)
    (res,) = train_many([params], data=TrainData(X, y, 3, Xv, yv), settings=TrainSettings(epochs=40, batch_size=32, patience=10))
    assert score(res.head, Xv, yv)["accuracy"] >= 0.95
    assert score(res.head, X, y)["accuracy"] >= 0.95
    assert not res.head.training


# ---- early stopping ----------------------------------------------------------------------------

def test_early_stopping_stops_and_restores_best(noisy):
    X, y, Xv, yv = noisy
    patience, epochs = 5, 80
    (res,) = train_group([HeadParams(hidden=(32,), lr=0.05)], data=TrainData(X, y, 3, Xv, yv),
                         settings=TrainSettings(epochs=epochs, batch_size=16, patience=patience))
    epochs_run = len(res.history)
    assert res.best_epoch < epochs_run < epochs  # it stopped early
    assert epochs_run == res.best_epoch + patience
    val_losses = [h["val_loss"] for h in res.history]
    assert [h["epoch"] for h in res.history] == list(range(1, epochs_run + 1))
    assert min(val_losses) == val_losses[res.best_epoch - 1]
    restored = score(res.head, Xv, yv)["loss"]
    assert restored == pytest.approx(val_losses[res.best_epoch - 1], rel=1e-4, abs=1e-6)
    assert restored < val_losses[-1] - 1e-4  # the last epoch's weights were not kept
    for h in res.history:
        assert set(h) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"}


def test_without_validation_or_patience_every_epoch_runs(noisy):
    X, y, Xv, yv = noisy
    p = [HeadParams(hidden=(8,), lr=0.05)]
    (no_val,) = train_group(p, data=TrainData(X, y, 3, None, None), settings=TrainSettings(epochs=12, batch_size=16, patience=2))
    assert len(no_val.history) == 12 and no_val.best_epoch == 12
    assert "val_loss" not in no_val.history[0]
    (no_patience,) = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=TrainSettings(epochs=12, batch_size=16, patience=0))
    assert len(no_patience.history) == 12 and no_patience.best_epoch == 12


def test_training_is_seeded_and_reproducible(noisy):
    X, y, Xv, yv = noisy
    p = [HeadParams(hidden=(16,), dropout=0.3, lr=0.02, seed=4)]
    s = TrainSettings(epochs=10, batch_size=16, patience=3)
    a = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=s)[0]
    b = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=s)[0]
    assert a.history == b.history and a.best_epoch == b.best_epoch
    for (ka, va), (kb, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (other,) = train_group([HeadParams(hidden=(16,), dropout=0.3, lr=0.02, seed=5)], data=TrainData(X, y, 3, Xv, yv), settings=s)
    assert other.history != a.history


# ---- stacked == alone --------------------------------------------------------------------------

def _assert_same_result(stacked, alone):
    assert stacked.params == alone.params
    assert stacked.best_epoch == alone.best_epoch
    assert len(stacked.history) == len(alone.history)
    for hs, ha in zip(stacked.history, alone.history):
        assert hs.keys() == ha.keys()
        for key in hs:
            assert hs[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-5), (key, hs["epoch"])
    sd_s, sd_a = stacked.head.state_dict(), alone.head.state_dict()
    assert sd_s.keys() == sd_a.keys()
    for key in sd_s:
        torch.testing.assert_close(sd_s[key], sd_a[key], rtol=1e-4, atol=1e-5, msg=key)


GROUPS = {
    "linear-adam": [HeadParams(lr=lr, weight_decay=wd, l1=l1) for lr, wd, l1 in
                    [(0.05, 0.0, 0.0), (0.01, 1e-2, 0.0), (0.05, 0.0, 1e-3), (0.2, 1e-3, 0.0)]],
    "mlp-adam": [HeadParams(hidden=(32,), lr=lr, weight_decay=wd) for lr, wd in [(0.05, 0.0), (0.02, 1e-3), (0.005, 0.0)]],
    "mlp-bn-sgd": [HeadParams(hidden=(16, 8), batchnorm=True, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=wd)
                   for lr, wd in [(0.02, 0.01), (0.05, 0.0)]],
    "sgd-momentum": [HeadParams(hidden=(16,), optimizer="sgd", lr=lr, momentum=m, weight_decay=1e-3)
                     for lr, m in [(0.1, 0.9), (0.05, 0.5), (0.2, 0.0)]],
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_batched_configs_equal_each_trained_alone(noisy, group):
    X, y, Xv, yv = noisy
    params = GROUPS[group]
    settings = TrainSettings(epochs=40, batch_size=16, patience=4)
    stacked = train_group(params, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    assert [r.params for r in stacked] == params
    for p, s in zip(params, stacked):
        (alone,) = train_group([p], data=TrainData(X, y, 3, Xv, yv), settings=settings)
        _assert_same_result(s, alone)
    # the heads really are different configurations (not one head copied K times)
    assert len({tuple(round(h["train_loss"], 6) for h in r.history) for r in stacked}) == len(params)


def test_batched_batchnorm_adamw_configs_equal_each_trained_alone(noisy):
    X, y, Xv, yv = noisy
    params = [HeadParams(hidden=(16, 8), batchnorm=True, optimizer="adamw", lr=lr, weight_decay=wd)
              for lr, wd in [(0.02, 0.01), (0.05, 0.0)]]
    settings = TrainSettings(epochs=40, batch_size=16, patience=4)
    stacked = train_group(params, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    for p, s in zip(params, stacked):
        _assert_same_result(s, train_group([p], data=TrainData(X, y, 3, Xv, yv), settings=settings)[0])


def test_train_many_mixed_groups_keeps_order_and_equals_alone(noisy):
    X, y, Xv, yv = noisy
    params = [HeadParams(lr=0.05), HeadParams(hidden=(8,), lr=0.02), HeadParams(lr=0.01),
              HeadParams(hidden=(8,), optimizer="sgd", lr=0.1, momentum=0.9), HeadParams(hidden=(8,), lr=0.05)]
    settings = TrainSettings(epochs=25, batch_size=16, patience=4)
    results = train_many(params, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    assert [r.params for r in results] == params
    for p, r in zip(params, results):
        _assert_same_result(r, train_many([p], data=TrainData(X, y, 3, Xv, yv), settings=settings)[0])


# ---- dropout, regularisation, heads ------------------------------------------------------------

def test_dropout_configs_draw_different_masks():
    torch.manual_seed(0)
    head = StackedHead(8, (64,), 3, seeds=[0, 0, 0], dropout=torch.tensor([0.5, 0.5, 0.0]))
    head.generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8)
    head.eval()
    out_eval = head(x)
    torch.testing.assert_close(out_eval[0], out_eval[1])  # same seed, same weights: identical in eval
    torch.testing.assert_close(out_eval[0], out_eval[2])
    head.train()
    out = head(x)
    assert not torch.allclose(out[0], out[1])  # same rate, but each head draws its own mask
    torch.testing.assert_close(out[2], out_eval[2])  # dropout 0 is the identity
    assert not torch.allclose(head(x)[0], out[0])  # a new mask every forward


def test_dropout_mask_rate_and_scaling():
    head = StackedHead(4, (2000,), 2, seeds=[1], dropout=torch.tensor([0.3]))
    head.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weights[1].fill_(1.0)  # logits = sum of the hidden units after dropout
        head.biases[0].fill_(1.0)
        head.weights[0].zero_()
        head.biases[1].zero_()
    head.train()
    out = head(torch.zeros(1, 4))  # every hidden unit is relu(1) = 1 before dropout
    assert out[0, 0, 0].item() == pytest.approx(2000, rel=0.06)  # inverted dropout keeps the expectation


def test_the_dropout_flag_is_a_plain_bool_kept_in_step_with_the_stack():
    """forward tests a Python bool, not the (K,) buffer (a device sync per step on a GPU); the flag
    follows the buffer when heads leave the stack."""
    from featcache.pipeline.heads.train import _drop_stopped, _optimizer

    head = StackedHead(4, (8,), 3, seeds=[0, 1], dropout=torch.tensor([0.5, 0.0]))
    assert head.has_dropout is True
    hp = {n: torch.tensor([0.01, 0.01]) for n in ("lr", "weight_decay", "momentum", "l1")}
    _drop_stopped(head, _optimizer(head, "adam", hp), hp, torch.tensor([1]))  # the dropout head stops
    assert head.has_dropout is False and head.k == 1
    head.train()
    head.generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4)
    out = head(x)
    head.eval()
    torch.testing.assert_close(out, head(x))  # no dropout drawn any more
    assert StackedHead(4, (8,), 3, seeds=[0]).has_dropout is False


def test_a_training_forward_with_dropout_does_not_sync_the_gpu(cuda_device):
    head = StackedHead(8, (16,), 3, seeds=[0, 1], dropout=torch.tensor([0.3, 0.0])).to(cuda_device)
    head.generator = torch.Generator(device=cuda_device).manual_seed(0)
    head.train()
    x = torch.randn(32, 8, device=cuda_device)
    mask = torch.ones(2, 32, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        head(x).sum().backward()
        head(x, mask).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_masked_batch_norm_normalises_each_head_over_its_own_rows_only():
    torch.manual_seed(0)
    head = StackedHead(6, (5,), 3, seeds=[0, 1], batchnorm=True)
    head.train()
    x = torch.randn(12, 6)
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0.0  # head 1 trains on rows 0..6 only
    h = torch.matmul(x, head.weights[0].detach())  # (2, 12, 5): the pre-batch-norm activations
    out = head._masked_batch_norm(h, 0, mask)
    ref0 = F.batch_norm(h[0], torch.zeros(5), torch.ones(5), training=True, momentum=0.1, eps=1e-5)
    rm, rv = torch.zeros(5), torch.ones(5)
    ref1 = F.batch_norm(h[1, :7], rm, rv, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out[0], ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :7], ref1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.bn_mean0[1], rm, rtol=1e-5, atol=1e-6)  # running statistics too
    torch.testing.assert_close(head.bn_var0[1], rv, rtol=1e-5, atol=1e-6)


def test_a_subset_of_heads_is_the_same_slice_of_the_whole_stack_in_eval_mode():
    head = StackedHead(6, (5,), 3, seeds=[0, 1, 2, 3], batchnorm=True)
    head.set_input_stats(torch.randn(4, 6), torch.rand(4, 6) + 0.5)
    head.eval()
    x = torch.randn(9, 6)
    pick = torch.tensor([3, 1])
    torch.testing.assert_close(head(x, heads=pick), head(x)[pick])
    for k in range(4):  # the batch-transform forward == the exported head with the statistics folded in
        torch.testing.assert_close(head.to_sequential(k)(x), head(x)[k], rtol=1e-5, atol=1e-5)
    head.train()
    with pytest.raises(ValueError, match="heads"):
        head(x, heads=pick)


def test_decay_parameters_are_weights_only():
    head = StackedHead(5, (4, 3), 2, seeds=[0, 1], batchnorm=True)
    decay = {id(p) for p in head.decay_parameters()}
    assert decay == {id(w) for w in head.weights}
    other = {id(p) for p in head.other_parameters()}
    assert not decay & other
    # biases of Linear layers followed by batch norm are dropped (mean subtraction cancels them)
    pre_bn = {id(head.biases[0]), id(head.biases[1])}
    assert decay | other == {id(p) for p in head.parameters()} - pre_bn
    assert id(head.biases[2]) in other


def test_weight_decay_and_l1_shrink_weights(noisy):
    X, y, Xv, yv = noisy
    params = [HeadParams(lr=0.05, weight_decay=0.0), HeadParams(lr=0.05, weight_decay=0.5),
              HeadParams(lr=0.05, weight_decay=0.0, l1=0.05)]
    res = train_group(params, data=TrainData(X, y, 3, Xv, yv), settings=TrainSettings(epochs=30, batch_size=16, patience=0))
    norm = [r.history[-1]["weight_norm"] for r in res]
    assert norm[1] < 0.7 * norm[0]
    assert norm[2] < 0.7 * norm[0]
    w_plain = res[0].head[0].weight.abs()
    w_l1 = res[2].head[0].weight.abs()
    assert (w_l1 < 1e-2).float().mean() > (w_plain < 1e-2).float().mean()  # L1 pushes weights to zero


def test_to_sequential_matches_the_stack_in_eval_mode(noisy):
    X, y, Xv, yv = noisy
    params = [HeadParams(hidden=(16, 8), batchnorm=True, dropout=d, lr=0.02) for d in (0.0, 0.3)]
    res = train_group(params, data=TrainData(X, y, 3, Xv, yv), settings=TrainSettings(epochs=5, batch_size=16, patience=0))
    for r in res:
        kinds = [type(m).__name__ for m in r.head]
        assert kinds.count("BatchNorm1d") == 2 and kinds.count("Linear") == 3
        assert r.head[0].in_features == X.shape[1] and r.head[-1].out_features == 3
    # the saved-head shape is rebuilt from metadata alone
    from featcache.pipeline.heads.stacked import build_sequential

    empty = build_sequential(X.shape[1], (16, 8), 3, True, 0.3)
    empty.load_state_dict(res[1].head.state_dict())
    torch.testing.assert_close(empty.eval()(Xv), res[1].head(Xv))


# ---- preparing features --------------------------------------------------------------------------

def _fake_cache(features, labels, split, class_names=("a", "b", "c")):
    from featcache.cache.store import FeatureCache

    n = len(labels)
    return FeatureCache(path=Path("mem.h5"), attrs={"class_names": list(class_names), "fingerprint": "x"},
                        labels=np.asarray(labels, np.int64), paths=[f"p{i}" for i in range(n)],
                        split=np.asarray(split, dtype=object), features=np.asarray(features, np.float32))


def test_prepare_standardizes_with_train_rows_only():
    from featcache.pipeline.heads.data import prepare

    rng = np.random.default_rng(0)
    n = 30
    feats = rng.normal(5.0, 3.0, (n, 4))
    feats[20:] += 100.0  # val/test rows far away: must not leak into the statistics
    feats[:, 3] = 7.0  # a constant feature stays finite
    labels = [i % 3 for i in range(n)]
    split = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    data = prepare(_fake_cache(feats, labels, split), 0.2, 0, True, torch.device("cpu"))
    assert data.val_source == "cache"
    np.testing.assert_allclose(data.mean[:3], feats[:20, :3].mean(0), rtol=1e-5)
    np.testing.assert_allclose(data.scale[:3], feats[:20, :3].std(0), rtol=1e-5)
    Xtr, _ = data.split("train")
    torch.testing.assert_close(Xtr[:, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.isfinite(data.X).all()
    raw = prepare(_fake_cache(feats, labels, split), 0.2, 0, False, torch.device("cpu"))
    assert raw.mean is None and torch.equal(raw.X, torch.as_tensor(feats, dtype=torch.float32))


def test_prepare_holds_out_a_stratified_seeded_validation_split():
    from featcache.pipeline.heads.data import prepare

    n = 40
    labels = [0] * 20 + [1] * 10 + [2] * 10
    cache = _fake_cache(np.zeros((n, 2)), labels, ["train"] * n)
    a = prepare(cache, 0.25, 0, False, torch.device("cpu"))
    assert len(a.rows["val"]) == 10 and len(a.rows["train"]) == 30
    assert not set(a.rows["val"]) & set(a.rows["train"])
    val_labels = np.asarray(labels)[a.rows["val"]]
    assert np.bincount(val_labels).tolist() == [5, 3, 2] or np.bincount(val_labels).tolist() == [5, 2, 3]
    b = prepare(cache, 0.25, 0, False, torch.device("cpu"))
    assert a.rows["val"].tolist() == b.rows["val"].tolist()  # seeded
    c = prepare(cache, 0.25, 1, False, torch.device("cpu"))
    assert a.rows["val"].tolist() != c.rows["val"].tolist()


def test_prepare_rejects_a_single_class():
    from featcache.pipeline.errors import FeatcacheError
    from featcache.pipeline.heads.data import prepare

    cache = _fake_cache(np.zeros((6, 2)), [0] * 6, ["train"] * 6, class_names=("only",))
    with pytest.raises(FeatcacheError, match="at least two classes"):
        prepare(cache, 0.2, 0, False, torch.device("cpu"))


def test_prepare_rejects_unlabeled_only_cache_clearly():
    from featcache.pipeline.errors import FeatcacheError
    from featcache.pipeline.heads.data import prepare

    cache = _fake_cache(np.zeros((6, 2)), [-1] * 6, ["train"] * 6, class_names=())
    with pytest.raises(FeatcacheError, match="at least two classes"):
        prepare(cache, 0.2, 0, False, torch.device("cpu"))


def test_training_on_cuda_matches_cpu(cuda_device, noisy):
    X, y, Xv, yv = noisy
    p = [HeadParams(hidden=(16,), lr=0.02)]
    s = TrainSettings(epochs=8, batch_size=16, patience=0)
    (cpu,) = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=s)
    on_gpu = TrainData(X.to(cuda_device), y.to(cuda_device), 3, Xv.to(cuda_device), yv.to(cuda_device))
    (gpu,) = train_group(p, data=on_gpu, settings=s)
    assert next(gpu.head.parameters()).device.type == "cpu"  # results come back on the CPU
    for a, b in zip(cpu.history, gpu.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-4)


def test_batchnorm_with_batch_size_one_does_not_silently_skip_training(noisy):
    X, y, Xv, yv = noisy
    p = HeadParams(hidden=(8,), batchnorm=True, lr=0.05)
    try:
        (res,) = train_group([p], data=TrainData(X, y, 3, Xv, yv), settings=TrainSettings(epochs=3, batch_size=1, patience=0))
    except Exception as e:  # refusing clearly is fine too
        assert "batch" in str(e).lower()
        return
    initial = StackedHead(X.shape[1], (8,), 3, [p.seed], batchnorm=True).weights[0][0].T  # same seeded init
    assert not torch.allclose(res.head[0].weight, initial), "three epochs and not a single update"


# ---- diverged configurations -------------------------------------------------------------------

def test_a_head_whose_loss_overflows_is_failed_and_leaves_the_others_alone(noisy):
    X, y, Xv, yv = noisy
    good, huge = HeadParams(lr=0.05), HeadParams(lr=1e30)
    s = TrainSettings(epochs=12, batch_size=16, patience=3)
    a, b = train_group([good, huge], data=TrainData(X, y, 3, Xv, yv), settings=s)
    assert b.failed and not a.failed
    last = b.history[-1]
    assert not (np.isfinite(last["train_loss"]) and np.isfinite(last["weight_norm"]))  # diverged there
    assert len(b.history) < 12  # and stopped
    _assert_same_result(a, train_group([good], data=TrainData(X, y, 3, Xv, yv), settings=s)[0])
    (c,) = train_group([huge], data=TrainData(X, y, 3), settings=TrainSettings(epochs=5, batch_size=16, patience=0))
    assert c.failed  # without validation too
