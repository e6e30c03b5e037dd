"""Benchmark: ``featcache extract`` peak memory (from the OS) as the number of images N grows.

    .venv/bin/python bench/extract_memory.py [--n 10000,100000] [--backbone mobilenet_v3_small] \
        [--batch-size 64] [--workers W] [--dir /tmp/featcache-extract-mem] [--keep] [-- EXTRACT OPTIONS]
    # wide features, little compute (what shows whether memory grows with N):
    .venv/bin/python bench/extract_memory.py --n 10000,50000 --backbone timm:resnet18@32 -- \
        --layer layer1 --pool flatten --compile off

For each N it generates N tiny RGB PNGs (32x32 by default, 10 classes, ``DIR/images-N/train/classK/*.png``;
kept and reused by later runs when the count matches), then runs in a child process
``cli.py extract DIR/images-N -o CACHE.h5 --backbone B --weights none --device cpu --json`` with featcache's
defaults otherwise (thread-pool decoding, --compile auto: compiled from 10k images on the CPU). The kernel
reports the child's own peak RSS (``os.wait4``). A baseline child that only imports the same libraries
(``import featcache.cli, torch, torchvision``) gives the runtime's floor, so the table shows extraction's
own memory above it. Columns: img/s = N / wall (spawn to exit), (run) = extract's own rate (its summary's
images_per_second), peak RSS, peak RSS - baseline, cache size on disk. torchvision backbones have no
input-size option (only timm:NAME@SIZE has one): 32-px images are resized to the preset (256, crop 224),
so a small model (mobilenet_v3_small) keeps the run short. Caches are removed afterwards unless --keep;
the images are always kept (delete DIR to reclaim the disk).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep import load, machine  # noqa: E402

CLASSES = 10


def count_images(root: Path) -> int:
    train = root / "train"
    return sum(len(os.listdir(d)) for d in train.iterdir() if d.is_dir()) if train.is_dir() else 0


def make_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """N PNGs, one class colour per folder plus noise; reused when the folder already holds N."""
    if count_images(root) == n:
        print(f"    reusing {n} images in {root}")
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (CLASSES, 3))
    for c in range(CLASSES):
        (root / "train" / f"class{c}").mkdir(parents=True)
    for i in range(n):
        c = i % CLASSES
        px = np.clip(colours[c] + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "train" / f"class{c}" / f"{i:07d}.png", compress_level=1)
    print(f"    wrote {n} images ({size}x{size} PNG) in {root} in {time.perf_counter() - t0:.0f} s", flush=True)


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes of that child alone, its stdout); output goes to files,
    not pipes, so a chatty child never blocks on a full pipe."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, lines = out.read().decode(errors="replace"), err.read().decode(errors="replace").strip().splitlines()
    if code:
        print(f"    exit {code}: {lines[-1] if lines else ''}")
    return code, wall, usage.ru_maxrss * 1024, stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="10000,100000")
    ap.add_argument("--size", type=int, default=32, help="image side, pixels")
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="extract --workers (default: featcache's own)")
    ap.add_argument("--dir", default="/tmp/featcache-extract-mem")
    ap.add_argument("--keep", action="store_true", help="keep the caches too")
    ap.add_argument("extra", nargs="*", help="more extract options, after --")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\n{load()}")
    code, _, base, _ = run_child([sys.executable, "-c", "import featcache.cli, torch, torchvision"])
    print(f"baseline (import featcache.cli, torch, torchvision): peak RSS {base / 2**20:.0f} MiB")
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    print(f"extract: --backbone {args.backbone} --weights none --device cpu --batch-size {args.batch_size} "
          f"{' '.join([*workers, *args.extra])}".rstrip())
    print(f"{'N':>8} {'img/s':>7} {'(run)':>7} {'wall':>7} {'peak RSS':>9} {'- base':>8} {'cache':>8}  details")
    for n in (int(v) for v in args.n.split(",")):
        images, cache = root / f"images-{n}", root / f"cache-{n}.h5"
        make_images(images, n, args.size)
        cache.unlink(missing_ok=True)
        code, wall, peak, out = run_child([
            sys.executable, str(REPO / "cli.py"), "extract", str(images), "-o", str(cache), "--backbone", args.backbone,
            "--weights", "none", "--device", "cpu", "--batch-size", str(args.batch_size), *workers, *args.extra,
            "--json"])
        s = json.loads(out) if code == 0 else {}
        size = cache.stat().st_size if cache.exists() else 0
        details = (f"{s['feature_dim']}-d; {s['inference']}; compile {s['compile_seconds']}s; {s['decode']}; "
                   f"phases {s['phases']}; {load()}") if s else f"exit {code}"
        print(f"{n:>8} {n / wall:>7.0f} {s.get('images_per_second') or 0:>7.0f} {wall:>6.0f}s "
              f"{peak / 2**20:>5.0f} MiB {(peak - base) / 2**20:>4.0f} MiB {size / 2**20:>4.0f} MiB  {details}",
              flush=True)
        if not args.keep:
            cache.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
