"""Speed paths of extraction (issue 5) give the same results as the plain paths.

JPEG draft decoding vs full decoding (within tolerance), every decode layout (inline, threads,
worker processes) yielding identical batches, thread/process sizing, background journal writes,
float16 halving the cache, and the progress bar. Fixtures are local to this file; images are
generated, never downloaded.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featcache.pipeline.device as device_mod
from featcache.cache.journal import Journal, Part
from featcache.cache.saver import PartSaver
from featcache.cache.store import read_cache
from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.device import DecodeLayout, decode_layout
from featcache.pipeline.extraction.extract import run_extract
from featcache.pipeline.extraction.images import load_rgb
from featcache.pipeline.extraction.loader import ImageFiles, decode_batches, draft_min_side, pil_stage
from featcache.pipeline.extraction.preprocess import imagenet_default

SPEC = imagenet_default("test")  # resize 256, crop 224
FAST_KW = dict(backbone="resnet18", weights="none", layer="layer1", pool="avg", device="cpu")


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth shading + hard-edged shapes + noise: the content JPEG draft decoding must preserve."""
    from PIL import ImageDraw, ImageFilter

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = rng.uniform(40, 200, 3) + xx[..., None] * (80 / w) - yy[..., None] * (60 / h)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x0, y0, x0 + w // 5, y0 + h // 5), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(w / 500))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> list[Path]:
    """Photo-sized JPEGs large enough for 1/2 and 1/4 draft scales (shorter side 1100 and 2100)."""
    root = tmp_path_factory.mktemp("big")
    out = []
    for i, size in enumerate([(1600, 1100), (2100, 2800)]):
        p = root / f"big{i}.jpg"
        photo(size, seed=i).save(p, quality=90)
        out.append(p)
    return out


@pytest.fixture
def mixed_tree(tmp_path) -> Path:
    """ROOT/<class>/...: small JPEGs and PNGs, one large JPEG, one unreadable file."""
    root = tmp_path / "mixed"
    for c, cls in enumerate(("a", "b")):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(5):
            img = photo((120 + 10 * i, 90), seed=10 * c + i)
            img.save(d / f"img{i}.{'jpg' if i % 2 else 'png'}", **({"quality": 90} if i % 2 else {}))
    photo((1200, 1050), seed=99).save(root / "a" / "large.jpg", quality=90)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def staged(img: Image.Image) -> np.ndarray:
    return np.asarray(pil_stage(SPEC)(img), dtype=np.float32)


# ---- JPEG draft decoding --------------------------------------------------------------------------

def test_draft_decodes_at_reduced_scale_but_never_below_twice_the_resize(big_jpegs):
    side = draft_min_side(SPEC, True)
    assert side == 2 * SPEC.resize_size
    for path in big_jpegs:
        full, draft = load_rgb(str(path)), load_rgb(str(path), draft_min_side=side)
        assert min(draft.size) >= side
        assert draft.width < full.width  # it really was decoded at 1/2 or 1/4 scale


def test_draft_then_resize_equals_full_decode_within_tolerance(big_jpegs):
    """Pixels after resize + crop differ by well under one grey level on average."""
    for path in big_jpegs:
        full = staged(load_rgb(str(path)))
        draft = staged(load_rgb(str(path), draft_min_side=draft_min_side(SPEC, True)))
        diff = np.abs(full - draft)
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2 and diff.max() <= 12, (diff.mean(), diff.max())


def test_draft_features_match_full_decode_features(big_jpegs):
    from featcache.pipeline.extraction.backbones import build_backbone

    bb = build_backbone("resnet18", "none")
    tf = bb.preprocess.transform()
    side = draft_min_side(bb.preprocess, True)
    with torch.inference_mode():
        full = bb.model(torch.stack([tf(load_rgb(str(p))) for p in big_jpegs]))
        draft = bb.model(torch.stack([tf(load_rgb(str(p), draft_min_side=side)) for p in big_jpegs]))
    assert float(torch.nn.functional.cosine_similarity(full, draft, dim=1).min()) >= 0.999


def test_draft_leaves_small_jpegs_and_other_formats_untouched(tmp_path):
    img = photo((500, 375), seed=3)  # shorter side 375 < 2 * 512: no scale possible
    img.save(tmp_path / "small.jpg", quality=90)
    big = photo((1200, 1100), seed=4)
    big.save(tmp_path / "big.png")
    side = draft_min_side(SPEC, True)
    for name in ("small.jpg", "big.png"):
        a, b = load_rgb(str(tmp_path / name)), load_rgb(str(tmp_path / name), draft_min_side=side)
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_draft_keeps_exif_orientation_and_mode_conversion(tmp_path):
    img = photo((1200, 1100), seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "rot.jpg", quality=90, exif=exif)
    img.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    img.convert("L").save(tmp_path / "gray.jpg", quality=90)
    side = draft_min_side(SPEC, True)
    rot = load_rgb(str(tmp_path / "rot.jpg"), draft_min_side=side)
    assert rot.mode == "RGB" and rot.height > rot.width  # orientation applied after drafting
    for name in ("cmyk.jpg", "gray.jpg"):
        full, draft = load_rgb(str(tmp_path / name)), load_rgb(str(tmp_path / name), draft_min_side=side)
        assert draft.mode == "RGB" and min(draft.size) >= side
        assert np.abs(staged(full) - staged(draft)).mean() < 1.5


