"""Benchmark: accuracy of the best head with and without augmented views (make-demo digits).

    .venv/bin/python bench/augment.py [--out bench-out/augment] [--cache DIGITS_V8.h5]   # 5-fold CV (issue 15)
    .venv/bin/python bench/augment.py --recipes [--views 4]                              # recipes (issue 6)

Default (issue 15): one ``extract --augment 8`` cache (EfficientNet-Lite0, bundled weights; rotation
up to 15 degrees, crop area 0.7-1, no flip), then per head family and keep-original probability one
``fit-head --cv 5 --train-sizes 10,all`` run: every configuration x fold x {10 images per class, all
train rows} x {views, no views} in one pass. Each fold trains on (a 10-per-class subset of) its 4/5
of the 1,078 train rows and is scored on its held-out fifth (~216 un-augmented rows), so every
figure is a mean ± std over 5 folds. "linear, best of 8" is the configuration with the best mean.

``--recipes`` (issue 6):
For each augmentation recipe, one ``extract --augment V`` cache (EfficientNet-Lite0, bundled ImageNet
weights) holds the un-augmented features and V views of every train image. The same ``fit-head``
commands (the demo's 8-config linear sweep, and an MLP) then run with ``--use-augmented`` and
``--no-use-augmented`` on that cache, so the only difference is what the training rows are;
validation and test rows are the un-augmented features either way.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from sweep import machine  # noqa: E402

from examples.digits_demo import LINEAR_SWEEP, write_digits  # noqa: E402

RECIPES = {  # name -> extract flags after --augment V
    "default (RandomResizedCrop 0.08-1, flip 0.5)": [],
    # framed like the un-augmented image (resize 256 + center crop 224 keeps 0.77 of its area),
    # no flip: a mirrored digit is another symbol
    "mild (crop 0.7-0.85, no flip)": ["--augment-scale", "0.7", "0.85", "--augment-flip", "0"],
}
EPOCHS = ["--epochs", "300"]  # views make training noisier: let early stopping, not the cap, end it
HEADS = {
    "linear, best of 8": ["--head", "linear", *LINEAR_SWEEP, *EPOCHS],
    "mlp 512, dropout 0.5": ["--head", "mlp", "--hidden", "512", "--dropout", "0.5", *EPOCHS],
}


def featcache(*args: str) -> dict:
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, "--json"], capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    return json.loads(p.stdout)


KEEP = (0.0, 1 / 9, 0.5)  # 1/9: the original as likely as each of 8 views
CV_FLAGS = ["--cv", "5", "--train-sizes", "10,all", "--epochs", "200", "--no-plots"]
QUICK_HEADS = {"linear lr 1e-2 wd 1e-4": ["--head", "linear", "--lr", "1e-2", "--weight-decay", "1e-4", *EPOCHS]}


def folds(args) -> None:
    """Low-data (10 per class) and full-data, views or not, original kept or not: mean ± std over 5 folds."""
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "digits-v8.h5"
    if not cache.exists():
        images = out / "digits"
        if not images.exists():
            write_digits(images, scale=4)
        featcache("extract", str(images), "-o", str(cache), "--backbone", "efficientnet_lite0", "--augment", "8",
                  "--augment-rotate", "15", "--augment-scale", "0.7", "1", "--augment-flip", "0")
    print(f"machine: {machine()} (shared with other engineers' jobs while measured)")
    print(f"cache: {cache} (EfficientNet-Lite0, 8 views: rotate <= 15 deg, crop area 0.7-1, no flip)")
    print(f"{'head':<22} {'keep orig':>9} {'train rows':>11} {'views':>6} {'CV accuracy (5 folds)':>22}  seconds")
    table = {}
    heads, keep = (QUICK_HEADS, KEEP[:2]) if args.quick else (HEADS, KEEP)
    for head, hflags in heads.items():
        for p in keep:
            run = out / "cv-runs" / f"{head.split()[0]}-keep{p:.2f}"
            t0 = time.perf_counter()
            featcache("fit-head", str(cache), "-o", str(run), *hflags[:-2], *CV_FLAGS, "--overwrite",
                      "--views-keep-original", f"{p:.4f}")
            lb = json.loads((run / "leaderboard.json").read_text())
            for size in (10, "all"):
                for views in (False, True):
                    rows = [r for r in lb if r["train_size"] == size and r["views"] == views and r["status"] == "ok"]
                    best = max(rows, key=lambda r: r["cv_accuracy_mean"])
                    table[head, p, size, views] = best
                    print(f"{head:<22} {p:>9.3f} {best['n_train_rows']:>11} {'yes' if views else 'no':>6} "
                          f"{best['cv_accuracy_mean']:>15.4f} ± {best['cv_accuracy_std']:.4f}"
                          f"  {time.perf_counter() - t0:.0f}", flush=True)
    print("\nCV accuracy change from views (same folds, same configurations):")
    for head in heads:
        for size in (10, "all"):
            no = table[head, 0.0, size, False]
            for p in keep:
                yes = table[head, p, size, True]
                print(f"  {head:<22} {str(size) + ' per class' if size != 'all' else 'all train rows':<16} keep "
                      f"{p:.3f}: {no['cv_accuracy_mean']:.4f} -> {yes['cv_accuracy_mean']:.4f} "
                      f"({yes['cv_accuracy_mean'] - no['cv_accuracy_mean']:+.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--out", default="bench-out/augment")
    ap.add_argument("--cache", default=None, help="an existing 8-view digits cache to reuse")
    ap.add_argument("--recipes", action="store_true", help="the issue-6 recipe comparison instead")
    ap.add_argument("--quick", action="store_true", help="one linear configuration, keep-original 0 and 1/9 only")
    args = ap.parse_args()
    if not args.recipes:
        folds(args)
        return
    out = Path(args.out)
    images = out / "digits"
    if not images.exists():
        write_digits(images, scale=4)  # exactly the make-demo images
    print(f"machine: {machine()}")
    print(f"data: sklearn digits as 32x32 PNGs, 60/20/20 train/val/test; {args.views} views per train image")
    rows = []
    for r, (recipe, flags) in enumerate(RECIPES.items()):
        t0 = time.perf_counter()
        ex = featcache("extract", str(images), "-o", str(out / f"digits-aug{r}.h5"), "--backbone",
                       "efficientnet_lite0", "--augment", str(args.views), *flags)
        print(f"\nrecipe {recipe}: extract {ex['n_images']} images + {ex['views']['images']} x {args.views} views "
              f"in {time.perf_counter() - t0:.0f}s ({ex['extracted']} extracted, {ex['reused']} reused)")
        for head, hflags in HEADS.items():
            for use in ("--no-use-augmented", "--use-augmented"):
                run = out / "runs" / f"aug{r}-{head.split()[0]}-{use.strip('-')}"
                s = featcache("fit-head", str(ex["cache"]), "-o", str(run), *hflags, use, "--no-plots")
                rows.append((recipe, head, s["augmented"]["used"], s["val_accuracy"], s["test_accuracy"],
                             s["best_epoch"], s["seconds"]))
                print(f"  {head:<22} views {'yes' if rows[-1][2] else 'no ':<4} val {s['val_accuracy']:.4f}  "
                      f"test {s['test_accuracy']:.4f}  best epoch {s['best_epoch']:>3}  {s['seconds']:.1f}s", flush=True)
    print("\nval accuracy gain from views (same cache, same heads, same val rows):")
    for recipe in RECIPES:
        for head in HEADS:
            no, yes = [row for row in rows if row[0] == recipe and row[1] == head]
            print(f"  {recipe:<46} {head:<22} {no[3]:.4f} -> {yes[3]:.4f} ({yes[3] - no[3]:+.4f})")


if __name__ == "__main__":
    main()
