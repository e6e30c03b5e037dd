"""Synthetic photo-like JPEGs for benchmarks: smooth gradients + shapes + sensor-like noise.

Flat colours compress and decode unrealistically fast; these images have the frequency content
of ordinary photos (smooth shading, hard edges, fine noise), so libjpeg does realistic work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One RGB image of ``size`` (width, height)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(30, 220, 3).astype(np.float32)
    gx, gy = rng.uniform(-0.25, 0.25, (2, 3)).astype(np.float32) * (500.0 / max(w, h))
    arr = base + xx[..., None] * gx + yy[..., None] * gy  # (h, w, 3) smooth shading
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):  # hard-edged objects
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 20, w // 3), y0 + rng.integers(h // 20, h // 3)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5)) * max(w, h) / 500))
    noisy = np.asarray(img, np.float32) + rng.normal(0.0, 6.0, (h, w, 3)).astype(np.float32)  # sensor noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_photo_folder(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4,
                      quality: int = 90, seed: int = 0) -> Path:
    """ROOT/class_<k>/img_<i>.jpg, n images in all; reuses the folder when it already matches."""
    root = Path(root)
    marker = root / f".made-{n}-{size[0]}x{size[1]}-{classes}-{quality}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, size).save(folder / f"img_{i:05d}.jpg", quality=quality)
    marker.touch()
    return root
