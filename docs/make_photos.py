"""Write a small ImageFolder of generated photos: circles, squares and triangles on noisy backgrounds.

    python docs/make_photos.py photos [--train 40 --val 12 --test 12 --size 64 --seed 0]

The outputs shown in README.md and docs/ come from this folder at its defaults (192 JPEGs), and
tests/api/test_docs.py runs every Python example of the docs on a smaller one. Each image is seeded by
(seed, split, class, index) and files that exist are left alone, so a larger ``--train`` only adds
images: a re-run of ``featcache extract`` then extracts just those.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "val", "test")


def draw(shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One size x size RGB image: a shape of random colour, radius and place, plus pixel noise."""
    bg = rng.integers(40, 216, 3)
    fg = tuple(int(v) for v in np.clip(bg + rng.choice([-1, 1], 3) * rng.integers(20, 90, 3), 0, 255))
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    r = rng.uniform(0.15, 0.35) * size  # half the shape's width, pixels
    cx, cy = rng.uniform(r, size - r, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    noisy = np.asarray(img, np.float32) + rng.normal(0.0, 20.0, (size, size, 3))  # sd in 0-255 levels
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_photos(root: str | Path, train: int = 40, val: int = 12, test: int = 12, size: int = 64,
                seed: int = 0) -> Path:
    """Write ROOT/{train,val,test}/{circle,square,triangle}/<split>_<i>.jpg (missing files only).

    Args:
        root: the folder to fill (created if needed).
        train, val, test: images per class in each split.
        size: width and height in pixels.
        seed: the folder's seed; image i of a class and split is the same for any counts.
    Returns:
        root as a Path.
    """
    root = Path(root)
    for s, (split, n) in enumerate(zip(SPLITS, (train, val, test))):
        for c, shape in enumerate(SHAPES):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{split}_{i:03d}.jpg"
                if not path.exists():
                    draw(shape, np.random.default_rng([seed, s, c, i]), size).save(path, quality=90)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    for name, default in (("--train", 40), ("--val", 12), ("--test", 12), ("--size", 64), ("--seed", 0)):
        ap.add_argument(name, type=int, default=default)
    a = ap.parse_args()
    make_photos(a.root, a.train, a.val, a.test, a.size, a.seed)
    print(f"wrote {a.root}: {len(SHAPES)} classes x {a.train}/{a.val}/{a.test} train/val/test images")


if __name__ == "__main__":
    main()