def test_no_draft_is_part_of_the_fingerprint(mixed_tree, tmp_path):
    a = run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "a.h5"), **FAST_KW), progress=False)
    b = run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "b.h5"), draft=False, **FAST_KW), progress=False)
    assert a["fingerprint"] != b["fingerprint"]
    assert read_cache(tmp_path / "a.h5").attrs["description"]["jpeg_draft_min_side"] == 512
    assert read_cache(tmp_path / "b.h5").attrs["description"]["jpeg_draft_min_side"] is None


# ---- decode layouts ---------------------------------------------------------------------------------

def all_batches(tree: Path, processes: int, threads: int, batch: int = 3):
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    ds = ImageFiles(tree, files, SPEC, draft=True)
    batches = [list(range(k, min(k + batch, len(files)))) for k in range(0, len(files), batch)]
    return list(decode_batches(ds, batches, processes, threads, pin_memory=False)), batches


def test_every_decode_layout_yields_identical_batches(mixed_tree):
    ref, batches = all_batches(mixed_tree, 0, 0)
    assert [r[0] for r in ref] == batches
    assert any(reason for r in ref for reason in r[2])  # the broken file is reported, not raised
    for processes, threads in [(0, 1), (0, 3), (1, 0), (2, 0)]:
        got, _ = all_batches(mixed_tree, processes, threads)
        assert len(got) == len(ref)
        for (gi, gx, gr), (ri, rx, rr) in zip(got, ref):
            assert gi == ri and gr == rr
            assert (gx is None and rx is None) or (gx.dtype == torch.uint8 and torch.equal(gx, rx))


def test_threaded_decoding_stops_cleanly_when_the_consumer_stops(mixed_tree):
    files = sorted(p.relative_to(mixed_tree).as_posix() for p in mixed_tree.rglob("*.png"))
    ds = ImageFiles(mixed_tree, files, SPEC)
    it = decode_batches(ds, [[i] for i in range(len(files))], 0, 2, pin_memory=False)
    next(it)
    it.close()  # shuts the pool down (queued work cancelled) instead of leaking threads


def test_batch_of_only_unreadable_files_has_no_tensor(mixed_tree):
    ds = ImageFiles(mixed_tree, ["b/broken.jpg"], SPEC)
    (idx, x, reasons), = list(decode_batches(ds, [[0]], 0, 1, pin_memory=False))
    assert idx == [0] and x is None and reasons[0]


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_decoding_never_oversubscribes(monkeypatch, cores):
    monkeypatch.setattr(device_mod, "usable_cores", lambda: cores)
    cpu = torch.device("cpu")
    assert device_mod.compute_threads(cpu) == cores  # the machine decides, never --workers
    for workers in (None, 0):
        lay = decode_layout(cpu, workers)
        # one decoding thread per core, taking turns with the backbone: never more busy threads than cores
        assert (lay.processes, lay.threads, lay.prefetch) == (0, cores, 0)
        assert "alternating" in lay.describe()
    assert decode_layout(cpu, 3) == DecodeLayout(3, 0)  # an explicit --workers N is obeyed


def test_torchrun_ranks_on_one_node_share_the_cores(monkeypatch):
    monkeypatch.setattr(device_mod, "usable_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cpu = torch.device("cpu")
    assert device_mod.compute_threads(cpu) == 4 and decode_layout(cpu, None).threads == 4


@pytest.mark.parametrize("cores,processes", [(1, 0), (2, 0), (3, 2), (8, 7), (64, 32)])
def test_cuda_decoding_prefetches_on_the_free_cores(monkeypatch, cores, processes):
    monkeypatch.setattr(device_mod, "usable_cores", lambda: cores)
    cuda = torch.device("cuda")  # a policy decision: no GPU needed
    assert device_mod.compute_threads(cuda) is None
    lay = decode_layout(cuda, None)
    assert lay.processes == processes
    assert lay.processes + (lay.threads if not lay.processes else 0) <= max(cores, 1)
    assert lay.processes or lay.prefetch > 0  # decoding overlaps the GPU either way
    assert decode_layout(cuda, 0) == DecodeLayout(0, cores, prefetch=2)


def test_speed_layouts_give_identical_features(mixed_tree, tmp_path):
    """Decode layout and --workers never change a stored value (resumed runs may mix them)."""
    outs = []
    for i, workers in enumerate((0, 1, None)):
        out = tmp_path / f"c{i}.h5"
        run_extract(ExtractConfig(str(mixed_tree), str(out), workers=workers, batch_size=4, **FAST_KW),
                    progress=False)
        outs.append(read_cache(out))
    for c in outs[1:]:
        assert c.paths == outs[0].paths
        np.testing.assert_array_equal(c.features, outs[0].features)


def test_optimised_extract_agrees_with_reference_extract(mixed_tree, tmp_path):
    fast = run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "f.h5"), **FAST_KW), progress=False)
    ref = run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "r.h5"), optimize=False, **FAST_KW),
                      progress=False)
    assert fast["fingerprint"] == ref["fingerprint"]  # speed-only: the cache identity is unchanged
    assert "channels_last" in fast["inference"] and ref["inference"] == "reference eager fp32"
    a, b = read_cache(tmp_path / "f.h5").features, read_cache(tmp_path / "r.h5").features
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999


