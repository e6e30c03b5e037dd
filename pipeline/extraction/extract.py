"""``featcache extract``: discover -> plan -> run the frozen backbone on new images -> assemble the cache."""
from __future__ import annotations

import glob
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from tqdm import tqdm

from featcache.cache.atomic import check_replaceable, ensure_free_space, real_path
from featcache.cache.featwrite import write_feature_rows
from featcache.cache.fingerprint import fingerprint
from featcache.cache.journal import Journal, Part
from featcache.cache.lock import cache_lock
from featcache.cache.saver import PartSaver
from featcache.cache.store import SCHEMA_VERSION, CacheWriter, read_cache
from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.device import compute_threads, decode_layout, resolve_device
from featcache.pipeline.errors import FeatcacheError, opt
from featcache.pipeline.extraction.accel import (
    COMPILE_MODES,
    Runner,
    compile_wanted,
    heap_reuse,
    precision_conflict,
    precision_identity,
    precision_record,
    recorded_precision,
    resolve_amp,
)
from featcache.pipeline.extraction.augment import recipe_of
from featcache.pipeline.extraction.backbones import Backbone, build_backbone
from featcache.pipeline.extraction.discover import IMG_EXTENSIONS, Discovery
from featcache.pipeline.extraction.distributed import DistContext, barrier, gather, shutdown
from featcache.pipeline.extraction.distributed import init as dist_init
from featcache.pipeline.extraction.images import IMAGE_POLICY
from featcache.pipeline.extraction.loader import ImageFiles, decode_batches, draft_min_side
from featcache.pipeline.extraction.output import cache_target
from featcache.pipeline.extraction.plan import Plan, batches_of, check_consent, make_plan, space_needed
from featcache.pipeline.extraction.quickcheck import quick_attrs
from featcache.pipeline.extraction.sources import open_source
from featcache.pipeline.extraction.views import Views, split_rows, write_views

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Job:
    """One extraction, fixed once the backbone is built and the plan made: what to compute and
    how to describe it (``identity`` is what ``fp`` fingerprints)."""

    cfg: ExtractConfig
    bb: Backbone
    disc: Discovery
    plan: Plan
    views: Views
    identity: dict
    fp: str
    target: Path  # the cache's real path: a symlinked cache is written through, and stays a symlink


@dataclass
class Computed:
    """This run's planned batches and what each image of them became, without their features: those
    are committed to the journal as each batch finishes and read back from it, a batch at a time,
    when the cache is assembled (memory does not grow with the number of images by N x D)."""

    journal: Journal
    batches: list[list[int]]  # record indices of each batch
    keys: list[list[str]]  # the journal keys of each batch's images
    reasons: dict[int, list[str]]  # batch -> each image's skip reason ("" = usable); every batch on rank 0

    def features(self, b: int) -> np.ndarray:
        return self._read(b, "features")

    def views(self, b: int) -> np.ndarray:
        return self._read(b, "views")

    def _read(self, b: int, name: str) -> np.ndarray:
        arr = self.journal.load_array(b, self.keys[b], name)
        if arr is None:  # a rerun recomputes it: at start a part is reused only if it reads back whole
            raise FeatcacheError(f"batch {b} cannot be read back from {self.journal.dir}; the cache is unchanged: "
                                 "run the same command again to recompute that batch")
        return arr


