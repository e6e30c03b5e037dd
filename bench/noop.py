"""A no-op re-extract on a large folder (issue 14): what `featcache extract` costs when nothing changed.

    .venv/bin/python bench/noop.py [--images 100000] [--folder DIR] [--rounds 3]

Generates N tiny PNGs (8x8, 10 class folders; reused when the folder already holds them) and builds
a cache of them once with a cheap backbone (``timm:resnet10t@32``, random weights: the figure is
about files, not compute). Then, interleaved round by round:

  no-op      ``featcache extract`` again, spawn to exit: answered from the cache by
             quickcheck.up_to_date without importing torch;
  full path  ``featcache.extract()`` from Python in a fresh process, spawn to exit: the Python API
             has no quick check, so this is discovery, the stat pass, the plan and the cache's
             bookkeeping with every row reused (what the CLI did before the quick check);

and in this process: discovery alone (discover.discover) and the stat pass alone (plan.file_states),
the two parts of the no-op that grow with the number of files. Prints the machine and load.
Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import cpu_model, load  # noqa: E402  (bench/extract.py: lscpu and load average)

CLASSES = 10
BACKBONE = "timm:resnet10t@32"


def make_tiny_folder(folder: Path, n: int) -> float:
    """n // CLASSES 8x8 PNGs of seeded noise per class folder; returns seconds (0 when reused).
    A folder holding anything else is emptied first, so the count is exactly what was asked."""
    per = n // CLASSES
    if folder.is_dir() and sorted(os.listdir(folder)) == [f"c{c}" for c in range(CLASSES)] and all(
            len(os.listdir(folder / f"c{c}")) == per for c in range(CLASSES)):
        return 0.0
    if folder.exists():  # only a folder this script made is ever removed
        ours = all(d.name in {f"c{c}" for c in range(CLASSES)} and d.is_dir() and
                   all(f.suffix == ".png" and f.stem.isdigit() for f in d.iterdir()) for d in folder.iterdir())
        if not ours:
            sys.exit(f"bench/noop.py: {folder} holds other files; pass an empty or new --folder")
        shutil.rmtree(folder)
    t0, rng = time.perf_counter(), np.random.default_rng(0)
    for c in range(CLASSES):
        d = folder / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")
    return time.perf_counter() - t0


def spawn(args: list[str]) -> tuple[float, dict]:
    """Seconds from spawn to exit, and the JSON summary the command printed."""
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"bench/noop.py: {' '.join(args[:3])} failed:\n{p.stderr[-2000:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--folder", default=None, help="where to generate the PNGs (reused when it matches)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.images < CLASSES:
        sys.exit(f"bench/noop.py: --images must be at least {CLASSES}")
    folder = Path(args.folder or f"/tmp/featcache-bench-tiny-{args.images}")
    cache = folder.with_suffix(".h5")
    print(f"machine : {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; python {sys.version.split()[0]}")
    made = make_tiny_folder(folder, args.images)
    n = args.images // CLASSES * CLASSES
    print(f"data    : {n} PNGs 8x8 in {CLASSES} class folders, {folder} "
          f"({'generated in %.1f s' % made if made else 'reused'})")
    cli = [str(Path(sys.executable).parent / "featcache"),  # the console script users run
           "extract", str(folder), "-o", str(cache), "--backbone", BACKBONE, "--weights", "none", "--batch-size", "256",
           "--json"]
    wall, s = spawn(cli)  # builds the cache, or refreshes it once after featcache's code changed
    if not s["up_to_date"]:
        print(f"build   : {BACKBONE}, {s['extracted']} images extracted, {s['reused']} reused "
              f"(a first run, or the first after the extraction code changed), spawn to exit {wall:.1f} s")
    api = [sys.executable, "-c", "import json, sys, featcache; r = featcache.extract(sys.argv[1], sys.argv[2], "
           f"backbone='{BACKBONE}', weights='none', batch_size=256); print(json.dumps(r.summary))",
           str(folder), str(cache)]
    print(f"before  : {load()}")
    noop, full = [], []
    for _ in range(args.rounds):
        wall, s = spawn(cli)
        assert s["up_to_date"] and s["extracted"] == 0, s
        noop.append(wall)
        wall, s = spawn(api)
        assert not s["up_to_date"] and s["extracted"] == 0 and s["reused"] == n, s
        full.append(wall)
    from featcache.pipeline.extraction.discover import discover
    from featcache.pipeline.extraction.plan import file_states

    t0 = time.perf_counter()
    disc = discover(folder)
    t1 = time.perf_counter()
    file_states(disc, False)
    t2 = time.perf_counter()
    print(f"no-op re-extract (CLI, quick check), spawn to exit : {', '.join(f'{w:.2f}' for w in noop)} s")
    print(f"full path, every row reused (Python API)          : {', '.join(f'{w:.2f}' for w in full)} s")
    print(f"in this process: discovery {t1 - t0:.2f} s, stat pass {t2 - t1:.2f} s ({len(disc.records)} files)")
    print(f"after   : {load()}")


if __name__ == "__main__":
    main()
