"""The exact probe's L-BFGS loop reads the device rarely (GPU-readiness issue, item 4).

On a GPU every device-to-host read stalls the queue until all queued work is done: ``.item()``,
``.tolist()``, ``.cpu()``, ``bool(t)`` (``if t.any():``), ``float(t)``, ``int(t)``, and
``nonzero`` or a boolean-mask index, whose output size the device must report first; so does a
tensor made from host data (a host-to-device copy from pageable memory). On the CPU they cost
nothing, so they are counted here instead of timed: wrappers on those torch calls count what runs
while exact.lbfgs runs (its loss calls included), per L-BFGS iteration (the loop steps a block's
heads together: the most iterations any of them took). torch.cuda.set_sync_debug_mode would
flag them on a GPU, but only there.

Before the change (measured on these problems): 7.5-9 syncs per iteration (stop flags, the line
search's all-accepted test, mask indexing of pending heads, two more flag reads, an index copy to
the device every iteration). After: 2 per iteration (one read of the flags that decide which heads
step, one of the line search's and the done test's), plus a few per block (eigh checks, the
returned f).
"""
from __future__ import annotations

import collections
import itertools
import sys
import weakref
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from featcache.pipeline.heads import exact
from featcache.pipeline.heads import lbfgs as lbfgs_mod
from featcache.pipeline.heads.exact import fit_exact, fit_exact_folds

MAX_PER_ITER = 3  # host syncs per L-BFGS iteration, block overheads included (the old loop made ~8)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _problem(n_classes: int, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(size=(n, d)) + 0.6 * rng.normal(size=(n_classes, d))[y]
    return torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y)


def _folds(n: int, k: int = 5) -> np.ndarray:
    return (np.arange(n)[None] % k != np.arange(k)[:, None]).astype(float)


class _Count:
    """Syncs by kind (and where), iterations and calls of exact.lbfgs."""

    def __init__(self):
        self.on, self.kinds, self.where = False, collections.Counter(), collections.Counter()
        self.iterations = self.calls = 0

    def hit(self, kind: str, depth: int = 2) -> None:
        if self.on:
            self.kinds[kind] += 1
            frame = sys._getframe(depth)
            self.where[f"{kind} {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"] += 1

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def per_iteration(self) -> float:
        return self.total / max(1, self.iterations)


def _is_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextmanager
def _counting(monkeypatch):
    """Counts the syncs made while exact.lbfgs runs (one ``.cpu().numpy()`` is one read)."""
    c, last_cpu = _Count(), [lambda: None]

    def read(name, orig):
        def wrapper(self, *a, **kw):
            if name == "numpy" and last_cpu[0]() is self:  # the host copy .cpu() just made
                last_cpu[0] = lambda: None
            else:
                c.hit(name)
            out = orig(self, *a, **kw)
            if name == "cpu":
                last_cpu[0] = weakref.ref(out)
            return out
        return wrapper

    def counted(orig, kind):  # kind(*args): what the call costs, or None
        def wrapper(*a, **kw):
            if (k := kind(*a)) is not None:
                c.hit(k)
            return orig(*a, **kw)
        return wrapper

    def mask_index(self, index, *value):  # a boolean mask: a nonzero inside
        return "mask index" if _is_mask(index) else None

    def from_host(data, *a):  # a tensor of host data: a host-to-device copy on a GPU
        return None if isinstance(data, torch.Tensor) else "host-to-device"

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, read(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), mask_index))
    for owner, name in ((torch, "nonzero"), (torch.Tensor, "nonzero"), (torch, "argwhere"), (torch, "masked_select")):
        monkeypatch.setattr(owner, name, counted(getattr(owner, name), lambda *a, _n=name: _n))
    for name in ("as_tensor", "tensor"):
        monkeypatch.setattr(torch, name, counted(getattr(torch, name), from_host))
    real = exact.lbfgs

    def lbfgs(*a, **kw):
        c.on = True
        try:
            out = real(*a, **kw)
        finally:
            c.on = False
        c.calls += 1
        c.iterations += int(out[2].max())  # n_iter per head: the block's loop ran the most of them
        return out

    monkeypatch.setattr(exact, "lbfgs", lbfgs)
    yield c