# ---- cache writes -----------------------------------------------------------------------------------

def test_float16_halves_the_feature_storage(mixed_tree, tmp_path):
    sizes = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.h5"
        run_extract(ExtractConfig(str(mixed_tree), str(out), dtype=dtype, **FAST_KW), progress=False)
        with h5py.File(out, "r") as f:
            ds = f["features"]
            assert ds.fletcher32  # each stored chunk carries a 4-byte checksum on top of its data
            sizes[dtype] = ds.id.get_storage_size() - 4 * ds.id.get_num_chunks()
    assert sizes["float16"] * 2 == sizes["float32"]


def test_part_saver_commits_every_part_and_reports_write_errors(tmp_path):
    j = Journal(tmp_path / "c.h5", "fp")
    j.open()
    saver = PartSaver(j)
    for b in range(6):
        saver.save(b, Part([f"k{b}"], np.full((1, 4), b, np.float32), [""]))
    saver.close()
    assert all(j.load(b, [f"k{b}"]).features[0, 0] == b for b in range(6))

    class Failing(Journal):
        def save(self, index, part):
            raise OSError("disk full")

    saver = PartSaver(Failing(tmp_path / "d.h5", "fp"))
    saver.save(0, Part(["k"], np.zeros((1, 4), np.float32), [""]))
    with pytest.raises(OSError, match="disk full"):
        saver.close()


# ---- progress ---------------------------------------------------------------------------------------

def test_progress_bar_shows_rate_on_stderr_only_when_enabled(mixed_tree, tmp_path, capsys):
    run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "p.h5"), **FAST_KW), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "extract" in err and ("img/s" in err or "s/img" in err)
    run_extract(ExtractConfig(str(mixed_tree), str(tmp_path / "q.h5"), **FAST_KW), progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_feature_rows_are_written_in_whole_aligned_chunks(tmp_path):
    from featcache.cache.featwrite import block_rows, write_feature_rows
    from featcache.cache.store import CacheWriter, rows_per_chunk

    n, dim = 1000, 700  # float32: 374 rows per ~1 MiB chunk
    old = CacheWriter(tmp_path / "old.h5", n, dim, "float32")
    old_feats = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    old.write_features(np.arange(n), old_feats)
    old.write_columns({k: np.zeros(n, np.int64) if k in ("labels", "file_size", "file_mtime_ns") else [""] * n
                       for k in ("labels", "paths", "split", "file_size", "file_mtime_ns", "file_sha256")})
    old.finish({}, [])
    batch = np.random.default_rng(1).normal(size=(n // 2, dim)).astype(np.float32)
    computed = {r: (batch, r // 2) for r in range(0, n, 2)}  # even rows new, odd rows reused
    reused = {r: r for r in range(1, n, 2)}
    writer = CacheWriter(tmp_path / "new.h5", n, dim, "float16")
    writes = []
    real = writer.write_features
    writer.write_features = lambda rows, feats: (writes.append((int(rows[0]), len(rows))), real(rows, feats))
    with pytest.raises(ValueError):  # every row needs exactly one source
        write_feature_rows(writer, n + 1, dim, "float16", computed, reused, tmp_path / "old.h5")
    write_feature_rows(writer, n, dim, "float16", computed, reused, tmp_path / "old.h5")
    chunk = rows_per_chunk(dim, 2, n)
    assert block_rows(dim, "float16", n) % chunk == 0
    assert all(start % chunk == 0 for start, _ in writes)
    assert all(count % chunk == 0 for _, count in writes[:-1]) and sum(c for _, c in writes) == n
    got = writer.f["features"][...]
    np.testing.assert_array_equal(got[0::2], batch.astype(np.float16))
    np.testing.assert_array_equal(got[1::2], old_feats[1::2].astype(np.float16))
    writer.abort()
