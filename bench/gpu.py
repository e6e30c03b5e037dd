"""GPU benchmark (issue 26): extraction, the stacked head sweep, the exact linear probe and stacked
K-fold CV on one CUDA GPU, with the device printed first. Not a test: it prints figures.

  extraction  bare      : the backbone's eager forward under autocast (--amp), channels_last, on
                          preprocessed batches already on the GPU (one untimed warm-up) -- the model alone;
              featcache : ``featcache extract`` on generated photo-like JPEGs (bench/photos.py) in a
                          fresh process, timed spawn to exit (interpreter, imports, model build,
                          decoding, compute, journal, HDF5 cache), and its own compute-phase rate;
              rounds interleave the two arms, so load falls on both alike.
  heads       sweep     : 100 linear heads (4 lr x 5 L2 x 5 L1, Adam) trained stacked (train_many);
              exact     : the exact linear probe (L-BFGS) over the 10-value C path (fit_exact);
              cv        : 5-fold CV of 8 linear configurations as one stack of 40 masked heads.
  Synthetic CNN-like features (bench/features.py), all on the GPU; seconds include a final synchronize.

    .venv/bin/python bench/gpu.py            # 2,048 photos x resnet50; N=50,000 x D=2,048 features
    .venv/bin/python bench/gpu.py --quick    # 256 photos x resnet18; N=10,000 x D=512 (smoke run)

Without a CUDA GPU it prints one line saying so and exits 0 (``--device cpu --quick`` runs the
script itself on the CPU, as a check of the script, not a figure to report).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda")  # --device


def device_line() -> str:
    """The GPU and the software that drives it, in one line."""
    p = torch.cuda.get_device_properties(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"device: {p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{torch.cuda.device_count()} visible); torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; {cores} CPU cores ({platform.processor() or platform.machine()})")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _synced(fn):
    """(result, seconds) of fn(), GPU work included."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


# ---- extraction ---------------------------------------------------------------------------------

