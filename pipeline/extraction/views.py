"""Extraction bookkeeping for ``--augment``: which images get views, how a batch's backbone rows
split into features and views, and how /views is filled (new rows from the journal's batches, the
others copied).
"""
from __future__ import annotations

import numpy as np

from featcache.cache.featwrite import write_view_rows
from featcache.cache.fingerprint import fingerprint
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.augment import AugmentRecipe


class Views:
    """Which images get augmented views this run: every labeled train-split image, V views each
    (unlabeled images are never trained on, so their views would be wasted backbone work)."""

    def __init__(self, recipe: AugmentRecipe | None, disc, fp: str):
        self.recipe = recipe
        self.n = recipe.views if recipe else 0
        self.records = disc.records
        # Covers /views: the feature fingerprint (backbone, preprocessing, ...) plus the recipe.
        self.fingerprint = fingerprint({"features": fp, "augment": recipe.to_dict()}) if recipe else ""

    def wants(self, i: int) -> bool:
        return self.n > 0 and self.records[i].split == "train" and self.records[i].label >= 0

    def rows(self, i: int) -> int:
        """Backbone rows for image i: itself plus its views."""
        return 1 + (self.n if self.wants(i) else 0)


def split_rows(feats: np.ndarray, batch: list[int], reasons: list[str], views: Views):
    """Backbone output rows (image, its views, next image, ...) -> features (n_ok, D) and
    views (n_ok with views, V, D)."""
    usable = [i for i, r in zip(batch, reasons) if r == ""]
    counts = [views.rows(i) for i in usable]
    starts = np.cumsum([0] + counts)[:-1].astype(np.int64)
    finite = np.isfinite(feats).all(axis=tuple(range(1, feats.ndim)))
    if not finite.all():  # never cache NaN/Inf: a head trained on them is silently wrong
        owner = np.repeat(np.arange(len(usable)), counts)  # backbone row -> its image
        bad = sorted({usable[k] for k in owner[~finite]})
        names = ", ".join(views.records[i].path for i in bad[:3])
        raise FeatcacheError(
            f"the backbone produced non-finite features (NaN or Inf) for {len(bad)} image(s), first: {names}; "
            "the cache is unchanged (check --weights and --layer)")
    firsts = feats[starts]
    if not views.n:
        return firsts, None
    with_views = [feats[s + 1: s + c] for s, c in zip(starts, counts) if c > 1]
    return firsts, (np.stack(with_views) if with_views else np.zeros((0, views.n, feats.shape[1]), np.float32))


def write_views(writer, cfg, bb, plan, new: dict[int, tuple[int, int]], row_of: dict[int, int], views: Views,
                load) -> None:
    """/views rows: new ones read back batch by batch (``new``: final row -> (batch, index into that
    batch's views array), ``load``: batch -> its views array), the others copied from the previous
    cache (make_plan reused a train image only if that cache holds views of the same recipe)."""
    reused = {row_of[i]: r for i, r in plan.reuse.items() if views.wants(i)}
    write_view_rows(writer, len(row_of), views.n, bb.feature_dim, cfg.dtype, new, reused,
                    cfg.output if reused else None, load=load)
