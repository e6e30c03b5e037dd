"""An MLP CV stack's batches gathered per row set (masks.BatchRows) and its first layer by runs of
heads (stacked._RunMatmul): the same training as shared masked batches, fewer rows computed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import featcache.pipeline.heads.train as train_mod
from featcache.pipeline.heads.cv import fold_splits
from featcache.pipeline.heads.masks import HeadTask, row_sets
from featcache.pipeline.heads.stacked import StackedHead, _RunMatmul
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many


def _problem(n: int = 90, d: int = 6):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    return torch.randn(3, d, generator=g)[y] * 1.5 + torch.randn(n, d, generator=g) * 4.0 + 2.0, y


def test_gathered_rows_are_each_sets_own_rows_of_the_batch_then_zero_weight_padding():
    n, bs = 50, 16
    sets = [np.sort(np.random.default_rng(s).choice(n, 35, replace=False)) for s in range(3)]
    tasks = [HeadTask(HeadParams(), rows=r) for r in sets for _ in range(2)]
    rs = row_sets(tasks, n, torch.device("cpu"))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    plan = rs.gathered(perm, bs, rs.of_head)
    assert plan.groups == [0, 0, 1, 1, 2, 2]
    for step, s in enumerate(range(0, n, bs)):
        batch = perm[s: s + bs].tolist()
        rows, mask = plan.step(step)
        counts = [len(set(batch) & set(r.tolist())) for r in sets]
        assert rows.shape == (3, max(counts)) and max(counts) <= len(batch)
        for g, r in enumerate(sets):
            mine = [i for i in batch if i in set(r.tolist())]  # in batch order
            assert rows[g, :counts[g]].tolist() == mine
            assert set(rows[g].tolist()) <= set(batch)  # padding: other rows of the same batch
            assert mask[2 * g].tolist() == [1.0] * counts[g] + [0.0] * (max(counts) - counts[g])


@pytest.mark.parametrize("params", [HeadParams(hidden=(8,), lr=0.02),
                                    HeadParams(hidden=(8,), batchnorm=True, optimizer="adamw", lr=0.02)],
                         ids=["mlp", "mlp-batchnorm"])
def test_gathered_mlp_cv_stack_trains_as_with_shared_masked_batches(monkeypatch, params):
    X, y = _problem()
    folds = fold_splits(y.numpy(), 3, seed=2)
    tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for tr, ho in folds
             for p in (params, HeadParams(**{**params.__dict__, "lr": 0.005}))]
    s = TrainSettings(epochs=6, batch_size=16, patience=0)
    widths = []
    real_forward = StackedHead.forward

    def spy(self, x, mask=None, heads=None, groups=None):
        if self.training:
            widths.append((x.dim(), x.shape[-2]))
        return real_forward(self, x, mask, heads, groups)

    monkeypatch.setattr(StackedHead, "forward", spy)
    gathered = train_many(tasks, data=TrainData(X, y, 3, X, y), settings=s)
    assert {d for d, _ in widths} == {3} and max(w for _, w in widths) < 16  # every step gathered, narrower
    real = train_mod._batches
    monkeypatch.setattr(train_mod, "_batches", lambda *a, **kw: real(*a, **{**kw, "gather": False}))
    widths.clear()
    shared = train_many(tasks, data=TrainData(X, y, 3, X, y), settings=s)
    assert {d for d, _ in widths} == {2}
    for a, b in zip(gathered, shared):
        assert len(a.history) == len(b.history)
        for ha, hb in zip(a.history, b.history):
            for key in ha:
                assert ha[key] == pytest.approx(hb[key], rel=1e-4, abs=1e-5), key
        for (name, va), vb in zip(a.head.state_dict().items(), b.head.state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=name)


def test_run_matmul_equals_per_run_products_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    runs = [(0, 3), (3, 4), (4, 7)]  # unequal runs
    xs = [torch.randn(5, 6, generator=g) for _ in runs]
    w = torch.randn(7, 6, 4, generator=g, requires_grad=True)
    grad = torch.randn(7, 5, 4, generator=g)
    out = _RunMatmul.apply(w, runs, *xs)
    (gw,) = torch.autograd.grad(out, w, grad)
    ref = torch.cat([torch.matmul(x, w[a:b]) for (a, b), x in zip(runs, xs)])
    (gref,) = torch.autograd.grad(ref, w, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gw, gref)


def test_run_matmul_gives_its_inputs_their_gradient_when_asked():
    """Training never asks (rows take no gradient), but StackedHead is a module: an input that
    requires a gradient gets the sum over its run's heads, as torch.matmul's would be."""
    g = torch.Generator().manual_seed(1)
    runs = [(0, 2), (2, 5)]
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in runs]
    w = torch.randn(5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_, *x: _RunMatmul.apply(w_, runs, *x), (w, *xs))