def bare_forward(backbone: str, n: int, batch: int, amp: str) -> float:
    """Images/s of the eager backbone under autocast on preprocessed batches already on the GPU."""
    from featcache.pipeline.extraction.accel import AMP_DTYPES, resolve_amp
    from featcache.pipeline.extraction.backbones import build_backbone

    dev = DEVICE
    bb = build_backbone(backbone, "none")
    model = bb.model.eval().to(dev, memory_format=torch.channels_last)
    size = bb.preprocess.crop_size
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    dtype = AMP_DTYPES.get(resolve_amp(amp, dev))
    ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else contextlib.nullcontext
    steps = max(1, n // batch)
    with torch.inference_mode(), ctx():
        model(x)  # warm-up: cuDNN handles, allocator
        _, secs = _synced(lambda: [model(x) for _ in range(steps)])
    return steps * batch / secs


def featcache_extract(photos: Path, out: Path, backbone: str, batch: int, amp: str) -> tuple[float, dict]:
    """(spawn-to-exit seconds, --json summary) of one ``featcache extract`` process."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(photos), "-o", str(out), "--backbone", backbone,
           "--weights", "none", "--device", DEVICE.type, "--batch-size", str(batch), "--amp", amp, "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    secs = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"featcache extract failed: {p.stderr.strip()[-500:]}")
    return secs, json.loads(p.stdout)


def extraction(args, tmp: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from photos import make_photo_folder

    photos = make_photo_folder(tmp / "photos", args.images)
    print(f"\n[extraction] {args.images} photo-like JPEGs 500x375, {args.backbone} (random init), batch {args.batch}, "
          f"--amp {args.amp}; {args.rounds} interleaved rounds")
    for r in range(args.rounds):
        bare = bare_forward(args.backbone, args.images, args.batch, args.amp)
        secs, s = featcache_extract(photos, tmp / "cache.h5", args.backbone, args.batch, args.amp)
        whole = args.images / secs
        print(f"  round {r + 1}: bare forward {bare:8.1f} img/s | featcache whole process {whole:8.1f} img/s "
              f"({secs:.1f} s spawn to exit; {s['images_per_second']} img/s over its compute phase) | "
              f"whole/bare {whole / bare:.2f}")
    print(f"  featcache ran: {s['inference']}; decoding: {s['decode']}; phases {s['phases']}")


# ---- heads --------------------------------------------------------------------------------------

def heads(args) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from features import as_cache, make_features

    from featcache.pipeline.config import HeadConfig
    from featcache.pipeline.heads.cv import fold_splits
    from featcache.pipeline.heads.data import prepare
    from featcache.pipeline.heads.exact import DEFAULT_C_PATH, fit_exact
    from featcache.pipeline.heads.masks import HeadTask
    from featcache.pipeline.heads.sweep import expand
    from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_many

    dev = DEVICE
    X, y = make_features(args.n, args.dim, 10, 0)
    data = prepare(as_cache(X, y), 0.2, 0, True, dev)  # fit-head's split and standardisation, on the GPU
    Xtr, ytr = data.split("train")
    Xv, yv = data.split("val")
    k = len(data.class_names)
    print(f"\n[heads] synthetic N={args.n:,} x D={args.dim:,}, 10 classes: train {len(Xtr):,} / val {len(Xv):,}")

    decays = tuple(float(f"{1 / (c * len(Xtr)):.3g}") for c in HeadConfig.C)
    params = expand(HeadConfig(cache="-", output="-", head="linear", lr=(1e-4, 3e-4, 1e-3, 3e-3),
                               weight_decay=decays, l1=(0.0, 1e-6, 1e-5, 1e-4, 1e-3)))
    settings = TrainSettings(args.epochs, 256, 3)
    res, secs = _synced(lambda: train_many(params, data=TrainData(Xtr, ytr, k, Xv, yv), settings=settings))
    best = max(r.history[r.best_epoch - 1]["val_accuracy"] for r in res)
    epochs = sum(len(r.history) for r in res)
    print(f"  sweep: {len(params)} linear heads stacked, {epochs} head-epochs (<= {args.epochs} each): {secs:.2f} s "
          f"({epochs / secs:.0f} head-epochs/s); best val acc {best:.4f}")

    path, secs = _synced(lambda: fit_exact(DEFAULT_C_PATH, Xtr, ytr, k))
    with torch.no_grad():
        accs = [float((r.head.to(dev)(Xv).argmax(1) == yv).double().mean()) for r in path]
    print(f"  exact probe: {len(path)} C values {DEFAULT_C_PATH[0]:g}..{DEFAULT_C_PATH[-1]:g}: {secs:.2f} s "
          f"({sum(r.n_iter for r in path)} L-BFGS iterations, {sum(r.converged for r in path)} converged); "
          f"best val acc {max(accs):.4f} at C={DEFAULT_C_PATH[int(np.argmax(accs))]:g}")

    folds = fold_splits(ytr.cpu().numpy(), 5, seed=0)
    configs = [HeadParams(lr=lr, weight_decay=wd) for lr in (1e-3, 1e-2) for wd in (0.0, 1e-4, 1e-3, 1e-2)]
    tasks = [HeadTask(p, rows=tr, eval_rows=ho, standardize=True) for p in configs for tr, ho in folds]
    res, secs = _synced(lambda: train_many(tasks, data=TrainData(Xtr, ytr, k, Xtr, ytr), settings=settings))
    means = [np.mean([res[i * 5 + f].history[res[i * 5 + f].best_epoch - 1]["val_accuracy"] for f in range(5)])
             for i in range(len(configs))]
    print(f"  cv: 5 folds x {len(configs)} configurations = {len(tasks)} masked heads in one stack: {secs:.2f} s; "
          f"best mean fold accuracy {max(means):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 photos x resnet18, N=10,000 x D=512")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--skip-extraction", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script itself")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA GPU available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "nothing measured")
        return
    if args.quick:
        args.images, args.backbone, args.n, args.dim, args.rounds = 256, "resnet18", 10_000, 512, 1
    print(device_line() if DEVICE.type == "cuda" else "device: cpu (a check of this script; no GPU figures)")
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-bench-") as tmp:
        if not args.skip_extraction:
            extraction(args, Path(tmp))
    heads(args)


if __name__ == "__main__":
    main()
