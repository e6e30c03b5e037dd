"""``featcache finetune``: start from the cached-feature solution (backbone + trained head) and train
the whole network (or its last N blocks) on the images with augmentation.

The recipe for ~1,000-image sets: mild crops + flips (``augment``); AdamW with per-group learning
rates (head, backbone via ``backbone_lr_mult``, 0 below the ``unfreeze`` blocks), no decay on biases
and norms; linear warm-up then cosine decay; batch-norm running statistics kept from pretraining
(small batches would re-estimate them badly); the epoch kept by val accuracy, epoch 0 (the frozen
head) competing; early stopping on it. ``image_size`` trains at another side than the run's crop,
e.g. the images' own: ~8x less compute for 96-px drawings than at 224, but ImageNet features are
weaker there (the OpenMoji demo's frozen head: val 0.42 at 96 px against 0.74 at 224).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from featcache.cache.atomic import write_json
from featcache.pipeline.config import FT_AUGMENT, FT_WARMUP, FinetuneConfig
from featcache.pipeline.device import cuda_math, decode_layout, resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.images import UnreadableImage, load_rgb
from featcache.pipeline.extraction.loader import ImageFiles
from featcache.pipeline.extraction.preprocess import PreprocessSpec
from featcache.pipeline.extraction.sources import open_source, source_kind
from featcache.pipeline.heads.data import hold_out, labeled_split_rows
from featcache.pipeline.outputs import check_output_folder, output_folder_kind
from featcache.pipeline.use.model import Classifier, load_run, save_finetuned


def train_transform(spec: PreprocessSpec, augment: str = "mild") -> v2.Compose:
    """PIL RGB image -> normalised float tensor (3, S, S), S = ``spec.crop_size``.

    ``augment`` (FT_AUGMENT): none = the eval preprocessing (resize + centre crop); mild | strong =
    RandomResizedCrop over that area fraction range (aspect 3/4..4/3) + horizontal flip.
    """
    scale = FT_AUGMENT[augment]
    if scale is None:
        return spec.transform()
    return v2.Compose([
        v2.RandomResizedCrop(spec.crop_size, scale=scale, interpolation=InterpolationMode(spec.interpolation),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std)),
    ])


def finetune_spec(spec: PreprocessSpec, image_size: int | None) -> PreprocessSpec:
    """The run's preprocessing, or with ``image_size``: resize the shorter side to it and take the
    centre square (no crop margin: a 96-px drawing at ``image_size`` 96 is used as is, unresampled)."""
    if image_size is None or (image_size == spec.crop_size == spec.resize_size):
        return spec
    return replace(spec, resize_size=image_size, crop_size=image_size,
                   source=f"{spec.source}; finetune --image-size {image_size}")


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


def blocks(backbone: nn.Module, used: set[int] | None = None) -> list[nn.Module]:
    """Backbone blocks in forward order: top-level children with parameters, containers opened once;
    with ``used`` (module ids, see ``modules_run``) only those that take part in the forward pass (a
    timm model's ImageNet classifier sits after pre_logits and never runs: unfreezing it trains nothing)."""
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
    return out if used is None else [b for b in out if id(b) in used]


@torch.no_grad()
def modules_run(model: Classifier, size: int) -> set[int]:
    """Ids of the backbone modules one forward pass of a (1, 3, ``size``, ``size``) image calls.

    The pass also checks that the backbone takes ``size``-px images and still gives the head its
    input width (a flattened spatial layer would not). Batch norm is in eval mode here (the
    classifier is built in eval mode), so the pass changes no running statistics.
    """
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: ran.add(id(mod))) for m in model.backbone.modules()]
    p = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    except (RuntimeError, AssertionError, ValueError) as e:  # timm's fixed-size ViTs assert the side
        raise FeatcacheError(f"--image-size {size}: the backbone and head do not take {size}-px images "
                             f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ran


def set_trainable(model: Classifier, unfreeze: str, size: int | None = None) -> list[nn.Module]:
    """Freeze the backbone, then unfreeze all of it or its last N blocks; returns the trainable blocks.
    With ``size`` (the input side, pixels) blocks count only if a forward pass at that size runs them."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    all_blocks = blocks(model.backbone, None if size is None else modules_run(model, size))
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
    """A batch on the device (non-blocking from pinned memory), images channels_last (NHWC) as the
    model is: cuDNN's and oneDNN's fast convolutions both take NHWC (on 2 CPU cores EfficientNet-Lite0
    evaluates ~2x faster at 224 px, trains ~1.5x faster at 96 px)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.to(memory_format=torch.channels_last), y


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total`` planned: linear
    warm-up over ``warmup`` steps (a freshly built AdamW's first steps are large for every parameter,
    which would jolt the pretrained weights), then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def schedule(opt: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over FT_WARMUP of the planned steps, then cosine decay over the rest (stepped per batch)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(FT_WARMUP * total))
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, total=total, warmup=warmup))


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
                progress_desc: str | None = None, *, sched=None) -> dict:
    """One pass of AdamW steps over ``loader`` (``sched`` stepped after each); returns {"train_loss",
    "train_accuracy"}.

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
        if sched is not None:
            sched.step()
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
    """Fine-tune, keep the best epoch (by val accuracy, then val loss; epoch 0 = the frozen-feature
    solution at its own preprocessing), save it.

    On CUDA: bf16 autocast, cuDNN autotuning, decoding in worker processes into pinned memory; the
    returned scores are computed on the device in that precision.
    """
    t0 = time.perf_counter()
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.backbone_lr_mult < 0:
        raise FeatcacheError("--epochs/--batch-size must be >= 1, --lr > 0, --backbone-lr-mult >= 0")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatcacheError("--workers must be 0 or more")
    if cfg.augment not in FT_AUGMENT:
        raise FeatcacheError(f"--augment must be one of {', '.join(FT_AUGMENT)}, got {cfg.augment!r}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise FeatcacheError(f"--image-size must be a side in pixels >= 1, got {cfg.image_size}")
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


def _better(v: dict, best: dict) -> bool:
    """Val scores ``v`` beat ``best``: higher accuracy (what is reported and what chose the frozen
    head's configuration), a tie broken by lower loss."""
    return (v["accuracy"], -v["loss"]) > (best["accuracy"], -best["loss"])


def _finetune(cfg: FinetuneConfig, pred, disc, rows: dict[str, list[int]], device: torch.device, progress: bool,
              t0: float) -> dict:
    torch.manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    model = pred.model.to(device).to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    spec = finetune_spec(pred.preprocess, cfg.image_size)
    trainable = set_trainable(model, cfg.unfreeze, spec.crop_size)
    labels = torch.tensor([r.label for r in disc.records])
    paths = [r.path for r in disc.records]
    # Epoch 0 is scored at the run's own preprocessing (the head as fit-head left it); the epochs
    # train and are scored at ``spec`` (the same, unless --image-size changes the side).
    own_ds = TransformedFiles(disc.root, paths, pred.preprocess, pred.preprocess.transform())
    eval_ds = own_ds if spec == pred.preprocess else TransformedFiles(disc.root, paths, spec, spec.transform())
    train_ds = TransformedFiles(disc.root, paths, spec, train_transform(spec, cfg.augment))
    gen = torch.Generator().manual_seed(cfg.seed)
    io = {"workers": decode_workers(device, cfg.workers), "pin": cuda}
    train_dl = _loader(train_ds, rows["train"], labels, cfg, True, gen, persistent=True, **io)
    val_dl = _loader(eval_ds, rows["val"], labels, cfg, False, persistent=True, **io) if rows["val"] else None
    baseline = evaluate(model, _loader(own_ds, rows["val"], labels, cfg, False, **io), device, amp) if val_dl else {}
    opt = torch.optim.AdamW(param_groups(model, cfg))
    sched = schedule(opt, cfg.epochs, len(train_dl))
    # Epoch 0 (the frozen-feature solution) competes too: fine-tuning never returns a model worse on val.
    best, best_state, best_epoch, wait, history = baseline, copy.deepcopy(model.state_dict()), 0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        rec = {"epoch": epoch, **train_epoch(model, train_dl, opt, device, amp,
                                             f"finetune {epoch}/{cfg.epochs}" if progress else None, sched=sched)}
        if val_dl:
            v = evaluate(model, val_dl, device, amp)
            rec.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        history.append(rec)
        if not val_dl or not best or _better(v, best):  # without val rows the last epoch wins
            best, best_state, best_epoch, wait = (v if val_dl else {}), copy.deepcopy(model.state_dict()), epoch, 0
        else:
            wait += 1
            if cfg.patience > 0 and wait >= cfg.patience:
                break
    model.load_state_dict(best_state)
    kept_spec, kept_ds = (pred.preprocess, own_ds) if best_epoch == 0 else (spec, eval_ds)
    # Scored where it trained, in its training precision; val is the kept epoch's own score (no pass).
    scores = {s: evaluate(model, _loader(kept_ds, rows[s], labels, cfg, False, **io), device, amp)
              for s in ("train", "test") if rows[s]}
    if best:
        scores["val"] = best
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    meta = {**pred.meta, "preprocess": kept_spec.to_dict(), "finetune_config": asdict(cfg)}
    out = Path(cfg.output)
    save_finetuned(out, model, meta)
    metrics = {f"{s}_{k}": v for s in ("train", "val", "test") if s in scores for k, v in scores[s].items()}
    metrics.update(best_epoch=best_epoch, epochs_run=len(history), history=history, config=asdict(cfg),
                   frozen_head_val_accuracy=baseline.get("accuracy"), trainable_blocks=len(trainable),
                   image_size=kept_spec.crop_size, class_names=pred.class_names, device=str(device),
                   decode_workers=io["workers"], precision="bf16 autocast" if cuda else "fp32",
                   seconds=round(time.perf_counter() - t0, 3))
    write_json(out / "metrics.json", metrics)
    return {"ft_dir": str(out), **{k: v for k, v in metrics.items() if k != "history"}}
