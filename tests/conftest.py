"""Shared fixtures: generated image folders, cheap backbone settings, CLI runners, cached extracts.

Every image here is generated (PIL + numpy) in a temporary folder: no downloads, no data files.
Images are tiny and few, because on a 2-core CPU a full ResNet-18 runs ~25 images/s; tests that
only need *some* deterministic backbone use ``FAST`` (ResNet-18 cut after ``layer1``, 64-d).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from smallfs import small_fs as small_fs  # the fixture, for every test module (a tmpfs of a given size)

REPO = Path(__file__).resolve().parents[1]

CLASSES = {"red": (200, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 210)}
SPLIT_COUNTS = {"train": 8, "val": 3, "test": 3}
IMAGE_SIZE = (64, 48)  # (width, height)

# A cheap, deterministic backbone for tests of the extract machinery (not of model choice):
# random-init ResNet-18 cut after its stem (conv1-bn-relu-maxpool), average pooled -> 64 features.
FAST = ["--backbone", "resnet18", "--weights", "none", "--layer", "maxpool", "--pool", "avg"]
FAST_KW = dict(backbone="resnet18", weights="none", layer="maxpool", pool="avg")


# --------------------------------------------------------------------------------------------
# image generation
# --------------------------------------------------------------------------------------------
def noisy_image(colour, rng: np.random.Generator, size=IMAGE_SIZE, noise: float = 18.0) -> Image.Image:
    """A flat colour plus Gaussian noise (and a random bright square), as an RGB PIL image."""
    w, h = size
    arr = np.empty((h, w, 3), np.float64)
    arr[...] = colour
    arr += rng.normal(0.0, noise, arr.shape)
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    arr[y: y + 8, x: x + 8] += 40
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def save_image(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=92)
    else:
        img.save(path)
    return path


def write_class_images(folder: Path, colour, n: int, rng: np.random.Generator, start: int = 0) -> list[Path]:
    """n images named img_000.png, img_001.jpg, ... alternating PNG and JPEG."""
    out = []
    for i in range(start, start + n):
        ext = ".png" if i % 2 == 0 else ".jpg"
        out.append(save_image(folder / f"img_{i:03d}{ext}", noisy_image(colour, rng)))
    return out


def make_split_tree(root: Path, counts=SPLIT_COUNTS, classes=CLASSES, seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<class>/img_XXX.{png,jpg}."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for name, colour in classes.items():
            write_class_images(root / split / name, colour, n, rng)
    return root


def make_flat_tree(root: Path, per_class: int = 6, classes=CLASSES, seed: int = 1) -> Path:
    """ROOT/<class>/img_XXX.{png,jpg} (no split folders: everything is train)."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        write_class_images(root / name, colour, per_class, rng)
    return root