CASES = {
    "multinomial": lambda: fit_exact([1e-3, 0.1, 10.0], *_problem(4, 400, 12), 4),
    "binary": lambda: fit_exact([1e-3, 0.1, 10.0], *_problem(2, 400, 12), 2),
    "rotated (grad_max)": lambda: fit_exact([0.05, 1.0], *_problem(4, 60, 64, seed=8), 4, block=1),
    "folds, fold statistics": lambda: fit_exact_folds([0.01, 0.3, 10.0], *_problem(3, 200, 12), 3, _folds(200),
                                                      fold_stats=True),
    # few rows for their columns: each fold on its own rows, in its own basis (exact._rotate_folds)
    "folds, own bases": lambda: fit_exact_folds([0.01, 0.3, 10.0], *_problem(3, 60, 72, seed=3), 3, _folds(60),
                                                fold_stats=True),
}


def _no_preconditioner(monkeypatch):  # scalar H0: its line searches backtrack
    monkeypatch.setattr(exact, "MAX_PRECOND_DIM", 0)
    return fit_exact([0.05, 2.0], *_problem(4, 300, 12, seed=5), 4)


@pytest.mark.parametrize("case", [*CASES, "no preconditioner"])
def test_at_most_a_few_host_syncs_per_iteration(monkeypatch, case):
    with _counting(monkeypatch) as c:
        results = _no_preconditioner(monkeypatch) if case == "no preconditioner" else CASES[case]()
    results = [r for row in results for r in (row if isinstance(row, list) else [row])]
    assert all(r.converged for r in results)
    assert c.iterations >= 15  # enough that the per-block syncs do not decide the average
    detail = f"{c.total} syncs in {c.iterations} iterations ({c.calls} blocks): {dict(c.kinds)}; {dict(c.where)}"
    assert c.per_iteration() <= MAX_PER_ITER, detail
    # no data-dependent shapes and no index copies to the device: rows are selected on the device
    assert not c.kinds.keys() & {"mask index", "nonzero", "argwhere", "masked_select", "host-to-device"}, detail


def test_no_sized_or_scalar_reads_inside_the_ops_either():
    """What the wrappers above cannot see: a scalar read or a nonzero inside an aten op (say
    repeat_interleave with tensor repeats, or a boolean index deep in a helper). The profiler
    lists every aten op; per iteration almost none may read a scalar (left: each block's eigh
    error checks) and none may call nonzero."""
    from torch.profiler import ProfilerActivity, profile

    real, ops, iterations = exact.lbfgs, collections.Counter(), []

    def lbfgs(*a, **kw):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = real(*a, **kw)
        ops.update(e.name for e in prof.events())
        iterations.append(int(out[2].max()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exact, "lbfgs", lbfgs)
        fit_exact([1e-3, 0.1, 10.0], *_problem(4, 400, 12), 4)
    assert sum(iterations) >= 15
    assert ops["aten::nonzero"] == 0
    assert ops["aten::_local_scalar_dense"] / sum(iterations) <= 0.5, dict(ops)  # the old loop: ~2 per iteration


@pytest.mark.parametrize("rare", ["steepest-descent fallback", "line search gives up"])
def test_rare_paths_still_solve(monkeypatch, rare):
    """The loop's rare branches, forced: a direction that is not a descent direction (falls back
    to -H0 g, same optimum), and a line search of one trial (heads that reject t = 1 stay put,
    drop their pairs, and stall for good once none are left)."""
    X, y = _problem(4, 300, 12, seed=5)
    cs = [0.05, 2.0]
    normal = fit_exact(cs, X, y, 4)
    if rare == "steepest-descent fallback":
        real, calls = lbfgs_mod._direction, itertools.count()

        def direction(g, hist, rows, h0):
            d = real(g, hist, rows, h0)
            if next(calls) % 4 == 1:
                d[0] = g[0]  # uphill for the first active head
            return d

        monkeypatch.setattr(lbfgs_mod, "_direction", direction)
    else:
        monkeypatch.setattr(lbfgs_mod, "MAX_LS", 1)
        monkeypatch.setattr(exact, "MAX_PRECOND_DIM", 0)
    forget, stalled = lbfgs_mod._forget_pairs, []
    monkeypatch.setattr(lbfgs_mod, "_forget_pairs", lambda *a: stalled.append(forget(*a)) or stalled[-1])
    with _counting(monkeypatch) as c:
        forced = fit_exact(cs, X, y, 4)
    assert not c.kinds.keys() & {"mask index", "nonzero", "host-to-device"}, dict(c.where)
    if rare == "line search gives up":  # the branch was taken, down to a head that stalled for good
        assert any(bool(s.any()) for s in stalled)
    for a, b in zip(forced, normal):
        assert a.n_iter >= 1 and np.isfinite(a.objective)
        assert abs(exact.objective(a.head, X, y, a.C) - a.objective) / a.objective < 1e-5
        if rare == "steepest-descent fallback":
            assert a.converged and abs(a.objective - b.objective) / b.objective < 1e-5
