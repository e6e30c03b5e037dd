"""Files -> preprocessed tensors, decoded in DataLoader workers so decoding overlaps the backbone."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.images import UnreadableImage, load_rgb
from pipeline.preprocess import PreprocessSpec


class ImageFiles(Dataset):
    """Item i -> (i, tensor (3, S, S) or None, reason); a bad file never raises."""

    def __init__(self, root: str | Path, rel_paths: list[str], spec: PreprocessSpec):
        self.root = Path(root)
        self.rel_paths = rel_paths
        self.transform = spec.transform()

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(str(self.root / self.rel_paths[i]))
            return i, self.transform(img), ""
        except UnreadableImage as e:
            return i, None, str(e) or "unreadable"


def collate(items):
    """-> (indices, ok mask, stacked tensors of the usable images (n_ok, 3, S, S), reasons)."""
    indices = [i for i, _, _ in items]
    tensors = [t for _, t, _ in items if t is not None]
    reasons = [r for _, _, r in items]
    batch = torch.stack(tensors) if tensors else None
    return indices, batch, reasons


def make_loader(dataset: ImageFiles, batches: list[list[int]], workers: int, pin_memory: bool) -> DataLoader:
    """Each yielded batch is exactly one of ``batches`` (fixed composition makes resume exact)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