def png_claiming_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header announcing width x height (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def truncated_jpeg_bytes(rng: np.random.Generator) -> bytes:
    """The first half of a real JPEG (Pillow must refuse it, not fill it with grey)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


UNICODE_CLASS = "café au lait ü"  # spaces and non-ASCII must round-trip through the cache


@dataclass
class HostileTree:
    root: Path
    good: list[str]  # relative paths of usable images
    bad: dict[str, str]  # relative path -> a word the recorded skip reason must contain
    ignored: list[str]  # relative paths discovery must not even list
    classes: list[str]  # expected class names (sorted)


def build_hostile_tree(root: Path, seed: int = 3) -> HostileTree:
    """Good images of two classes (one with spaces + Unicode) plus every kind of junk."""
    rng = np.random.default_rng(seed)
    good: list[str] = []
    for name, colour in (("plain", (200, 60, 60)), (UNICODE_CLASS, (60, 60, 200))):
        for p in write_class_images(root / name, colour, 4, rng):
            good.append(p.relative_to(root).as_posix())
    c = root / "plain"
    bad = {}
    (c / "zero.jpg").write_bytes(b"")
    bad["plain/zero.jpg"] = "cannot identify"
    (c / "text.png").write_text("this is not a PNG\n")
    bad["plain/text.png"] = "cannot identify"
    (c / "trunc.jpg").write_bytes(truncated_jpeg_bytes(rng))
    bad["plain/trunc.jpg"] = "truncated"
    (c / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    bad["plain/bomb.png"] = "decompression bomb"
    os.symlink("selfloop.jpg", c / "selfloop.jpg")  # a file symlink pointing at itself: ELOOP on open
    bad["plain/selfloop.jpg"] = "symbolic links"
    ignored = []
    for rel in (".hidden.jpg", "plain/.DS_Store", "plain/notes.txt", "plain/._img_000.png",
                ".git/objects/a.png", "plain/.cache/thumb.png"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            noisy_image((1, 2, 3), rng).save(p)
        else:
            p.write_bytes(b"\0junk")
        ignored.append(rel)
    os.symlink("..", c / "loop")  # a folder symlink back to its parent: a loop os.walk would follow
    (root / "empty class").mkdir()
    (root / "only text").mkdir()
    (root / "only text" / "readme.txt").write_text("no images here")
    return HostileTree(root, sorted(good), bad, ignored, sorted(["plain", UNICODE_CLASS]))


# --------------------------------------------------------------------------------------------
# fixtures: image folders
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def split_tree_ro(tmp_path_factory) -> Path:
    """Session-wide split tree; tests must not modify it (use ``split_tree`` for a private copy)."""
    return make_split_tree(tmp_path_factory.mktemp("split") / "images")


@pytest.fixture
def split_tree(split_tree_ro, tmp_path) -> Path:
    dst = tmp_path / "images"
    shutil.copytree(split_tree_ro, dst)  # copy2 keeps mtimes; content identical
    return dst


SMALL_COUNTS = {"train": 3, "val": 1, "test": 1}  # 15 images: for tests that extract over and over


@pytest.fixture(scope="session")
def small_tree_ro(tmp_path_factory) -> Path:
    return make_split_tree(tmp_path_factory.mktemp("small") / "images", counts=SMALL_COUNTS, seed=5)


@pytest.fixture
def small_tree(small_tree_ro, tmp_path) -> Path:
    """A private, modifiable copy of the 15-image split tree."""
    dst = tmp_path / "images"
    shutil.copytree(small_tree_ro, dst)
    return dst


@pytest.fixture(scope="session")
def flat_tree_ro(tmp_path_factory) -> Path:
    return make_flat_tree(tmp_path_factory.mktemp("flat") / "images")


@pytest.fixture
def flat_tree(tmp_path) -> Path:
    return make_flat_tree(tmp_path / "flat")


@pytest.fixture
def hostile_tree(tmp_path) -> HostileTree:
    return build_hostile_tree(tmp_path / "hostile")


@pytest.fixture
def hostile_factory(tmp_path):
    """Build as many independent hostile folders as a test needs."""
    counter = iter(range(1000))

    def make() -> HostileTree:
        return build_hostile_tree(tmp_path / f"hostile{next(counter)}")

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread_for_tiny_tensors():
    """Tests train on tensors of a few dozen rows: one intra-op thread is faster there, and on a
    busy 2-core machine two OpenMP threads spinning on tiny ops can be 30x slower. (extract sets
    its own thread count, so backbone runs are unaffected.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# fixtures: device
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def device() -> str:
    """FEATCACHE_TEST_DEVICE (default cpu); CUDA tests are skipped when no GPU is present."""
    import torch

    name = os.environ.get("FEATCACHE_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("FEATCACHE_TEST_DEVICE asks for CUDA but no GPU is available")
    return name


@pytest.fixture(scope="session")
def cuda_device() -> str:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return "cuda"


# --------------------------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------------------------
@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def invoke(*args) -> CliResult:
    """Run ``cli.main`` in-process with click's CliRunner (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from featcache import cli

    res = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=True)
    exc = res.exception if not isinstance(res.exception, SystemExit) else None
    return CliResult(res.exit_code, res.stdout, res.stderr, exc)


def run_subprocess(*args, env_extra: dict | None = None, timeout: float = 300) -> CliResult:
    """Run ``python cli.py ...`` as a real process."""
    env = {**os.environ, **(env_extra or {})}
    env.pop("FEATCACHE_DEBUG", None)
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=str(REPO))
    return CliResult(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(res: CliResult, *words: str) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback, nothing on stdout; returns the line."""
    assert res.exit_code != 0, f"expected failure, got exit 0; stdout={res.stdout!r}"
    assert res.exception is None, f"unexpected exception escaped: {res.exception!r}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = res.stderr_lines
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {res.stderr!r}"
    assert res.stdout.strip() == "", f"stdout should be empty on error: {res.stdout!r}"
    line = lines[0]
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in error line {line!r}"
    return line


@pytest.fixture
def cli_invoke():
    return invoke


# --------------------------------------------------------------------------------------------
# session-scoped caches (extract once, read many times)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def split_cache(split_tree_ro, tmp_path_factory) -> Path:
    """Full random-init ResNet-18 (512-d) over the split tree: the cache the CLI/fit-head tests share."""
    out = tmp_path_factory.mktemp("split_cache") / "feats.h5"
    res = invoke("extract", split_tree_ro, "-o", out, "--backbone", "resnet18", "--weights", "none",
                 "--device", "cpu", "--workers", "0", "--batch-size", "16", "--json")
    assert res.exit_code == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def flat_cache(flat_tree_ro, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flat_cache") / "flat.h5"
    res = invoke("extract", flat_tree_ro, "-o", out, *FAST, "--device", "cpu", "--workers", "0", "--json")
    assert res.exit_code == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def fast_run(split_tree_ro, tmp_path_factory) -> Path:
    """A fit-head RUN_DIR over FAST features of the split tree (predict/export/finetune start here)."""
    d = tmp_path_factory.mktemp("fast_run")
    assert invoke("extract", split_tree_ro, "-o", d / "c.h5", *FAST, "--workers", "0").exit_code == 0
    assert invoke("fit-head", d / "c.h5", "-o", d / "run", "--epochs", "20", "--device", "cpu").exit_code == 0
    return d / "run"


def deny_listing(monkeypatch, folder: Path) -> None:
    """Make ``os.scandir(folder)`` fail with EACCES, as an unreadable folder does for a normal user
    (root reads through permission bits, so chmod alone cannot test this as root)."""
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.fspath(path) == os.fspath(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
