"""``featcache finetune``: start from the cached-feature solution (backbone + trained head) and train
the whole network (or its last N blocks) on the images with augmentation.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from featcache.cache.atomic import write_json
from featcache.pipeline.device import cuda_math, decode_layout, resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.images import UnreadableImage, load_rgb
from featcache.pipeline.extraction.loader import ImageFiles
from featcache.pipeline.extraction.preprocess import PreprocessSpec
from featcache.pipeline.extraction.sources import open_source, source_kind
from featcache.pipeline.heads.data import hold_out, labeled_split_rows
from featcache.pipeline.outputs import check_output_folder, output_folder_kind
from featcache.pipeline.use.model import Classifier, load_run, save_finetuned


@dataclass(frozen=True)
class FinetuneConfig:
    image_dir: str
    run_dir: str  # --from: a fit-head RUN_DIR
    output: str
    unfreeze: str = "all"  # all | N (last N blocks of the backbone)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # head learning rate; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4  # AdamW, not on biases or norm parameters
    patience: int = 3
    val_fraction: float = 0.2
    workers: int | None = None  # decoding processes; None = decode_workers() chooses for the device
    device: str = "auto"
    seed: int = 0


def train_transform(spec: PreprocessSpec) -> v2.Compose:
    """The default augmentation: RandomResizedCrop to the crop size + horizontal flip, then normalise."""
    return v2.Compose([
        v2.RandomResizedCrop(spec.crop_size, interpolation=InterpolationMode(spec.interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std)),
    ])


class TransformedFiles(ImageFiles):
    """Item i -> (i, float tensor (3, S, S) through ``transform`` or None, reason)."""

    def __init__(self, root, rel_paths: list[str], spec: PreprocessSpec, transform):
        super().__init__(root, rel_paths, spec, draft=False)
        self.transform = transform

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(str(self.root / self.rel_paths[i]))), ""
        except UnreadableImage as e:
            return i, None, str(e) or "unreadable"


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """Backbone blocks in forward order: top-level children with parameters, containers opened once."""
    trunk = getattr(backbone, "trunk", backbone)
    trunk = getattr(trunk, "inner", trunk)  # multi-layer wrappers (extraction/layers.py) hold the model here
    out: list[nn.Module] = []
    for child in trunk.children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            out += [c for c in child.children() if any(True for _ in c.parameters())]
        else:
            out.append(child)
    return out


def set_trainable(model: Classifier, unfreeze: str) -> list[nn.Module]:
    """Freeze the backbone, then unfreeze all of it or its last N blocks; returns the trainable blocks."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    all_blocks = blocks(model.backbone)
    n = _unfreeze_count(unfreeze)
    if n is None:
        chosen = all_blocks
    else:
        if n > len(all_blocks):
            raise FeatcacheError(f"--unfreeze {n}: the backbone has {len(all_blocks)} blocks")
        chosen = all_blocks[len(all_blocks) - n:] if n else []
    for b in chosen:
        for p in b.parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return chosen


