"""``featcache extract``: discover -> plan -> run the frozen backbone on new images -> assemble the cache."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from tqdm import tqdm

from cache.fingerprint import fingerprint
from cache.journal import Journal, Part
from cache.lock import cache_lock
from cache.store import SCHEMA_VERSION, CacheWriter, open_checked, read_cache
from pipeline.backbones import Backbone, build_backbone
from pipeline.config import ExtractConfig
from pipeline.device import resolve_device, usable_cores
from pipeline.discover import discover
from pipeline.errors import FeatcacheError
from pipeline.images import IMAGE_POLICY
from pipeline.loader import ImageFiles, make_loader
from pipeline.plan import Plan, batches_of, make_plan

DTYPES = ("float32", "float16")
REUSE_BLOCK = 4096  # rows copied from the previous cache per read


def _check(cfg: ExtractConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise FeatcacheError(f"unknown dtype {cfg.dtype!r}: choose float32 or float16")
    if cfg.batch_size < 1:
        raise FeatcacheError("--batch-size must be at least 1")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatcacheError("--workers must be 0 or more")
    if not 0.0 <= cfg.max_skipped <= 1.0:
        raise FeatcacheError("--max-skipped must be a fraction between 0 and 1")
    parent = Path(cfg.output).resolve().parent
    if not parent.is_dir():
        raise FeatcacheError(f"output folder does not exist: {parent}")


def cache_identity(bb: Backbone, dtype: str) -> dict:
    """Everything that determines feature values; its hash is the cache fingerprint."""
    return {**bb.description, "preprocess": bb.preprocess.to_dict(), "image_policy": IMAGE_POLICY,
            "dtype": dtype, "schema_version": SCHEMA_VERSION}


def _previous_cache(cfg: ExtractConfig, fp: str):
    """The existing cache at the output path if its rows can be reused, else None."""
    out = Path(cfg.output)
    if not out.exists():
        return None
    try:
        old = read_cache(out, features=False)
    except FeatcacheError as e:
        if cfg.overwrite:
            return None
        raise FeatcacheError(f"{e}; pass --overwrite to replace it") from None
    if old.fingerprint != fp:
        if cfg.overwrite:
            return None
        was = {k: old.attrs.get(k) for k in ("backbone", "weights", "layer", "pool", "dtype")}
        raise FeatcacheError(
            f"{out} was built with a different configuration ({', '.join(f'{k}={v}' for k, v in was.items())}); "
            "pass --overwrite to replace it"
        )
    return old


def _workers(cfg: ExtractConfig) -> int:
    # One decoding worker per spare core; the main process runs the backbone on the rest.
    return cfg.workers if cfg.workers is not None else max(0, min(8, usable_cores() - 1))


def _run_backbone(cfg, bb, device, disc, plan, journal, progress) -> tuple[dict[int, Part], int]:
    """Run the backbone on every planned batch not already in the journal."""
    batches = batches_of(plan.compute, cfg.batch_size)
    keys = [[plan.key(i) for i in b] for b in batches]
    parts: dict[int, Part] = {}
    for b, k in enumerate(keys):
        part = journal.load(b, k)
        if part is not None:
            parts[b] = part
    pending = [b for b in range(len(batches)) if b not in parts]
    resumed = len(parts)
    dataset = ImageFiles(disc.root, [r.path for r in disc.records], bb.preprocess)
    loader = make_loader(dataset, [batches[b] for b in pending], _workers(cfg), device.type == "cuda")
    model = bb.model.to(device)
    bar = tqdm(total=sum(len(batches[b]) for b in pending), unit="img", desc="extract",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    crash_after = int(os.environ.get("FEATCACHE_TEST_CRASH_AFTER_BATCHES", "-1"))  # fault-injection tests
    with torch.inference_mode():
        for n, (b, (_, x, reasons)) in enumerate(zip(pending, loader)):
            if x is not None:
                feats = model(x.to(device, non_blocking=True)).float().cpu().numpy()
            else:
                feats = np.zeros((0, bb.feature_dim), np.float32)
            parts[b] = Part(keys[b], feats, reasons)
            journal.save(b, parts[b])
            bar.update(len(reasons))
            if n + 1 == crash_after:
                os.kill(os.getpid(), 9)
    bar.close()
    return {i: (parts[b], j) for b, batch in enumerate(batches) for j, i in enumerate(batch)}, resumed


def _assemble(cfg, bb, disc, plan, old, computed, identity, fp) -> dict:
    """Write the final cache: reused rows, newly computed rows and the skipped list, in path order."""
    skipped: list[tuple[str, str]] = [(disc.records[i].path, r) for i, r in plan.stat_errors.items()]
    row_of: dict[int, int] = {}
    for i in range(len(plan.records)):
        if i in plan.reuse or (i in computed and computed[i][0].reasons[computed[i][1]] == ""):
            row_of[i] = len(row_of)
        elif i in computed:
            part, j = computed[i]
            skipped.append((disc.records[i].path, part.reasons[j]))
    skipped.sort()
    n_files = len(plan.records)
    if not row_of:
        raise FeatcacheError(f"none of the {n_files} image files could be used (first: {skipped[0][1]})")
    if len(skipped) > cfg.max_skipped * n_files:
        raise FeatcacheError(
            f"{len(skipped)} of {n_files} files are unusable (more than --max-skipped {cfg.max_skipped}); "
            f"first: {skipped[0][0]}: {skipped[0][1]}"
        )
    writer = CacheWriter(cfg.output, len(row_of), bb.feature_dim, cfg.dtype)
    try:
        if plan.reuse:  # both caches are sorted by path, so reused rows are increasing on both sides
            pairs = sorted((row_of[i], r) for i, r in plan.reuse.items())
            with open_checked(cfg.output) as f_old:
                for k in range(0, len(pairs), REUSE_BLOCK):
                    block = pairs[k: k + REUSE_BLOCK]
                    writer.write_features([p[0] for p in block], f_old["features"][[p[1] for p in block]])
        # A part's features hold only its usable images: position j maps to feature row pos[j].
        by_part: dict[int, tuple] = {}
        for i, (part, j) in computed.items():
            if i in row_of:
                entry = by_part.setdefault(id(part), (part, [], [], np.cumsum([r == "" for r in part.reasons]) - 1))
                entry[1].append(row_of[i])
                entry[2].append(int(entry[3][j]))
        for part, rows, feat_idx, _ in by_part.values():
            writer.write_features(rows, part.features[feat_idx].astype(cfg.dtype))
        order = sorted(row_of, key=row_of.get)
        states = [plan.states[i] for i in order]
        writer.write_columns({
            "labels": [disc.records[i].label for i in order],
            "paths": [disc.records[i].path for i in order],
            "split": [disc.records[i].split for i in order],
            "file_size": [s.size for s in states],
            "file_mtime_ns": [s.mtime_ns for s in states],
            "file_sha256": [s.sha256 for s in states],
        })
        attrs = {
            "fingerprint": fp, "class_names": list(disc.class_names), "backbone": bb.description["backbone"],
            "weights": bb.description["weights"], "layer": bb.description["layer"], "pool": bb.description["pool"],
            "preprocess": bb.preprocess.to_dict(), "image_policy": IMAGE_POLICY, "dtype": cfg.dtype,
            "feature_dim": bb.feature_dim, "n_images": len(row_of), "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "h5py_version": h5py.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": asdict(cfg),
            "description": identity,
        }
        writer.finish(attrs, skipped)
    except BaseException:
        writer.abort()
        raise
    splits = [disc.records[i].split for i in row_of]
    return {"n_images": len(row_of), "skipped": len(skipped), "skipped_files": skipped[:20],
            "splits": {s: splits.count(s) for s in ("train", "val", "test") if s in splits}}


def run_extract(cfg: ExtractConfig, progress: bool = True) -> dict:
    """Run or update an extraction and return its summary (what ``--json`` prints)."""
    t0 = time.perf_counter()
    _check(cfg)
    disc = discover(cfg.image_dir)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    bb = build_backbone(cfg.backbone, cfg.weights, cfg.layer, cfg.pool, cfg.seed)
    identity = cache_identity(bb, cfg.dtype)
    fp = fingerprint(identity)
    out = Path(cfg.output)
    with cache_lock(out):
        for stale in out.parent.glob(f"{out.name}.tmp-*"):  # left by a killed run; we hold the lock
            stale.unlink(missing_ok=True)
        old = _previous_cache(cfg, fp)
        plan = make_plan(disc, old, cfg.verify_content)
        journal = Journal(out, fp)
        journal.open()
        t1 = time.perf_counter()
        computed, resumed = _run_backbone(cfg, bb, device, disc, plan, journal, progress)
        compute_s = time.perf_counter() - t1
        result = _assemble(cfg, bb, disc, plan, old, computed, identity, fp)
        journal.remove()
    n_new = len(plan.compute)  # files sent to the backbone (this run or a resumed one)
    return {
        "cache": str(out), **{k: result[k] for k in ("n_images", "splits")}, "feature_dim": bb.feature_dim,
        "backbone": cfg.backbone, "weights": bb.description["weights"], "layer": bb.description["layer"],
        "pool": bb.description["pool"], "dtype": cfg.dtype, "device": str(device),
        "classes": list(disc.class_names), "extracted": result["n_images"] - len(plan.reuse), "reused": len(plan.reuse),
        "removed": plan.removed, "skipped": result["skipped"], "skipped_files": result["skipped_files"],
        "resumed_batches": resumed, "fingerprint": fp,
        "images_per_second": round(n_new / compute_s, 2) if n_new and compute_s > 0 else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
