"""Extraction speed, measured in one run on this machine (issue 5). Not a test: it prints figures.

For each backbone, on a folder of generated photo-sized JPEGs (bench/photos.py):
  (a) bare   : the backbone's eager fp32 forward on already-preprocessed tensors in memory
               (NCHW, same batch size, one untimed warm-up batch) -- the model alone;
  (b) naive  : torchvision ImageFolder + DataLoader(num_workers=0) + the eager model in a Python
               loop, features saved with numpy.save -- the obvious script;
  (c) featcache: ``featcache extract`` (cli.py) in a fresh process, rate over the run itself
               (its summary's ``seconds``): model build and optimisation, discovery, decoding,
               compute, journal, HDF5 cache;
  (c+)         the same process timed from spawn to exit: the whole-process figure (adds
               interpreter start and importing torch/torchvision), the one a user waits for;
  no-op        (with --noop-check) the same command again on the unchanged folder, spawn to exit.
All three run with the same torch thread count (the usable cores), interleaved round by round
(a, b, c, a, b, c, ...) so that load from other jobs falls on every arm alike; the load average
is printed before and after, and the script is meant to be run more than once. c+/a compares
the whole featcache process against the bare model's loop alone (issue 14's target: >= 1.3).

    .venv/bin/python bench/extract.py            # 512 images x resnet18, alexnet, efficientnet_lite0
    .venv/bin/python bench/extract.py --quick    # 128 images, resnet18 only (smoke run)
    .venv/bin/python bench/extract.py --models resnet18 --set compile=on   # (c) with torch.compile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from photos import make_photo_folder  # noqa: E402

from featcache.pipeline.device import usable_cores  # noqa: E402
from featcache.pipeline.extraction.backbones import LITE0, build_backbone  # noqa: E402

MODELS = ("resnet18", "alexnet", LITE0)


def weights_for(name: str) -> str:
    """Random weights are as fast as trained ones; Lite0's trained weights ship with the package."""
    return "DEFAULT" if name == LITE0 else "none"


def cpu_model() -> str:
    """The CPU as lscpu names it (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout if shutil.which("lscpu") else ""
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def bare(name: str, root: Path, n: int, batch: int) -> float:
    """(a) eager fp32 forward on preprocessed in-memory tensors; images/s over ``n`` images."""
    from featcache.pipeline.extraction.images import load_rgb

    bb = build_backbone(name, weights_for(name))
    tf = bb.preprocess.transform()
    files = sorted(root.rglob("*.jpg"))[: 2 * batch]
    x = torch.stack([tf(load_rgb(str(f))) for f in files])  # (2*batch, 3, S, S) NCHW, preprocessed
    chunks = [x[k: k + batch] for k in range(0, len(x), batch)]
    with torch.inference_mode():
        bb.model(chunks[0])  # warm-up (oneDNN primitive creation), untimed
        t0 = time.perf_counter()
        done = 0
        while done < n:
            done += bb.model(chunks[(done // batch) % len(chunks)][: n - done]).shape[0]
    return n / (time.perf_counter() - t0)


def naive(name: str, root: Path, n: int, batch: int, out: Path) -> float:
    """(b) model build + ImageFolder + DataLoader(num_workers=0) + eager loop + numpy.save; images/s."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    t0 = time.perf_counter()
    bb = build_backbone(name, weights_for(name))  # the script builds its model too, as (c) does
    ds = ImageFolder(str(root), transform=bb.preprocess.transform())
    feats = []
    with torch.no_grad():
        for x, _ in DataLoader(ds, batch_size=batch, num_workers=0):
            feats.append(bb.model(x).numpy())
    np.save(out, np.concatenate(feats))
    assert len(ds) == n, (len(ds), n)
    return n / (time.perf_counter() - t0)


def blas() -> str:
    """torch's BLAS and oneDNN, from its build configuration."""
    show = torch.__config__.show()
    info = re.search(r"BLAS_INFO=([^,\s]+)", show)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", show)
    return f"BLAS {info.group(1) if info else 'unknown'}, oneDNN {onednn.group(1) if onednn else 'unknown'}"


