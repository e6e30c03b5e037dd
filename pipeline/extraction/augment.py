"""Augmented views for the cache: a recorded recipe and per-image seeded views (PIL -> PIL).

``extract --augment N`` stores N views of every training image beside its un-augmented features.
Each view is drawn from its own random stream, seeded by (seed, image path, view index), so a view
does not depend on batch composition, decoding threads, torchrun ranks or which images an
incremental run recomputes: a resumed or incremental run stores the same views as a fresh one.

Why the crop parameters are sampled here and not by ``v2.RandomResizedCrop``: torchvision draws
them from torch's global RNG, which cannot be seeded per image while a thread pool decodes many
images at once. The sampling below is torchvision's ``RandomResizedCrop.make_params`` algorithm
(10 tries of area/log-ratio, then the central fallback) on a private ``numpy`` generator; the
pixels are then produced by torchvision's own ``resized_crop`` / ``horizontal_flip`` / ``rotate``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode

from featcache.pipeline.errors import FeatcacheError

RECIPE_VERSION = 1  # bump when the sampling or the pixel operations change


@dataclass(frozen=True)
class AugmentRecipe:
    """What one augmented view is: optional small rotation, RandomResizedCrop to the backbone's crop
    size with the backbone's interpolation, optional horizontal flip (in that order)."""

    views: int  # views stored per training image
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image (torchvision default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h, sampled log-uniformly
    hflip: float = 0.5  # probability of a horizontal flip
    rotate: float = 0.0  # max |angle| in degrees, uniform; 0 = no rotation

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": list(self.scale), "ratio": list(self.ratio), "version": RECIPE_VERSION,
                "order": ["rotate", "random_resized_crop", "horizontal_flip"]}

    def check(self) -> None:
        lo, hi = self.scale
        if self.views < 0:
            raise FeatcacheError("--augment must be 0 or more views")
        if not 0 < lo <= hi <= 1:
            raise FeatcacheError(f"--augment-scale {lo},{hi}: need 0 < min <= max <= 1")
        if not 0 <= self.hflip <= 1:
            raise FeatcacheError(f"--augment-flip {self.hflip}: a probability in [0, 1]")
        if not 0 <= self.rotate <= 180:
            raise FeatcacheError(f"--augment-rotate {self.rotate}: degrees in [0, 180]")


def recipe_of(cfg) -> AugmentRecipe | None:
    """The recipe an ExtractConfig asks for (None without --augment). The recipe flags are
    checked even then: a typo in them should not pass silently."""
    recipe = AugmentRecipe(cfg.augment, cfg.seed, tuple(cfg.augment_scale), hflip=cfg.augment_flip,
                           rotate=cfg.augment_rotate)
    recipe.check()
    return recipe if cfg.augment else None


def view_rng(seed: int, rel_path: str, view: int) -> np.random.Generator:
    """The private random stream of one view (independent of everything but its three inputs)."""
    digest = hashlib.sha256(f"{seed}\0{rel_path}\0{view}".encode()).digest()
    # "<u4": a fixed byte order, so a path gets the same views on every machine
    return np.random.default_rng(np.frombuffer(digest, dtype="<u4"))


def crop_params(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop samples them."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def make_view(img: Image.Image, recipe: AugmentRecipe, rel_path: str, view: int, size: int,
              interpolation: str) -> Image.Image:
    """One augmented view of an RGB image, ``size`` x ``size`` pixels (the backbone's crop size)."""
    from torchvision.transforms.v2 import functional as TF  # here: v2 imports torch._dynamo (~2 s)

    rng = view_rng(recipe.seed, rel_path, view)
    mode = InterpolationMode(interpolation)
    if recipe.rotate > 0:
        img = TF.rotate(img, float(rng.uniform(-recipe.rotate, recipe.rotate)), interpolation=mode)
    top, left, h, w = crop_params(rng, img.width, img.height, recipe.scale, recipe.ratio)
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=mode, antialias=True)
    if rng.uniform() < recipe.hflip:
        img = TF.horizontal_flip(img)
    return img
