"""Exact linear probe (featcache.pipeline.heads.exact) vs scikit-learn LogisticRegression(lbfgs).

    python bench/linear_probe.py [--cache demo-out/digits.h5] [--n 50000] [--dim 2048] [--block 2]

Prints the machine (CPU, cores, torch and numpy BLAS), which GEMM form of the gradient is faster
here, then for (a) a synthetic N x D, 10-class problem (hard: best val accuracy 70-90 %) and
(b) a real cache (the demo's by default, skipped with a note when absent): featcache's whole C path
against sklearn at the same C values, same split and standardisation. Per C: val accuracy and
final objective (one formula, exact.objective, for both); totals and sklearn's best-C fit time.
Target: path seconds < sklearn's best-C seconds, |val acc diff| <= 0.2 points and objective
within 1e-4 relative at every C.
"""
from __future__ import annotations

import argparse
import platform
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info

from featcache.pipeline.heads.exact import BLOCK, DEFAULT_C_PATH, fit_exact, objective
from featcache.pipeline.heads.logreg import MAX_ITER, to_linear


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    blas = re.findall(r"(?:BLAS_INFO|LAPACK_INFO|USE_MKL)=\w+", torch.__config__.show())
    np_blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')} threads={i['num_threads']}"
               for i in threadpool_info() if i["user_api"] == "blas"]
    return (f"CPU: {cpu}, {torch.get_num_threads()} torch threads, {len(__import__('os').sched_getaffinity(0))} "
            f"cores usable\ntorch {torch.__version__}: {' '.join(blas) or 'BLAS not reported'}\n"
            f"numpy BLAS (threadpoolctl): {'; '.join(np_blas)}")


def gemm_forms(n: int = 20000, d: int = 2048, k: int = 20) -> str:
    X, G = torch.randn(n, d), torch.randn(n, k)
    out = []
    for name, f in (("X.t() @ G", lambda: X.t() @ G), ("(G.t() @ X).t()", lambda: (G.t() @ X).t())):
        f()
        t0 = time.perf_counter()
        for _ in range(3):
            f()
        out.append(f"{name} {1e3 * (time.perf_counter() - t0) / 3:.0f} ms")
    return f"gradient GEMM, X {n}x{d}, G {n}x{k}: " + ", ".join(out)


def synthetic(n: int, d: int, k: int = 10, seed: int = 0):
    """Classes whose means differ in a 32-d latent subspace, mixed into d correlated features
    plus isotropic noise and 10 % flipped labels: linear, but far from separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    latent = rng.normal(size=(k, 32))[y] * 0.55 + rng.normal(size=(n, 32))
    X = latent @ (rng.normal(size=(32, d)) / np.sqrt(32)) + rng.normal(size=(n, d))
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(0, k, flip.sum())
    n_tr = int(0.8 * n)
    mean, sd = X[:n_tr].mean(0), X[:n_tr].std(0)
    X = ((X - mean) / sd).astype(np.float32)
    return X[:n_tr], y[:n_tr], X[n_tr:], y[n_tr:], k


def real(path: str):
    """fit-head's own split (val_fraction 0.2, seed 0) and standardisation of a cache."""
    from featcache.cache.store import read_cache
    from featcache.pipeline.heads.data import prepare

    data = prepare(read_cache(path), 0.2, 0, True, torch.device("cpu"))
    (Xt, yt), (Xv, yv) = data.split("train"), data.split("val")
    return Xt.numpy(), yt.numpy(), Xv.numpy(), yv.numpy(), len(data.class_names)


def compare(name: str, Xt, yt, Xv, yv, k: int, cs: list[float], block: int) -> None:
    print(f"\n== {name}: train {Xt.shape[0]} x {Xt.shape[1]}, val {len(yv)}, {k} classes ==")
    tX, ty, vX, vy = (torch.from_numpy(a) for a in (Xt, yt, Xv, yv))
    t0 = time.perf_counter()
    ours = fit_exact(cs, tX, ty, k, block=block)
    path_s = time.perf_counter() - t0
    rows = []
    for c, r in zip(cs, ours):
        model = LogisticRegression(C=c, max_iter=MAX_ITER)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Xt, yt)
        sk_s = time.perf_counter() - t1
        sk_head = to_linear(model, Xt.shape[1], k)
        with torch.no_grad():
            acc_f = (r.head(vX).argmax(1) == vy).double().mean().item()
            acc_s = (sk_head(vX).argmax(1) == vy).double().mean().item()
        rows.append((c, acc_f, acc_s, objective(r.head, tX, ty, c), objective(sk_head, tX, ty, c), r.n_iter,
                     int(np.max(model.n_iter_)), r.converged, sk_s))
    print(f"{'C':>8} {'val acc fc':>10} {'val acc sk':>10} {'obj fc':>11} {'obj sk':>11} {'rel diff':>9} "
          f"{'it fc':>6} {'it sk':>6} {'sk s':>7}")
    for c, af, as_, of, os_, itf, its, conv, sks in rows:
        print(f"{c:8.3g} {100 * af:10.2f} {100 * as_:10.2f} {of:11.6f} {os_:11.6f} {(of - os_) / os_:+9.1e} "
              f"{itf:5d}{'' if conv else '*'} {its:6d} {sks:7.2f}")
    best = max(rows, key=lambda r: (r[2], -r[0]))
    sk_total = sum(r[8] for r in rows)
    acc_ok = all(abs(r[1] - r[2]) <= 0.002 for r in rows)
    obj_ok = all((r[3] - r[4]) / r[4] <= 1e-4 for r in rows)  # lower than sklearn's is better, not a miss
    print(f"featcache path (10 C, block {block}): {path_s:.2f} s | sklearn all C: {sk_total:.2f} s | "
          f"sklearn best C={best[0]:g}: {best[8]:.2f} s  (* = stopped before tol)")
    print(f"target: path < sklearn best-C fit {'MET' if path_s < best[8] else 'MISSED'} "
          f"({best[8] / path_s:.2f}x); val acc within 0.2 pt {'MET' if acc_ok else 'MISSED'}; "
          f"objective within 1e-4 rel {'MET' if obj_ok else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="demo-out/digits.h5", help="real cache (examples/digits_demo.py writes this one)")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--block", type=int, default=BLOCK)
    args = ap.parse_args()
    print(machine())
    print("(shared machine: other jobs may run at the same time; figures are wall-clock)")
    print(gemm_forms())
    cs = list(DEFAULT_C_PATH)
    if args.n > 0:  # --n 0: the real cache only
        compare("synthetic", *synthetic(args.n, args.dim), cs, args.block)
    if Path(args.cache).exists():
        compare(f"cache {args.cache}", *real(args.cache), cs, args.block)
    else:
        print(f"\n(no cache at {args.cache}: real-data comparison skipped; run `make demo` or pass --cache)")


if __name__ == "__main__":
    main()