def cli_args(extra: dict) -> list[str]:
    """ExtractConfig overrides -> ``featcache extract`` options (True flags, False --no-flags)."""
    args = []
    for key, value in extra.items():
        opt = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(opt if value else "--no-" + key.replace("_", "-"))
        else:
            args += [opt, *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return args


def run_cli(name: str, root: Path, batch: int, out: Path, extra: dict) -> tuple[float, dict]:
    """``python cli.py extract ... --json`` in a fresh process -> (seconds spawn to exit, summary)."""
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(root), "-o", str(out), "--backbone", name,
           "--weights", weights_for(name), "--batch-size", str(batch), "--device", "cpu", "--json", *cli_args(extra)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"featcache extract failed: {p.stderr.strip()[-2000:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1])


def featcache(name: str, root: Path, n: int, batch: int, out: Path, extra: dict) -> tuple[float, float, dict]:
    """(c) ``featcache extract`` in a fresh process (isolated: featcache tunes its process's allocator).

    Returns images/s over the run itself (the summary's seconds: model build, optimisation,
    discovery, decoding, compute, journal and HDF5 cache), images/s from process spawn to exit
    (adds interpreter start and importing torch/torchvision), and the JSON summary (with
    ``bench_wall_s``).
    """
    out.unlink(missing_ok=True)
    wall, summary = run_cli(name, root, batch, out, extra)
    assert summary["n_images"] == n and summary["extracted"] == n, summary
    summary["bench_wall_s"] = wall
    return n / summary["seconds"], n / wall, summary


def where_time_went(s: dict) -> str:
    """Spawn-to-exit seconds split into start-up (interpreter + imports + exit), model build +
    discovery + plan, runner set-up (overlapping the first decode), decode waits, compute, write."""
    ph = s["phases"]
    run_backbone = ph["setup_s"] + ph["decode_s"] + ph["compute_s"]
    other = s["seconds"] - run_backbone  # build_backbone, discovery, plan, journal, cache write
    return (f"start+imports+exit {s['bench_wall_s'] - s['seconds']:.1f}s, build+discover+plan+write {other:.1f}s, "
            f"runner set-up {ph['setup_s']:.1f}s, decode {ph['decode_s']:.1f}s, compute {ph['compute_s']:.1f}s")


def compile_check(name: str, batch: int, batches: int = 4) -> str:
    """torch.compile's one-off cost against its per-image saving -> the job size where it pays off."""
    from featcache.pipeline.extraction.accel import Runner, heap_reuse

    u8 = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rates, cost = {}, 0.0
    with heap_reuse():
        for compiled in (False, True):
            bb = build_backbone(name, weights_for(name))
            t0 = time.perf_counter()
            runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), True, compiled, batch)
            with torch.inference_mode():
                runner(u8)  # first batch: oneDNN primitive creation (and the compile itself)
                cost = time.perf_counter() - t0 if compiled else cost
                t1 = time.perf_counter()
                for _ in range(batches):
                    runner(u8)
            rates[compiled] = batches * batch / (time.perf_counter() - t1)
    saving = 1 / rates[False] - 1 / rates[True]  # seconds per image
    pays = f"pays off beyond ~{cost / saving:,.0f} images" if saving > 0 else "never pays off here"
    return (f"compile : {name}: compile + first batch {cost:.1f}s; steady {rates[False]:.1f} img/s optimised eager, "
            f"{rates[True]:.1f} img/s compiled -> {pays}")


def draft_check(folder: Path, size: tuple[int, int] = (4000, 3000), n: int = 4) -> str:
    """Decode + resize + crop of large JPEGs, full vs draft: time per image and pixel difference."""
    from featcache.pipeline.extraction.images import load_rgb
    from featcache.pipeline.extraction.loader import draft_min_side, pil_stage
    from featcache.pipeline.extraction.preprocess import imagenet_default

    make_photo_folder(folder, n, size, classes=1)
    spec = imagenet_default("bench")
    stage, side = pil_stage(spec), draft_min_side(spec, True)
    files = sorted(folder.rglob("*.jpg"))
    out = {}
    for label, min_side in (("full", None), ("draft", side)):
        t0 = time.perf_counter()
        out[label] = [np.asarray(stage(load_rgb(str(f), draft_min_side=min_side)), np.float32) for f in files]
        out[label + "_ms"] = (time.perf_counter() - t0) / len(files) * 1000
    diff = np.abs(np.stack(out["full"]) - np.stack(out["draft"]))
    return (f"draft   : {n} JPEGs {size[0]}x{size[1]} -> resize {spec.resize_size} + crop {spec.crop_size}: "
            f"full decode {out['full_ms']:.0f} ms/img, draft {out['draft_ms']:.0f} ms/img "
            f"({out['full_ms'] / out['draft_ms']:.1f}x); |pixel diff| mean {diff.mean():.2f}, max {diff.max():.0f} of 255")


