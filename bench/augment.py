"""Benchmark: validation accuracy of the best head with and without augmented views (make-demo digits).

    .venv/bin/python bench/augment.py [--views 4] [--out bench-out/augment]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--out", default="bench-out/augment")
    args = ap.parse_args()
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