def param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """Four AdamW groups: {backbone, head} x {decay: weight matrices/kernels, no decay: biases, norms}."""
    groups = []
    for module, lr in ((model.backbone, cfg.lr * cfg.backbone_lr_mult), (model.head, cfg.lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _splits(disc, class_names: list[str], val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Record indices per split: the source's val split (a val/ folder, a manifest's ``val`` rows), or
    fit-head's own hold-out of train. The source's classes (class folders, a manifest's labels) must
    be the head's."""
    if list(disc.class_names) != list(class_names):
        what = "manifest labels" if disc.source.get("kind") == "manifest" else "class folders"
        raise FeatcacheError(f"{what} {list(disc.class_names)} differ from the head's classes {class_names}")
    labels = np.array([r.label for r in disc.records], dtype=np.int64)
    idx = labeled_split_rows(np.array([r.split for r in disc.records], dtype=object), labels)
    if not len(idx["train"]):
        raise FeatcacheError("no labeled training images to fine-tune on")
    if not len(idx["val"]) and val_fraction > 0:
        idx["train"], idx["val"], _ = hold_out(idx["train"], labels[idx["train"]], val_fraction, seed)
    return {s: v.tolist() for s, v in idx.items()}


def _collate(items):
    ok = [(t, i) for i, t, _ in items if t is not None]
    return (torch.stack([t for t, _ in ok]), torch.tensor([i for _, i in ok])) if ok else (None, None)


def decode_workers(device: torch.device, workers: int | None) -> int:
    """DataLoader worker processes decoding and augmenting images.

    Args:
        device: where training runs; workers: ``--workers`` (None: chosen here).
    Returns:
        ``workers`` as given; else on CUDA one process per core but the main process's, at least
        one (the main process only feeds the GPU, so decoding there would stall it); on the CPU
        none, since the training threads already occupy every core (device.decode_layout).
    """
    if workers is not None:
        return workers
    return max(1, decode_layout(device, None).processes) if device.type == "cuda" else 0


def _loader(ds: ImageFiles, rows: list[int], labels: torch.Tensor, cfg: FinetuneConfig, shuffle: bool, gen=None,
            *, workers: int = 0, pin: bool = False, persistent: bool = False) -> DataLoader:
    """Batches of ``rows``; ``pin``: page-locked host memory, so the copy to the GPU does not block;
    ``persistent``: worker processes outlive an epoch (loaders read once per epoch)."""
    sub = torch.utils.data.Subset(ds, rows)
    return DataLoader(sub, batch_size=cfg.batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      pin_memory=pin, persistent_workers=persistent and workers > 0,
                      collate_fn=functools.partial(_collate_labeled, labels=labels))


def _collate_labeled(items, labels: torch.Tensor):
    """(images (B, 3, S, S), labels (B,)) of the usable items; unreadable files are dropped."""
    x, idx = _collate(items)
    return (x, labels[idx]) if x is not None else (None, None)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device (non-blocking from pinned memory), images channels_last on CUDA."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x.to(memory_format=torch.channels_last) if device.type == "cuda" else x), y


def _sums(device: torch.device) -> torch.Tensor:
    """Running [loss sum, correct] kept on the device (float64): read once per pass, not per batch."""
    return torch.zeros(2, dtype=torch.float64, device=device)


def _add_batch(sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    sums[0] += loss_sum.detach()
    sums[1] += (logits.detach().argmax(1) == y).sum()


def _means(sums: torch.Tensor, n: int) -> tuple[float, float]:
    """(mean loss, accuracy) over ``n`` rows: the pass's one host sync."""
    loss, correct = sums.tolist()
    return loss / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp) -> dict:
    """Mean loss and accuracy of ``model`` on ``loader``'s batches, on ``device`` under ``amp``."""
    model.eval()
    sums, n = _sums(device), 0
    for x, y in loader:
        if x is None:
            continue
        x, y = _to_device(x, y, device)
        with amp:
            logits = model(x).float()
        _add_batch(sums, F.cross_entropy(logits, y, reduction="sum"), logits, y)
        n += len(y)
    if not n:
        return {}
    loss, accuracy = _means(sums, n)
    return {"loss": loss, "accuracy": accuracy}


def train_epoch(model: nn.Module, loader, opt: torch.optim.Optimizer, device: torch.device, amp,
                progress_desc: str | None = None) -> dict:
    """One pass of AdamW steps over ``loader``; returns {"train_loss", "train_accuracy"}.

    Loss and accuracy are summed on the device and read once at the end: a read per step (an
    ``.item()``) would make the host wait for every step's GPU work before queuing the next.
    """
    model.train()
    for m in model.backbone.modules():
        # Batch norm keeps its pretrained running statistics (its affine parameters still train):
        # re-estimating them from small fine-tuning batches shifts every feature the head relies on.
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    sums, n = _sums(device), 0
    bar = tqdm(loader, desc=progress_desc, unit="batch", disable=progress_desc is None, file=sys.stderr)
    for x, y in bar:
        if x is None:
            continue
        x, y = _to_device(x, y, device)
        with amp:
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _add_batch(sums, loss * len(y), logits, y)
        n += len(y)
    loss, accuracy = _means(sums, n)
    return {"train_loss": loss, "train_accuracy": accuracy}


def _unfreeze_count(unfreeze: str) -> int | None:
    """--unfreeze as a number of blocks (None: all); its format is checked before any model loads."""
    if unfreeze == "all":
        return None
    try:
        n = int(unfreeze)
    except ValueError:
        raise FeatcacheError(f"--unfreeze must be 'all' or a number of blocks, got {unfreeze!r}") from None
    if n < 0:
        raise FeatcacheError(f"--unfreeze {n}: the number of blocks must be 0 or more")
    return n


def _check_output(output: str, run_dir: str, image_dir: str) -> None:
    """FT_DIR must be a folder that can be created (or exists) apart from the command's inputs, and
    hold nothing but an earlier finetune's files: checked before ~10 s of loading."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FeatcacheError(f"output {out} is a file; give a folder for the fine-tuned model")
    check_output_folder(out, [("run", run_dir), (f"image {source_kind(image_dir)}", image_dir)], "output")
    if out.is_dir() and any(out.iterdir()) and output_folder_kind(out) != "finetune folder":
        raise FeatcacheError(f"output {out} already holds files and is not a finetune folder; featcache replaces "
                             "only its own fine-tuned models: choose a new folder")
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FeatcacheError(f"output {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FeatcacheError(f"output folder is not writable: {parent}")


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune, keep the best epoch (by val loss; epoch 0 = the frozen-feature solution), save it.

    On CUDA: bf16 autocast, channels_last, cuDNN autotuning, decoding in worker processes into
    pinned memory; the returned scores are computed on the device in that precision.
    """
    t0 = time.perf_counter()
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.backbone_lr_mult < 0:
        raise FeatcacheError("--epochs/--batch-size must be >= 1, --lr > 0, --backbone-lr-mult >= 0")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatcacheError("--workers must be 0 or more")
    _unfreeze_count(cfg.unfreeze)
    _check_output(cfg.output, cfg.run_dir, cfg.image_dir)
    pred = load_run(cfg.run_dir)
    disc = open_source(cfg.image_dir)  # a folder tree or a .csv/.tsv manifest, as extract reads it
    rows = _splits(disc, pred.class_names, cfg.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    # Fixed crop size: cuDNN may time its algorithms once per shape and keep the fastest (fine-tuning
    # promises no bit-equal rerun, unlike extraction).
    cuda = device.type == "cuda"
    with cuda_math(deterministic=False, benchmark=True, tf32=True) if cuda else contextlib.nullcontext():
        return _finetune(cfg, pred, disc, rows, device, progress, t0)


def _finetune(cfg: FinetuneConfig, pred, disc, rows: dict[str, list[int]], device: torch.device, progress: bool,
              t0: float) -> dict:
    torch.manual_seed(cfg.seed)
    model = pred.model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    trainable = set_trainable(model, cfg.unfreeze)
    labels = torch.tensor([r.label for r in disc.records])
    paths = [r.path for r in disc.records]
    train_ds = TransformedFiles(disc.root, paths, pred.preprocess, train_transform(pred.preprocess))
    eval_ds = TransformedFiles(disc.root, paths, pred.preprocess, pred.preprocess.transform())
    gen = torch.Generator().manual_seed(cfg.seed)
    io = {"workers": decode_workers(device, cfg.workers), "pin": cuda}
    train_dl = _loader(train_ds, rows["train"], labels, cfg, True, gen, persistent=True, **io)
    val_dl = _loader(eval_ds, rows["val"], labels, cfg, False, persistent=True, **io) if rows["val"] else None
    baseline = evaluate(model, val_dl, device, amp) if val_dl else {}
    opt = torch.optim.AdamW(param_groups(model, cfg))
    # Epoch 0 (the frozen-feature solution) competes too: fine-tuning never returns a worse model.
    best = baseline.get("loss", float("inf"))
    best_state, best_epoch, wait, history = copy.deepcopy(model.state_dict()), 0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        rec = {"epoch": epoch, **train_epoch(model, train_dl, opt, device, amp,
                                             f"finetune {epoch}/{cfg.epochs}" if progress else None)}
        if val_dl:
            v = evaluate(model, val_dl, device, amp)
            rec.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        history.append(rec)
        current = rec.get("val_loss", -epoch)  # without val rows the last epoch wins
        if current < best:
            best, best_state, best_epoch, wait = current, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            wait += 1
            if val_dl and cfg.patience > 0 and wait >= cfg.patience:
                break
    model.load_state_dict(best_state)
    # Scored where it trained, in its training precision (the val scores match the history's).
    scores = {s: evaluate(model, val_dl if s == "val" else _loader(eval_ds, rows[s], labels, cfg, False, **io),
                          device, amp) for s in ("train", "val", "test") if rows[s]}
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    meta = {**pred.meta, "preprocess": pred.preprocess.to_dict(), "finetune_config": asdict(cfg)}
    out = Path(cfg.output)
    save_finetuned(out, model, meta)
    metrics = {f"{s}_{k}": v for s, sc in scores.items() for k, v in sc.items()}
    metrics.update(best_epoch=best_epoch, epochs_run=len(history), history=history, config=asdict(cfg),
                   frozen_head_val_accuracy=baseline.get("accuracy"), trainable_blocks=len(trainable),
                   class_names=pred.class_names, device=str(device), decode_workers=io["workers"],
                   precision="bf16 autocast" if cuda else "fp32", seconds=round(time.perf_counter() - t0, 3))
    write_json(out / "metrics.json", metrics)
    return {"ft_dir": str(out), **{k: v for k, v in metrics.items() if k != "history"}}
