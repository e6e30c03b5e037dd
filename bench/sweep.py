"""Benchmark: a 100-configuration head sweep trained batched vs one configuration at a time, and the
best batched linear head vs scikit-learn's LogisticRegression over a C grid.

    .venv/bin/python bench/sweep.py            # synthetic N=50,000 x D=2,048, 10 classes
    .venv/bin/python bench/sweep.py --quick    # N=5,000 x D=512, for a smoke run
    .venv/bin/python bench/sweep.py --cache features.h5   # a real cache (its own splits)

Both sides of (1) run the same code, ``featcache.pipeline.heads.train.train_many``: once on all 100 configurations
(stacked), then once per configuration. Wall-clock times; the machine is printed with them, and the
load average too, since other processes on a shared machine slow either side.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from features import as_cache, make_features  # noqa: E402

from featcache.cache.store import read_cache  # noqa: E402
from featcache.pipeline.config import HeadConfig  # noqa: E402
from featcache.pipeline.device import usable_cores  # noqa: E402
from featcache.pipeline.heads.data import prepare  # noqa: E402
from featcache.pipeline.heads.logreg import fit_logreg  # noqa: E402
from featcache.pipeline.heads.metrics import score  # noqa: E402
from featcache.pipeline.heads.sweep import expand  # noqa: E402
from featcache.pipeline.heads.train import TrainData, TrainSettings, train_many  # noqa: E402

# 4 learning rates x 5 L2 strengths x 5 L1 strengths = 100 linear heads (Adam). The L2 strengths are
# those of the scikit-learn C grid: sklearn minimises C * sum(loss) + |w|^2 / 2, i.e. the mean loss
# plus |w|^2 / (2 C n), which is weight decay 1 / (C n) on the mean loss. Same range for both sides.
LRS, L1S = (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
C_GRID = HeadConfig.C  # fit-head --head logreg's default grid


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; {usable_cores()} usable cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"scikit-learn {sklearn.__version__}; numpy {np.__version__}; python {platform.python_version()}")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=5,000 x D=512 (a smoke run)")
    ap.add_argument("--cache", help="benchmark on a real featcache cache instead of synthetic features")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sequential", action="store_true", help="skip the one-at-a-time run (part 2 only)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.epochs = 5_000, 512, 5

    print(f"machine: {machine()}")
    if args.cache:
        cache, source = read_cache(args.cache), args.cache
    else:
        X, y = make_features(args.n, args.dim, args.classes, args.seed)
        cache, source = as_cache(X, y), f"synthetic N={args.n:,} x D={args.dim:,}, {args.classes} classes"
    data = prepare(cache, 0.2, args.seed, True, torch.device("cpu"))  # fit-head's split and standardisation
    Xtr, ytr = data.split("train")
    Xv, yv = data.split("val")
    n_classes = len(data.class_names)
    settings = TrainSettings(args.epochs, args.batch_size, args.patience)
    decays = tuple(float(f"{1 / (c * len(Xtr)):.3g}") for c in C_GRID)
    params = expand(HeadConfig(cache="-", output="-", head="linear", seed=args.seed, lr=LRS, weight_decay=decays,
                               l1=L1S))
    print(f"data: {source}; train {len(Xtr):,} / val {len(Xv):,} rows, D={Xtr.shape[1]:,}")
    print(f"heads: {len(params)} linear (Adam), lr {LRS} x weight_decay {decays} (= 1/(C n) for the C grid) "
          f"x l1 {L1S}; epochs <= {args.epochs}, patience {args.patience}, batch {args.batch_size}")

    print(f"\n[1] batched ({load()}) ...", flush=True)
    t0 = time.perf_counter()
    batched = train_many(params, data=TrainData(Xtr, ytr, n_classes, Xv, yv), settings=settings)
    t_batched = time.perf_counter() - t0
    alone, t_alone = batched, float("nan")
    if not args.skip_sequential:
        print(f"[1] one at a time ({load()}) ...", flush=True)
        t0 = time.perf_counter()
        alone = [train_many([p], data=TrainData(Xtr, ytr, n_classes, Xv, yv), settings=settings)[0] for p in params]
        t_alone = time.perf_counter() - t0
    print(f"[1] done ({load()})")
    val_b = [r.history[r.best_epoch - 1]["val_accuracy"] for r in batched]
    val_a = [r.history[r.best_epoch - 1]["val_accuracy"] for r in alone]
    same_epochs = sum(a.best_epoch == b.best_epoch and len(a.history) == len(b.history) for a, b in zip(alone, batched))
    epochs_run = sum(len(r.history) for r in batched)

    best = max(range(len(params)), key=lambda i: (val_b[i], -i))
    print(f"[2] scikit-learn LogisticRegression, C in {C_GRID} ({load()}) ...", flush=True)
    t0 = time.perf_counter()
    lr_fits = fit_logreg(list(C_GRID), Xtr, ytr, n_classes, args.seed)
    t_sklearn = time.perf_counter() - t0
    lr_val = [score(f.head, Xv, yv)["accuracy"] for f in lr_fits]
    lr_best = int(np.argmax(lr_val))

    p = params[best]
    rows = [
        ("batched: 100 heads, one stacked model per group", f"{t_batched:8.1f}", f"{max(val_b):.4f}"),
        ("one at a time: 100 x train_many([config])", f"{t_alone:8.1f}", f"{max(val_a):.4f}"),
        (f"sklearn LogisticRegression, {len(C_GRID)} C values", f"{t_sklearn:8.1f}",
         f"{lr_val[lr_best]:.4f}"),
    ]
    print(f"\n{'':<58}{'seconds':>8}  best val acc")
    for name, secs, acc in rows:
        print(f"{name:<58}{secs:>8}  {acc}")
    print(f"\n[1] batched is {t_alone / t_batched:.1f}x faster than one at a time "
          f"(per configuration {t_batched / len(params):.2f}s vs {t_alone / len(params):.2f}s; {epochs_run} head-epochs; "
          f"results agree: max |val acc diff| {max(abs(a - b) for a, b in zip(val_a, val_b)):.4f}, "
          f"same best/stop epoch for {same_epochs}/{len(params)})")
    print(f"[2] best batched linear head: lr={p.lr:g} weight_decay={p.weight_decay:g} l1={p.l1:g}, "
          f"val acc {val_b[best]:.4f} (epoch {batched[best].best_epoch}); its own share of the sweep "
          f"{batched[best].seconds:.2f}s, the whole 100-head sweep {t_batched:.1f}s")
    print(f"[2] sklearn best C={C_GRID[lr_best]:g}: val acc {lr_val[lr_best]:.4f}; {len(C_GRID)} C values "
          f"{t_sklearn:.1f}s; per C: "
          + ", ".join(f"C={c:g} {v:.4f} {f.seconds:.1f}s{'' if f.converged else ' (max_iter)'} ({f.n_iter} it)"
                      for c, v, f in zip(C_GRID, lr_val, lr_fits)))
    print(f"[2] best val accuracy, batched - sklearn: {val_b[best] - lr_val[lr_best]:+.4f}; seconds, "
          f"100-head batched sweep / {len(C_GRID)}-C sklearn sweep: {t_batched / t_sklearn:.2f}")


if __name__ == "__main__":
    main()