def parse_set(items: list[str]) -> dict:
    """--set compile=on --set workers=1 -> ExtractConfig overrides (JSON values, else strings)."""
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="128 images, resnet18 only")
    ap.add_argument("--images", type=int, default=None, help="images to generate (default 512)")
    ap.add_argument("--size", default="500x375", help="image width x height (default 500x375)")
    ap.add_argument("--models", default=None, help=f"comma list (default {','.join(MODELS)})")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=None,
                    help="a, b, c measured this many times in turn, best kept (default 2; 1 with --quick)")
    ap.add_argument("--folder", default=None, help="where to generate images (reused when it matches)")
    ap.add_argument("--decode-check", action="store_true",
                    help="also run (c) for the first model with one prefetching decode process (--workers 1)")
    ap.add_argument("--draft-check", action="store_true", help="also time JPEG draft decoding on 4000x3000 photos")
    ap.add_argument("--compile-check", action="store_true", help="also time torch.compile's cost and gain")
    ap.add_argument("--noop-check", action="store_true",
                    help="also time re-running extract on the unchanged folder (spawn to exit)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="ExtractConfig override for (c), e.g. --set compile=on --set workers=1")
    args = ap.parse_args()
    n = args.images or (128 if args.quick else 512)
    models = args.models.split(",") if args.models else (["resnet18"] if args.quick else list(MODELS))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    overrides = parse_set(args.set)
    threads = usable_cores()
    torch.set_num_threads(threads)  # the same thread count featcache uses for compute

    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    folder = Path(args.folder) if args.folder else Path(tempfile.gettempdir()) / f"featcache-bench-photos-{n}-{args.size}"
    t0 = time.perf_counter()
    make_photo_folder(folder, n, size)
    print(f"machine : {cpu_model()}, {threads} usable cores (sched_getaffinity), {os.cpu_count()} online")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, {torch.backends.cpu.get_cpu_capability()}, {blas()}")
    print(f"data    : {n} JPEGs {size[0]}x{size[1]} q90 in {folder} (ready in {time.perf_counter() - t0:.1f}s), "
          f"batch {args.batch_size}" + (f", featcache overrides {overrides}" if overrides else ""))
    print(f"before  : {load()}")
    header = (f"{'model':18s} {'(a) bare':>8s} {'(b) naive':>9s} {'(c) featcache':>13s} {'c/b':>5s} {'c/a':>5s}"
              f" {'(c+) whole':>10s} {'c+/b':>5s} {'c+/a':>5s}")
    print(header)
    print("-" * len(header))
    details = []
    rounds = args.rounds or (1 if args.quick else 2)
    for name in models:
        # Interleaved rounds, best of each: other load on the machine only ever slows a run down,
        # so the best of runs spread over the same minutes is the fairest figure for all three.
        runs = [(bare(name, folder, n, args.batch_size), naive(name, folder, n, args.batch_size, tmp / f"{name}.npy"),
                 featcache(name, folder, n, args.batch_size, tmp / f"{name}.h5", overrides)) for _ in range(rounds)]
        a, b = max(r[0] for r in runs), max(r[1] for r in runs)
        c, cp, s = max((r[2] for r in runs), key=lambda x: x[0])
        cp = max(r[2][1] for r in runs)
        print(f"{name:18s} {a:8.1f} {b:9.1f} {c:13.1f} {c / b:5.2f} {c / a:5.2f} {cp:10.1f} {cp / b:5.2f} "
              f"{cp / a:5.2f}", flush=True)
        details.append(f"  {name}: {s['inference']}; decode: {s['decode']}; whole process {s['bench_wall_s']:.1f}s = "
                       f"{where_time_went(s)}")
        details.append(f"  {name}: every round (a, b, c, c+): " +
                       "; ".join(f"{r[0]:.1f} {r[1]:.1f} {r[2][0]:.1f} {r[2][1]:.1f}" for r in runs))
        if args.noop_check:
            walls = [run_cli(name, folder, args.batch_size, tmp / f"{name}.h5", overrides)[0] for _ in range(2)]
            details.append(f"  {name}: no-op re-extract of the unchanged folder, spawn to exit: "
                           + ", ".join(f"{w:.2f}s" for w in walls))
    print(f"img/s, best of {rounds} interleaved round(s). (a) model alone on preprocessed tensors, loop only; "
          "(b) naive script incl. model build; (c) featcache extract, its run incl. model build and cache write; "
          "(c+) the whole featcache process, spawn to exit")
    print("\n".join(details))
    if args.decode_check:  # overlap (a decode process prefetching) vs the default (alternating), back to back
        name, runs = models[0], {}
        for label, extra in (("alternating (default)", {}), ("1 prefetching process", {"workers": 1})) * 2:
            rate = featcache(name, folder, n, args.batch_size, tmp / "layout.h5", {**overrides, **extra})[0]
            runs.setdefault(label, []).append(rate)
        print(f"decode  : {name} (c) img/s, two runs each: " +
              "; ".join(f"{k} {' '.join(f'{v:.1f}' for v in vs)}" for k, vs in runs.items()), flush=True)
    if args.draft_check:
        print(draft_check(Path(tempfile.gettempdir()) / "featcache-bench-photos-4000x3000"), flush=True)
    if args.compile_check:
        print(compile_check(models[0], args.batch_size), flush=True)
    print(f"after   : {load()}")


if __name__ == "__main__":
    main()
