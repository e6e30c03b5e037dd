"""StackedOptimizer: K stacked heads, each with its own lr / weight decay / momentum, must update
exactly like torch.optim would update each head alone (weight decay on weights, never on biases)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featcache.pipeline.heads.optim import StackedOptimizer

D, C, B, STEPS = 6, 3, 16, 25


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, D, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, C, (B,), generator=g) for _ in range(STEPS)]
    w = torch.randn(D, C, generator=g) * 0.5
    b = torch.randn(C, generator=g) * 0.5
    return xs, ys, w, b


def _torch_opt(kind, params_w, params_b, lr, wd, momentum):
    groups = [{"params": [params_w], "weight_decay": wd}, {"params": [params_b], "weight_decay": 0.0}]
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, foreach=False)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=False)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=False)


CASES = [
    ("adam", 1e-2, 0.0, 0.0),
    ("adam", 3e-2, 0.1, 0.0),
    ("adamw", 1e-2, 0.0, 0.0),
    ("adamw", 3e-2, 0.5, 0.0),
    ("sgd", 0.1, 0.0, 0.0),
    ("sgd", 0.1, 0.01, 0.9),
    ("sgd", 0.05, 0.2, 0.5),
]


@pytest.mark.parametrize("kind, lr, wd, momentum", CASES)
def test_k1_matches_torch_optim_step_for_step(kind, lr, wd, momentum):
    xs, ys, w0, b0 = _data()
    # reference: plain tensors with torch.optim
    w_ref = w0.clone().requires_grad_(True)
    b_ref = b0.clone().requires_grad_(True)
    ref = _torch_opt(kind, w_ref, b_ref, lr, wd, momentum)
    # stacked: (K=1, D, C) and (K=1, C)
    w_st = torch.nn.Parameter(w0.clone()[None])
    b_st = torch.nn.Parameter(b0.clone()[None])
    opt = StackedOptimizer([w_st], [b_st], kind, torch.tensor([lr]), torch.tensor([wd]), torch.tensor([momentum]))
    for step, (x, y) in enumerate(zip(xs, ys)):
        ref.zero_grad()
        F.cross_entropy(x @ w_ref + b_ref, y).backward()
        ref.step()
        opt.zero_grad()
        F.cross_entropy((torch.matmul(x, w_st) + b_st[:, None, :])[0], y).backward()
        opt.step()
        torch.testing.assert_close(w_st.detach()[0], w_ref.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, step=step: f"{kind} weights differ at step {step + 1}: {m}")
        torch.testing.assert_close(b_st.detach()[0], b_ref.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, step=step: f"{kind} biases differ at step {step + 1}: {m}")
    assert not torch.equal(w_st.detach()[0], w0)  # it did move


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_k_heads_match_k_separate_torch_optimizers(kind):
    """Three heads with different lr / weight decay / momentum in one stack = three torch optimizers."""
    xs, ys, w0, b0 = _data(1)
    hps = [(1e-2, 0.0, 0.9), (5e-2, 0.3, 0.5), (2e-2, 1.0, 0.0)]
    k = len(hps)
    g = torch.Generator().manual_seed(3)
    w_init = torch.randn(k, D, C, generator=g)
    b_init = torch.randn(k, C, generator=g)
    refs = []
    for j, (lr, wd, mom) in enumerate(hps):
        w = w_init[j].clone().requires_grad_(True)
        b = b_init[j].clone().requires_grad_(True)
        refs.append((w, b, _torch_opt(kind, w, b, lr, wd, mom)))
    w_st = torch.nn.Parameter(w_init.clone())
    b_st = torch.nn.Parameter(b_init.clone())
    opt = StackedOptimizer([w_st], [b_st], kind, torch.tensor([h[0] for h in hps]),
                           torch.tensor([h[1] for h in hps]), torch.tensor([h[2] for h in hps]))
    for x, y in zip(xs, ys):
        for w, b, o in refs:
            o.zero_grad()
            F.cross_entropy(x @ w + b, y).backward()
            o.step()
        opt.zero_grad()
        logits = torch.matmul(x, w_st) + b_st[:, None, :]  # (K, B, C)
        losses = F.cross_entropy(logits.reshape(-1, C), y.repeat(k), reduction="none").view(k, -1).mean(1)
        losses.sum().backward()
        opt.step()
    for j, (w, b, _) in enumerate(refs):
        torch.testing.assert_close(w_st.detach()[j], w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_st.detach()[j], b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_weight_decay_only_on_weights(kind):
    """With zero gradients, decay shrinks weights and leaves biases exactly as they were."""
    w = torch.nn.Parameter(torch.ones(2, 3, 4))
    b = torch.nn.Parameter(torch.full((2, 4), 0.7))
    opt = StackedOptimizer([w], [b], kind, torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0]))
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        b.grad = torch.zeros_like(b)
        opt.step()
    assert torch.equal(b.detach(), torch.full((2, 4), 0.7))  # biases: no decay
    assert torch.equal(w.detach()[0], torch.ones(3, 4))  # head 0 has weight_decay 0
    assert (w.detach()[1] < 1).all()  # head 1 decays
    if kind == "adamw":
        torch.testing.assert_close(w.detach()[1], torch.full((3, 4), (1 - 0.1 * 0.5) ** 3))
    if kind == "sgd":
        torch.testing.assert_close(w.detach()[1], torch.full((3, 4), (1 - 0.1 * 0.5) ** 3))


def test_unknown_kind_rejected():
    w = torch.nn.Parameter(torch.ones(1, 2, 2))
    with pytest.raises(ValueError):
        StackedOptimizer([w], [], "rmsprop", torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.0]))


def test_zero_grad_and_missing_grads():
    w = torch.nn.Parameter(torch.ones(1, 2, 2))
    b = torch.nn.Parameter(torch.zeros(1, 2))
    opt = StackedOptimizer([w], [b], "adam", torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.0]))
    w.grad = torch.ones_like(w)
    opt.step()  # b has no gradient: skipped, not crashed
    assert torch.equal(b.detach(), torch.zeros(1, 2))
    assert (w.detach() < 1).all()
    opt.zero_grad()
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize("kind, lr, wd, momentum", [("adam", 3e-2, 0.1, 0.0), ("adamw", 3e-2, 0.5, 0.0),
                                                    ("sgd", 0.1, 0.01, 0.9)])
def test_a_head_that_sits_out_a_step_matches_torch_optim_skipping_it(kind, lr, wd, momentum):
    """step(active=...): head 1 takes only the odd steps (its rows were absent from the others),
    exactly a torch optimizer that steps there only (own step count for Adam's bias correction)."""
    xs, ys, w0, b0 = _data(2)
    refs = []
    for _ in range(2):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        refs.append((w, b, _torch_opt(kind, w, b, lr, wd, momentum)))
    w_st = torch.nn.Parameter(torch.stack([w0, w0]))
    b_st = torch.nn.Parameter(torch.stack([b0, b0]))
    opt = StackedOptimizer([w_st], [b_st], kind, torch.tensor([lr, lr]), torch.tensor([wd, wd]),
                           torch.tensor([momentum, momentum]))
    for step, (x, y) in enumerate(zip(xs, ys)):
        on = torch.tensor([True, step % 2 == 1])
        for j, (w, b, o) in enumerate(refs):
            if on[j]:
                o.zero_grad()
                F.cross_entropy(x @ w + b, y).backward()
                o.step()
        opt.zero_grad()
        logits = torch.matmul(x, w_st) + b_st[:, None, :]  # (2, B, C)
        losses = torch.stack([F.cross_entropy(logits[j], y) for j in range(2)]) * on  # head 1's rows absent
        losses.sum().backward()
        before = w_st.detach()[1].clone()
        opt.step(None if bool(on.all()) else on)
        if not on[1]:
            assert torch.equal(w_st.detach()[1], before)  # weight decay and momentum do not move it either
    for j, (w, b, _) in enumerate(refs):
        torch.testing.assert_close(w_st.detach()[j], w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_st.detach()[j], b.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_st.detach()[0], w_st.detach()[1])  # the two heads did differ