def _check(cfg: ExtractConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise FeatcacheError(f"unknown {opt('dtype')} {cfg.dtype!r}: choose float32 or float16")
    if cfg.batch_size < 1:
        raise FeatcacheError(f"{opt('batch_size')} must be at least 1")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatcacheError(f"{opt('workers')} must be 0 or more")
    if cfg.compile not in COMPILE_MODES:
        raise FeatcacheError(f"unknown {opt('compile')} mode {cfg.compile!r}: choose auto, on or off")
    if not 0.0 <= cfg.max_skipped <= 1.0:
        raise FeatcacheError(f"{opt('max_skipped')} must be a fraction between 0 and 1")
    recipe_of(cfg)  # its one-line errors, before any work
    # a folder, a missing or read-only folder, a name too long: now, not after the whole extraction
    check_replaceable(cache_target(cfg.output), "cache")  # a read-only cache is refused, never replaced


def cache_identity(bb: Backbone, dtype: str, draft: bool = True) -> dict:
    """Everything that determines feature values; its hash is the cache fingerprint.

    ``jpeg_draft_min_side``: JPEGs whose shorter side is at least twice this were decoded at a
    reduced scale (null: always fully decoded); it changes the pixels the backbone sees.
    Speed-only choices (--optimize, --compile, --workers, --batch-size) are not part of it; the
    device type and autocast precision are (accel.precision_identity, added by the caller).
    """
    return {**bb.description, "preprocess": bb.preprocess.to_dict(), "image_policy": IMAGE_POLICY,
            "jpeg_draft_min_side": draft_min_side(bb.preprocess, draft), "dtype": dtype,
            "schema_version": SCHEMA_VERSION}


def _previous_cache(cfg: ExtractConfig, fp: str, base_identity: dict, precision: dict):
    """The existing cache at the output path if its rows can be reused, else None."""
    out = Path(cfg.output)
    if not out.exists():
        return None
    try:
        old = read_cache(out, features=False)
    except FeatcacheError as e:
        if cfg.overwrite:
            return None
        advice = "" if "--overwrite" in str(e) else "; pass --overwrite to replace it"  # said once, and it works
        raise FeatcacheError(f"{e}{advice}") from None
    if old.fingerprint != fp:
        if cfg.overwrite:
            return None
        conflict = precision_conflict(old.attrs, base_identity, precision)
        if conflict:  # the same features but for the device/precision: never mix rows of two precisions
            raise FeatcacheError(f"{out} {conflict}")
        was = {k: old.attrs.get(k) for k in ("backbone", "weights", "layer", "pool", "dtype")}
        raise FeatcacheError(
            f"{out} was built with a different configuration ({', '.join(f'{k}={v}' for k, v in was.items())}); "
            "pass --overwrite to replace it"
        )
    return old


def _any_usable(dataset: ImageFiles, batches: list[list[int]]) -> bool:
    """Whether any image of ``batches`` decodes, tried in order and stopping at the first that does
    (normally the first image): compiling costs tens of seconds, for nothing when every file is
    unreadable."""
    return any(dataset[i][1] is not None for batch in batches for i in batch)


def _run_backbone(job: Job, *, device: torch.device, journal: Journal, ctx: DistContext,
                  progress: bool) -> tuple[Computed, int, dict]:
    """Run the backbone on every planned batch not already in the journal (under torchrun: only
    this rank's batches, b % world_size == rank; rank 0 then collects everyone's skip reasons).

    Every batch's features go to the journal only: none is kept here, so memory does not grow with
    the number of images; ``_assemble`` reads them back a batch at a time.

    Returns (the batches and their skip reasons, batches resumed from the journal, speed facts).
    """
    cfg, bb, disc, plan, views = job.cfg, job.bb, job.disc, job.plan, job.views
    batches = batches_of(plan.compute, cfg.batch_size, views.rows if views.n else None)
    keys = [[plan.key(i) for i in b] for b in batches]
    reasons: dict[int, list[str]] = {}
    for b, k in enumerate(keys):
        part = journal.load(b, k)  # read whole (a torn or corrupt part is recomputed), then let go
        if part is not None:
            reasons[b] = part.reasons
        del part
    pending = [b for b in range(len(batches)) if b not in reasons and ctx.owns(b)]
    resumed = len(reasons)
    # Decided from the whole planned job, not from what is left of it, so a resumed run computes
    # with the same form as an uninterrupted one (identical features).
    # Counted in backbone rows: with --augment each train image costs 1 + V of them.
    dataset = ImageFiles(disc.root, [r.path for r in disc.records], bb.preprocess, cfg.draft, views.recipe,
                         frozenset(i for i in plan.compute if views.wants(i)))
    compile_model = (bool(pending) and compile_wanted(cfg.compile, device, sum(views.rows(i) for i in plan.compute))
                     and _any_usable(dataset, [batches[b] for b in pending]))
    t_setup = time.perf_counter()
    # Not overlapped with decoding: BN folding traces with torch.fx, which patches nn.Module.__call__
    # process-wide, so decoding threads running torchvision transforms meanwhile would be traced too.
    runner = Runner(bb.model, bb.preprocess, device, cfg.optimize, compile_model, cfg.batch_size,
                    compile_fallback=cfg.compile == "auto", amp=recorded_precision(job.identity)["amp"])
    phases = {"setup_s": time.perf_counter() - t_setup, "decode_s": 0.0, "compute_s": 0.0}
    layout = decode_layout(device, cfg.workers)
    loader = decode_batches(dataset, [batches[b] for b in pending], layout.processes, layout.threads,
                            pin_memory=device.type == "cuda", prefetch=layout.prefetch)
    bar = tqdm(total=sum(len(batches[b]) for b in pending), unit="img",
               desc=f"extract (+{views.n} views)" if views.n else "extract",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    crash_after = int(os.environ.get("FEATCACHE_TEST_CRASH_AFTER_BATCHES", "-1"))  # fault-injection tests
    saver = PartSaver(journal)  # journal parts are written (and fsynced) off the compute path
    finished = False
    try:
        with torch.inference_mode(), heap_reuse(cfg.optimize and device.type == "cpu"):
            # On CUDA the runner queues batch b+1 before waiting for batch b's features; it adds the
            # seconds spent waiting for batches (decode_s) and for the backbone (compute_s) to phases.
            work = (((b, why), x) for b, (_, x, why) in zip(pending, loader))
            for n, ((b, why), feats) in enumerate(runner.stream(work, phases)):
                t1 = time.perf_counter()
                feats = feats if feats is not None else np.zeros((0, bb.feature_dim), np.float32)
                firsts, view_feats = split_rows(feats, batches[b], why, views)
                del feats
                saver.save(b, Part(keys[b], firsts, why, view_feats))  # the saver lets go once it is written
                reasons[b] = why
                bar.update(len(why))
                phases["compute_s"] += time.perf_counter() - t1
                if n + 1 == crash_after and os.environ.get("FEATCACHE_TEST_CRASH_RANK", str(ctx.rank)) == str(ctx.rank):
                    saver.close()  # exactly n + 1 parts committed, as when they were saved inline
                    # SIGKILL by default; FEATCACHE_TEST_CRASH_SIGNAL=15 tests SIGTERM, decode workers running
                    os.kill(os.getpid(), int(os.environ.get("FEATCACHE_TEST_CRASH_SIGNAL", "9")))
        finished = True
    finally:
        getattr(loader, "close", lambda: None)()  # stop decoding threads now, not at garbage collection
        saver.close(raise_errors=finished)  # commit what was computed; never mask the error in flight
        bar.close()
    if ctx.enabled:
        barrier(ctx)  # every rank has committed its parts
        for b, k in enumerate(keys):
            if b not in reasons and ctx.is_main:  # the reasons only: the features are read when assembling
                why = journal.load_reasons(b, k)
                if why is None:
                    raise FeatcacheError(f"batch {b} is missing from {journal.dir} after every rank finished")
                reasons[b] = why
    speed = {"ran_here": sum(len(batches[b]) for b in pending), "inference": runner.accel.describe(),
             "compile_seconds": round(runner.accel.compile_seconds, 2),
             "decode": layout.describe(), "phases": {k: round(v, 2) for k, v in phases.items()}}
    return Computed(journal, batches, keys, reasons), resumed, speed


def _assemble(job: Job, old, computed: Computed) -> dict:
    """Write the final cache: reused rows, newly computed rows and the skipped list, in path order.

    New rows are read back from the journal one batch at a time and written in whole chunk blocks
    (cache/featwrite.py): memory is a block and a batch or two, whatever the number of images.
    """
    cfg, bb, disc, plan, views = job.cfg, job.bb, job.disc, job.plan, job.views
    skipped: list[tuple[str, str]] = [(disc.records[i].path, r) for i, r in plan.stat_errors.items()]
    skipped += disc.skipped  # names that cannot be stored, folders that cannot be read (discover.py)
    unusable: dict[int, str] = {}  # computed images the backbone could not use -> why
    for b, batch in enumerate(computed.batches):
        unusable.update((i, r) for i, r in zip(batch, computed.reasons[b]) if r)
    row_of: dict[int, int] = {}
    for i in range(len(plan.records)):
        if i in unusable:
            skipped.append((disc.records[i].path, unusable[i]))
        elif i in plan.reuse or plan.states[i] is not None:  # reused, or computed (stat_errors are neither)
            row_of[i] = len(row_of)
    skipped.sort()
    n_files = len(plan.records) + len(disc.skipped)
    if not row_of:
        raise FeatcacheError(f"none of the {n_files} image files could be used (first: {skipped[0][1]})")
    if len(skipped) > cfg.max_skipped * n_files:
        raise FeatcacheError(
            f"{len(skipped)} of {n_files} files are unusable (more than --max-skipped {cfg.max_skipped}); "
            f"first: {skipped[0][0]}: {skipped[0][1]}"
        )
    writer = CacheWriter(job.target, len(row_of), bb.feature_dim, cfg.dtype, views.n,
                         view_rows=sum(1 for i in row_of if views.wants(i)))
    try:
        # A part's features hold only its usable images, in batch order; its views only those of
        # them that get views. Final row -> (batch, index into that batch's array).
        new_rows: dict[int, tuple[int, int]] = {}
        new_views: dict[int, tuple[int, int]] = {}
        for b, batch in enumerate(computed.batches):
            usable = [i for i, r in zip(batch, computed.reasons[b]) if not r]
            new_rows.update((row_of[i], (b, j)) for j, i in enumerate(usable))
            if views.n:
                new_views.update((row_of[i], (b, j)) for j, i in enumerate(i for i in usable if views.wants(i)))
        write_feature_rows(writer, len(row_of), bb.feature_dim, cfg.dtype, new_rows,
                           {row_of[i]: r for i, r in plan.reuse.items()}, job.target if plan.reuse else None,
                           load=computed.features)
        del new_rows
        if views.n:
            write_views(writer, cfg, bb, plan, new_views, row_of, views, load=computed.views)
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
            "fingerprint": job.fp, "class_names": list(disc.class_names), "backbone": bb.description["backbone"],
            "weights": bb.description["weights"], "layer": bb.description["layer"], "pool": bb.description["pool"],
            "preprocess": bb.preprocess.to_dict(), "image_policy": IMAGE_POLICY, "dtype": cfg.dtype,
            "feature_dim": bb.feature_dim, "n_images": len(row_of), "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "h5py_version": h5py.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": asdict(cfg),
            "description": job.identity, "n_views": views.n, "augment_fingerprint": views.fingerprint,
            "layers": bb.layers,  # each layer's name, shape, pool and [start, stop) columns of /features
            **({"augment": views.recipe.to_dict()} if views.recipe else {}),
            **({"source": disc.source} if disc.source else {}),  # a manifest's name and sha256 (provenance)
            **quick_attrs(cfg.weights, bb.description["weights"], IMG_EXTENSIONS),  # for quickcheck.up_to_date
        }
        writer.finish(attrs, skipped)
    except BaseException:
        writer.abort()
        raise
    splits = [disc.records[i].split for i in row_of]
    return {"n_images": len(row_of), "skipped": len(skipped), "skipped_files": skipped[:20],
            "view_rows": sum(1 for i in row_of if views.wants(i)),
            "splits": {s: splits.count(s) for s in ("train", "val", "test") if s in splits}}


def run_extract(cfg: ExtractConfig, progress: bool = True) -> dict | None:
    """Run or update an extraction and return its summary (what ``--json`` prints).

    Under torchrun every rank calls this; rank 0 returns the summary, the others None.
    """
    t0 = time.perf_counter()
    _check(cfg)
    disc = open_source(cfg.image_dir)  # a folder tree or a .csv/.tsv manifest (sources.py)
    device = resolve_device(cfg.device)
    resolve_amp(cfg.amp, device, cfg.optimize)  # its one-line errors, before any work
    ctx = dist_init(device.type)
    try:
        return _extract(cfg, disc, device=device, ctx=ctx, progress=progress and ctx.is_main, t0=t0)
    finally:
        shutdown(ctx)


def _extract(cfg: ExtractConfig, disc: Discovery, *, device: torch.device, ctx: DistContext, progress: bool,
             t0: float) -> dict | None:
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # each rank pins its own GPU
    threads = compute_threads(device)
    if threads is not None:  # ranks on one node share its cores (device.cores_per_process)
        torch.set_num_threads(threads)
    bb = build_backbone(cfg.backbone, cfg.weights, cfg.layer, cfg.pool, cfg.seed)
    base_identity = cache_identity(bb, cfg.dtype, cfg.draft)
    precision = precision_record(device, resolve_amp(cfg.amp, device, cfg.optimize))
    identity = {**base_identity, **precision_identity(precision)}  # CPU fp32 adds nothing: old caches match
    fp = fingerprint(identity)
    out = Path(cfg.output)
    target = real_path(out)  # locked and written through; ``out`` stays as spelled (a symlink stays one)
    # Only rank 0 locks and assembles; the other ranks are held together by barriers.
    with cache_lock(out) if ctx.is_main else nullcontext():
        if ctx.is_main:
            for stale in target.parent.glob(f"{glob.escape(target.name)}.tmp-*"):  # left by a killed run; we hold the lock
                stale.unlink(missing_ok=True)
        old = _previous_cache(cfg, fp, base_identity, precision)
        views = Views(recipe_of(cfg), disc, fp)
        plan = make_plan(disc, old, cfg.verify_content, views.wants if views.n else None,
                         old is not None and old.attrs.get("augment_fingerprint", "") == views.fingerprint)
        views_dropped = check_consent(plan, old, out, old_views=old.n_views if old else 0, new_views=views.n,
                                      prune=cfg.prune or cfg.overwrite)  # destructive updates need consent
        ensure_free_space(target, space_needed(plan, len(plan.reuse) + len(plan.compute), bb.feature_dim, cfg.dtype,
                                            views.rows if views.n else None))  # a full disk: one line, before work
        journal = Journal(target, views.fingerprint or fp)  # parts hold views too when there are any
        if ctx.is_main:
            journal.open()
        barrier(ctx)  # the journal exists before any rank writes to it
        job = Job(cfg, bb, disc, plan, views, identity, fp, target)
        t1 = time.perf_counter()
        computed, resumed, speed = _run_backbone(job, device=device, journal=journal, ctx=ctx, progress=progress)
        compute_s = time.perf_counter() - t1
        ranks = gather(ctx, {"rank": ctx.rank, "extracted": speed.pop("ran_here"), "device": str(device)})
        ran = sum(r["extracted"] for r in ranks)  # images the backbone saw in this run (not resumed ones)
        if not ctx.is_main:
            return None
        result = _assemble(job, old, computed)
        journal.remove()
    return {
        "cache": str(out), **{k: result[k] for k in ("n_images", "splits")}, "feature_dim": bb.feature_dim,
        "backbone": cfg.backbone, "weights": bb.description["weights"], "layer": bb.description["layer"],
        "pool": bb.description["pool"], "layers": bb.layers, "dtype": cfg.dtype, "device": str(device),
        "classes": list(disc.class_names), "extracted": result["n_images"] - len(plan.reuse), "reused": len(plan.reuse),
        "removed": plan.removed, "skipped": result["skipped"], "skipped_files": result["skipped_files"],
        "resumed_batches": resumed, "fingerprint": fp, **speed,
        **({"views": {"per_image": views.n, "images": result["view_rows"], "augment_fingerprint": views.fingerprint}}
           if views.n else {}),
        **({"views_dropped": views_dropped} if views_dropped else {}),
        "images_per_second": round(ran / compute_s, 2) if ran and compute_s > 0 else None,
        "seconds": round(time.perf_counter() - t0, 3), "up_to_date": False,
        **({"world_size": ctx.world_size, "ranks": ranks} if ctx.enabled else {}),
    }
