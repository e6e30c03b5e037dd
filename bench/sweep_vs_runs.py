"""Benchmark: one 12-configuration ``fit-head`` sweep vs the same 12 configurations as 12 separate
``fit-head`` runs, each a real ``python cli.py`` process (what a user would otherwise type).

    .venv/bin/python bench/sweep_vs_runs.py                    # synthetic digits-sized cache
    .venv/bin/python bench/sweep_vs_runs.py --cache demo-out/digits.h5

The sweep is ``--head mlp --hidden 0,256 --lr 1e-3,1e-2 --weight-decay 0,1e-4,1e-3 --dropout 0``
(2 x 2 x 3 = 12: six linear heads and six one-layer MLPs). Plots are on in both cases, as by default.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from features import make_features, write_cache  # noqa: E402
from sweep import load, machine  # noqa: E402

HIDDEN, LR, WD = ("0", "256"), ("1e-3", "1e-2"), ("0", "1e-4", "1e-3")
COMMON = ["--dropout", "0", "--epochs", "50", "--patience", "5", "--device", "cpu", "--json"]


def fit_head(cache: Path, out: Path, *args: str) -> tuple[float, dict]:
    """Wall-clock seconds of one ``python cli.py fit-head`` process and its JSON summary."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit-head", str(cache), "-o", str(out), *args, *COMMON],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        sys.exit(p.stderr)
    return time.perf_counter() - t0, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="a featcache cache (default: synthetic 1,797 x 1,280, 10 classes)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache) if args.cache else write_cache(tmp / "synthetic.h5", *make_features(1797, 1280, 10))
        print(f"cache: {cache}; configs: --head mlp --hidden {','.join(HIDDEN)} --lr {','.join(LR)} "
              f"--weight-decay {','.join(WD)} {' '.join(COMMON[:-3])}")
        print(f"sweep ({load()}) ...", flush=True)
        t_sweep, s = fit_head(cache, tmp / "sweep", "--head", "mlp", "--hidden", ",".join(HIDDEN), "--lr", ",".join(LR),
                              "--weight-decay", ",".join(WD))
        print(f"12 separate runs ({load()}) ...", flush=True)
        t_runs, best = 0.0, None
        for i, (h, lr, wd) in enumerate(itertools.product(HIDDEN, LR, WD)):
            t, r = fit_head(cache, tmp / f"run{i}", "--head", "mlp", "--hidden", h, "--lr", lr, "--weight-decay", wd)
            t_runs += t
            best = max(best or r, r, key=lambda x: x["val_accuracy"])
        print(f"done ({load()})\n")
    print(f"{'':<34}{'seconds':>8}  best val acc")
    print(f"{'one sweep, 12 configurations':<34}{t_sweep:8.1f}  {s['val_accuracy']:.4f}")
    print(f"{'12 separate fit-head runs':<34}{t_runs:8.1f}  {best['val_accuracy']:.4f}")
    print(f"sweep is {t_runs / t_sweep:.1f}x faster ({s['n_configs']} configurations in one process; "
          f"in-process training+scoring {s['seconds']:.1f}s of {t_sweep:.1f}s)")


if __name__ == "__main__":
    main()
