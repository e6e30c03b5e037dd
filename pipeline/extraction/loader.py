"""Files -> uint8 image batches, decoded in parallel by worker processes or threads.

Decoding stops at uint8 (N, S, S, 3): resize and crop run on the PIL image exactly as in
``PreprocessSpec.transform()``, and the float conversion + normalisation run once per batch on the
compute device (accel.Normalizer), bit-identical to the per-image transform. uint8 batches are a
quarter of the bytes of float ones to pass between processes, pin, or copy to a GPU.

Every source yields exactly the planned batches, in order (fixed composition makes resume exact):
  * worker processes (torch DataLoader) prefetching while the backbone runs;
  * a thread pool in this process (Pillow releases the GIL while decoding and resizing), either
    prefetching or decoding each batch on demand with every thread (device.decode_layout decides);
  * inline, one image after another (threads=0).
"""
from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from featcache.pipeline.extraction.augment import AugmentRecipe, make_view
from featcache.pipeline.extraction.images import UnreadableImage, load_rgb
from featcache.pipeline.extraction.preprocess import PreprocessSpec
from featcache.pipeline.signals import die_with_parent

DRAFT_FACTOR = 2  # JPEG draft decodes to a shorter side >= 2x the resize target, then resizes as usual

# indices, uint8 (rows, S, S, 3) of the usable images (rows = n_ok, plus their views with --augment), reasons
Batch = tuple[list[int], "torch.Tensor | None", list[str]]


def pil_stage(spec: PreprocessSpec) -> T.Compose:
    """The PIL part of ``spec.transform()``: resize + center crop (PIL image -> PIL image).

    torchvision.transforms (v1), not v2: on PIL images both are the same PIL resize and crop
    (tests/extraction/test_preprocess.py checks pixel equality), and v2 imports torch._dynamo (~2 s at start-up).
    """
    return T.Compose([
        T.Resize(spec.resize_size, InterpolationMode(spec.interpolation), antialias=spec.antialias),
        T.CenterCrop(spec.crop_size),
    ])


def draft_min_side(spec: PreprocessSpec, draft: bool) -> int | None:
    """The shorter side JPEGs may be draft-decoded down to (None: always full decode)."""
    return DRAFT_FACTOR * spec.resize_size if draft else None


class ImageFiles(Dataset):
    """Item i -> (i, uint8 array (S, S, 3) or None, reason); a bad file never raises.

    With ``augment``, items in ``view_items`` come as (1 + views, S, S, 3): the preprocessed image
    first, then its augmented views, all from one decode of the file (so they cannot disagree about
    whether the file is usable).
    """

    def __init__(self, root: str | Path, rel_paths: list[str], spec: PreprocessSpec, draft: bool = True,
                 augment: AugmentRecipe | None = None, view_items: frozenset[int] = frozenset()):
        self.root = Path(root)
        self.rel_paths = rel_paths
        self.stage = pil_stage(spec)
        self.min_side = draft_min_side(spec, draft)
        self.augment = augment
        self.view_items = view_items
        self.crop, self.interpolation = spec.crop_size, spec.interpolation

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(str(self.root / self.rel_paths[i]), draft_min_side=self.min_side)
            first = np.asarray(self.stage(img))
            if self.augment is None or i not in self.view_items:
                return i, first, ""
            views = [np.asarray(make_view(img, self.augment, self.rel_paths[i], v, self.crop, self.interpolation))
                     for v in range(self.augment.views)]
            return i, np.stack([first, *views]), ""
        except UnreadableImage as e:
            return i, None, str(e) or "unreadable"


def collate(items) -> Batch:
    """-> (indices, uint8 (rows, S, S, 3) of the usable images (and their views) or None, reasons)."""
    indices = [i for i, _, _ in items]
    arrays = [a if a.ndim == 4 else a[None] for _, a, _ in items if a is not None]
    reasons = [r for _, _, r in items]
    batch = torch.from_numpy(np.concatenate(arrays)) if arrays else None
    return indices, batch, reasons


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """In each decode worker: die with the extract that forked it (an interrupted or killed run
    leaves no orphan decoding for seconds). The cache lock is not inherited: cache/lock.py closes
    its descriptor in every forked child."""
    die_with_parent(parent_pid)


def make_loader(dataset: ImageFiles, batches: list[list[int]], workers: int, pin_memory: bool) -> DataLoader:
    """Decode in ``workers`` processes; each yielded batch is exactly one of ``batches``
    (fixed composition makes resume exact)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,  # 2 batches per worker: enough to hide jitter
        persistent_workers=False,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
    )


def process_batches(loader: DataLoader) -> Iterator[Batch]:
    """``loader``'s batches; closing the generator (an error, an interrupt) stops its worker
    processes now, not whenever the iterator is garbage-collected."""
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own shutdown of the worker pool
        if shutdown is not None:
            shutdown()


def threaded_batches(dataset: ImageFiles, batches: list[list[int]], threads: int, prefetch: int = 2,
                     pin_memory: bool = False) -> Iterator[Batch]:
    """Decode with ``threads`` threads in this process, ``prefetch`` batches ahead of the consumer.

    ``threads=0`` decodes each batch in the calling thread when it is asked for; ``prefetch=0``
    decodes each batch with all threads when it is asked for (no overlap with the consumer).
    """
    if threads <= 0:
        for b in batches:
            yield _pinned(collate([dataset[i] for i in b]), pin_memory)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="featcache-decode")

    def submit(batch: list[int]) -> list:
        return [pool.submit(dataset.__getitem__, i) for i in batch]

    try:
        queued: deque = deque(submit(b) for b in batches[: max(1, prefetch)])
        todo = iter(batches[len(queued):])
        while queued:
            if prefetch > 0 and (nxt := next(todo, None)) is not None:
                queued.append(submit(nxt))  # decoded while the consumer computes
            batch = _pinned(collate([f.result() for f in queued.popleft()]), pin_memory)
            yield batch
            if prefetch == 0 and (nxt := next(todo, None)) is not None:
                queued.append(submit(nxt))  # decoded only once asked for
    finally:  # consumer stopped early (error, interrupt): drop queued work, wait for running
        pool.shutdown(wait=True, cancel_futures=True)


def _pinned(batch: Batch, pin: bool) -> Batch:
    if pin and batch[1] is not None:  # page-locked memory lets the GPU copy run asynchronously
        return batch[0], batch[1].pin_memory(), batch[2]
    return batch


def decode_batches(dataset: ImageFiles, batches: list[list[int]], workers: int, threads: int,
                   pin_memory: bool, prefetch: int = 2) -> Iterator[Batch]:
    """Batches in order: from ``workers`` processes if > 0, else from ``threads`` threads here."""
    if workers > 0:
        return process_batches(make_loader(dataset, batches, workers, pin_memory))
    return threaded_batches(dataset, batches, threads, prefetch, pin_memory=pin_memory)
