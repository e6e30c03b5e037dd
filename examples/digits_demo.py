"""make demo-digits: real images, real pretrained features, two heads, one honest baseline.

Writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as PNGs into an
ImageFolder tree with train/val/test splits, runs `featcache extract` with EfficientNet-Lite0 and its
bundled ImageNet weights, fits a linear and an MLP head, and checks the linear head against
scikit-learn's LogisticRegression on the same cached features and the same split.

Then a multi-layer cache (every EfficientNet-Lite0 block plus its pre-logits, one pass) compares,
on the same split, the best linear head on the final layer, the best linear head over several
layer sets (fit-head --layers), and LogisticRegression on the raw pixels; the demo fails unless the
best layer set beats the final layer on the test split.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
SKLEARN_C = (0.01, 0.1, 1.0, 10.0, 100.0)
LINEAR_SWEEP = ("--lr", "1e-3,1e-2", "--weight-decay", "0,1e-4,1e-3,1e-2")  # 8 heads in one batched pass
ALL_LAYERS = "blocks.0,blocks.1,blocks.2,blocks.3,blocks.4,blocks.5,blocks.6,pre_logits"
STAGES = "blocks.0,blocks.1,blocks.2,blocks.4,blocks.6"  # timm's feature_info stage outputs
LAYER_SETS = ("blocks.3", "blocks.4", "blocks.3,blocks.4", STAGES, f"{STAGES},pre_logits", ALL_LAYERS)


def write_digits(folder: Path, scale: int) -> None:
    """60/20/20 stratified split, PNG per image; 0..16 ink levels mapped to black-on-white 8-bit."""
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, rest = train_test_split(idx, test_size=0.4, stratify=digits.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        for i in rows:
            d = folder / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L")
            if scale > 1:  # nearest keeps the original 8x8 samples exactly, just bigger
                img = img.resize((8 * scale, 8 * scale), Image.NEAREST)
            img.save(d / f"{i:04d}.png")


def featcache(*args: str) -> dict:
    if args[0] == "fit-head":  # a second `make demo-digits` replaces its own runs
        args = (*args, "--overwrite")
    cmd = [sys.executable, str(ROOT / "cli.py"), *args, "--json"]
    print("$ featcache " + " ".join(args), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def sklearn_baseline(cache_path: Path) -> tuple[float, float, float, float]:
    """LogisticRegression over a C grid, chosen on the same val rows, standardised with train stats.

    Returns (val accuracy, test accuracy, best C, seconds for the whole grid).
    """
    from featcache.cache.store import read_cache

    c = read_cache(cache_path)
    X, y = c.features.astype(np.float64), c.labels
    tr, va, te = c.split == "train", c.split == "val", c.split == "test"
    mean, std = X[tr].mean(0), X[tr].std(0)
    std[std < 1e-6] = 1.0
    Xs = (X - mean) / std
    t0 = time.perf_counter()
    fits = [LogisticRegression(C=C, max_iter=3000).fit(Xs[tr], y[tr]) for C in SKLEARN_C]
    best = max(fits, key=lambda f: f.score(Xs[va], y[va]))
    return best.score(Xs[va], y[va]), best.score(Xs[te], y[te]), best.C, time.perf_counter() - t0


def raw_pixel_baseline(cache_path: Path) -> tuple[float, float, float]:
    """LogisticRegression on the 64 raw pixels of the same images and split (C chosen on val).

    Returns (val accuracy, test accuracy, best C)."""
    from featcache.cache.store import read_cache

    c = read_cache(cache_path, features=False)
    X = load_digits().data[[int(Path(p).stem) for p in c.paths]]  # PNG names are the digit indices
    y, tr, va, te = c.labels, c.split == "train", c.split == "val", c.split == "test"
    mean, std = X[tr].mean(0), X[tr].std(0)
    std[std < 1e-6] = 1.0
    Xs = (X - mean) / std
    fits = [LogisticRegression(C=C, max_iter=3000).fit(Xs[tr], y[tr]) for C in SKLEARN_C]
    best = max(fits, key=lambda f: f.score(Xs[va], y[va]))
    return best.score(Xs[va], y[va]), best.score(Xs[te], y[te]), best.C


def layer_comparison(images: Path, out: Path) -> bool:
    """Final layer vs the best layer set vs raw pixels, on the same split; True when the set wins."""
    cache = out / "digits_layers.h5"
    ex = featcache("extract", str(images), "-o", str(cache), "--backbone", "efficientnet_lite0", "--layer", ALL_LAYERS)
    print(f"  {ex['n_images']} images x {ex['feature_dim']} features from {len(ex['layers'])} layers in one pass, "
          f"{ex['seconds']:.1f}s")
    final = featcache("fit-head", str(cache), "-o", str(out / "runs" / "final_layer"), "--layers", "pre_logits",
                      *LINEAR_SWEEP)
    sets = featcache("fit-head", str(cache), "-o", str(out / "runs" / "layer_sets"),
                     *(a for ls in LAYER_SETS for a in ("--layers", ls)), *LINEAR_SWEEP)
    px_val, px_test, px_c = raw_pixel_baseline(cache)
    print()
    print(f"{'linear heads, same split (chosen on val)':<68}{'val acc':>9}{'test acc':>10}")
    print(f"{'final layer (pre_logits), best of ' + str(final['n_configs']):<68}"
          f"{final['val_accuracy']:>9.4f}{final['test_accuracy']:>10.4f}")
    print(f"{'best layer set of ' + str(len(LAYER_SETS)) + ': ' + sets['layers']:<68}"
          f"{sets['val_accuracy']:>9.4f}{sets['test_accuracy']:>10.4f}")
    print(f"{f'sklearn LogisticRegression on raw pixels, C={px_c:g}':<68}{px_val:>9.4f}{px_test:>10.4f}")
    ok = sets["test_accuracy"] > final["test_accuracy"]
    print(f"\nbest layer set vs final layer: {sets['test_accuracy'] - final['test_accuracy']:+.4f} test accuracy "
          f"({'OK' if ok else 'FAIL'}: the layer set must be ahead)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--scale", type=int, default=4, help="upscale the 8x8 scans by this factor when writing PNGs")
    args = ap.parse_args()
    out = Path(args.out)
    images, cache = out / "digits", out / "digits.h5"
    if not images.exists():
        write_digits(images, args.scale)
        print(f"wrote 1797 digit PNGs under {images}")
    ex = featcache("extract", str(images), "-o", str(cache), "--backbone", "efficientnet_lite0")
    print(f"  {ex['n_images']} images x {ex['feature_dim']} features; extracted {ex['extracted']}, "
          f"reused {ex['reused']} in {ex['seconds']:.1f}s")
    lin = featcache("fit-head", str(cache), "-o", str(out / "runs" / "linear"), "--head", "linear", *LINEAR_SWEEP)
    mlp = featcache("fit-head", str(cache), "-o", str(out / "runs" / "mlp"), "--head", "mlp",
                    "--hidden", "512", "--dropout", "0.5")
    base_val, base_test, base_c, base_s = sklearn_baseline(cache)
    print()
    print(f"{'head (chosen on the val split)':<44}{'val acc':>9}{'test acc':>10}{'seconds':>9}")
    for name, r in ((f"featcache linear, best of {lin['n_configs']}", lin), ("featcache mlp 512, dropout 0.5", mlp)):
        print(f"{name:<44}{r['val_accuracy']:>9.4f}{r['test_accuracy']:>10.4f}{r['seconds']:>9.1f}")
    print(f"{f'sklearn LogisticRegression, C={base_c:g} (of {len(SKLEARN_C)})':<44}"
          f"{base_val:>9.4f}{base_test:>10.4f}{base_s:>9.1f}")
    gap = lin["val_accuracy"] - base_val
    ok = gap >= -0.01
    print(f"\nlinear head vs LogisticRegression on the same features and split: {gap:+.4f} val accuracy "
          f"({'OK' if ok else 'FAIL'}: must be no worse than -0.01)\n")
    layers_ok = layer_comparison(images, out)
    return 0 if ok and layers_ok else 1


if __name__ == "__main__":
    sys.exit(main())
