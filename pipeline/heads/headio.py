"""head.pt: a plain state_dict plus JSON-serialisable metadata, loaded only with weights_only=True.

The metadata names the head's kind (heads/kinds/); the kind rebuilds an empty module of the
recorded architecture and the state_dict fills it. Files written before kinds existed have no
``kind``: they are ``nn.Sequential`` heads (linear, mlp, logreg), rebuilt as such.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.cache.atomic import write_buffered
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.heads import kinds

HEAD_FORMAT = "featcache-head"
HEAD_VERSION = 1


def save_head(path: str | Path, head: nn.Module, metadata: dict) -> None:
    """metadata must hold kind, in_dim, n_classes, class_names, standardize and what the kind's
    ``build`` reads (``HeadKind.architecture``)."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    obj = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "state_dict": state, "metadata": metadata}
    # in memory first, then written whole: a full disk is the "no space left" line, not torch's
    # "enforce fail at inline_container.cc" from the middle of its zip writer
    write_buffered(path, lambda fh: torch.save(obj, fh))


def build_head(meta: dict) -> nn.Module:
    """An untrained head of the architecture recorded in head (or fine-tuned model) metadata."""
    try:
        return kinds.get(meta.get("kind", "linear")).build(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise FeatcacheError(f"head metadata does not describe a {meta.get('kind', 'linear')} head ({e!r})") from None


def load_head(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved head. Refuses anything that is not a featcache head (and never unpickles code)."""
    path = Path(path)
    if path.is_dir():
        path = path / "head.pt"
    if not path.exists():
        raise FeatcacheError(f"head file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(8) == b"\x89HDF\r\n\x1a\n":  # an HDF5 file: most likely the feature cache itself
            raise FeatcacheError(f"{path} is a feature cache, not a model: give a fit-head run folder "
                                 "(made by featcache fit-head CACHE -o RUN), its head.pt, or a finetune folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FeatcacheError(f"refusing to load {path}: not a featcache head ({first})") from None
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise FeatcacheError(f"{path} is not a featcache head file")
    meta = obj["metadata"]
    try:
        names, n_classes = list(meta["class_names"]), int(meta["n_classes"])
    except (KeyError, TypeError, ValueError):
        raise FeatcacheError(f"{path}: head metadata lacks class_names/n_classes") from None
    if len(names) != n_classes:
        raise FeatcacheError(f"{path}: {len(names)} class names recorded for a head with {n_classes} outputs")
    head = build_head(meta)
    try:
        head.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise FeatcacheError(f"{path}: weights do not fit the recorded head shape ({str(e).splitlines()[0]})") from None
    return head.eval(), meta


def label_values(meta: dict) -> np.ndarray:
    """(C,) the label each output stands for: as recorded (a head trained on arrays keeps its labels'
    type), else the class indices, which is what ``Cache.arrays`` returns for a cache."""
    values = meta.get("label_values")
    return np.asarray(values) if values is not None else np.arange(int(meta["n_classes"]))


def input_dim(meta: dict) -> int:
    """Width of the cached features a saved head reads (its ``columns`` select ``in_dim`` of them)."""
    return int(meta.get("input_dim") or meta["in_dim"])


class StandardizedHead(nn.Module):
    """(x - mean) / scale followed by the head: raw cached features in, logits out.

    ``columns``: the head reads only these columns of the features (fit-head --layers).
    """

    def __init__(self, head: nn.Module, mean: np.ndarray | None, scale: np.ndarray | None,
                 columns: np.ndarray | None = None, in_dim: int | None = None):
        super().__init__()
        d = in_dim if in_dim is not None else len(mean if mean is not None else scale)
        self.select = columns is not None
        if self.select:
            self.register_buffer("columns", torch.as_tensor(np.asarray(columns), dtype=torch.long))
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(d), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale if scale is not None else np.ones(d), dtype=torch.float32))
        self.head = head

    @classmethod
    def from_metadata(cls, head: nn.Module, meta: dict) -> "StandardizedHead":
        """With the train-split statistics recorded in ``meta["standardize"]`` (identity if none)."""
        std = meta.get("standardize") or {}
        return cls(head, std.get("mean"), std.get("scale"), meta.get("columns"), int(meta["in_dim"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.select:
            x = x.index_select(1, self.columns)
        return self.head((x - self.mean) / self.scale)
