"""`featcache extract` as a trustworthy cache builder (issue 3): incremental updates, config
fingerprints, hostile input, crash safety/resume (real SIGKILLs), the writer lock and readers."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLASSES,
    FAST,
    REPO,
    UNICODE_CLASS,
    assert_one_line_error,
    invoke,
    make_flat_tree,
    noisy_image,
    save_image,
    write_class_images,
)

from featcache.cache.lock import cache_lock
from featcache.cache.store import read_cache

BASE = [*FAST, "--device", "cpu", "--workers", "0"]
N = 15  # images in the small split tree


def extract(root, out, *extra) -> dict:
    res = invoke("extract", root, "-o", out, *BASE, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    assert res.exception is None
    return res.json()


def rows(out) -> dict[str, np.ndarray]:
    c = read_cache(out)
    return dict(zip(c.paths, c.features))


def assert_same_cache(a, b, exact: bool = True):
    ca, cb = read_cache(a), read_cache(b)
    assert ca.paths == cb.paths
    assert ca.labels.tolist() == cb.labels.tolist()
    assert ca.split.tolist() == cb.split.tolist()
    assert ca.class_names == cb.class_names
    assert ca.fingerprint == cb.fingerprint
    assert [s[0] for s in ca.skipped] == [s[0] for s in cb.skipped]
    if exact:
        np.testing.assert_array_equal(ca.features, cb.features)
    else:
        np.testing.assert_allclose(ca.features, cb.features, rtol=1e-4, atol=1e-5)


@pytest.fixture
def forward_counter(monkeypatch):
    """Count images that go through the backbone in this process (in-process extracts only)."""
    import featcache.pipeline.extraction.extract as ex

    seen = {"images": 0, "calls": 0}
    real = ex.build_backbone

    def counting(*a, **k):
        bb = real(*a, **k)

        def hook(_module, inputs):
            seen["images"] += int(inputs[0].shape[0])
            seen["calls"] += 1

        bb.model.register_forward_pre_hook(hook)
        return bb

    monkeypatch.setattr(ex, "build_backbone", counting)
    return seen


def leftovers(out: Path) -> list[str]:
    """Temporary files, journal folders or lock files (``.NAME.lock``) left beside a cache."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((out.name, f".{out.name}")) and p.name != out.name)


# ---- fresh and incremental extraction -----------------------------------------------------------

def test_fresh_extract(small_tree, tmp_path, forward_counter):
    out = tmp_path / "c.h5"
    s = extract(small_tree, out)
    n = N
    assert (s["n_images"], s["extracted"], s["reused"], s["removed"], s["skipped"]) == (n, n, 0, 0, 0)
    assert s["feature_dim"] == 64 and s["backbone"] == "resnet18"
    assert forward_counter["images"] == n
    assert leftovers(out) == []  # no tmp file, no journal after success
    assert read_cache(out).n_rows == n


def test_rerun_reuses_every_row_without_the_backbone(small_tree, tmp_path, forward_counter):
    out = tmp_path / "c.h5"
    extract(small_tree, out)
    before = rows(out)
    forward_counter["images"] = 0
    s = extract(small_tree, out)
    assert (s["extracted"], s["reused"], s["removed"], s["skipped"]) == (0, len(before), 0, 0)
    assert forward_counter["images"] == 0
    after = rows(out)
    assert list(after) == list(before)
    for p in before:
        assert np.array_equal(before[p], after[p])


def test_edit_add_delete(small_tree, tmp_path, forward_counter):
    out = tmp_path / "c.h5"
    extract(small_tree, out)
    before = rows(out)
    rng = np.random.default_rng(42)
    edited = "train/red/img_002.png"
    save_image(small_tree / edited, noisy_image((250, 250, 0), rng))  # new content (and mtime)
    added = [p.relative_to(small_tree).as_posix()
             for p in write_class_images(small_tree / "val" / "green", (40, 190, 40), 2, rng, start=50)]
    deleted = "test/blue/img_000.png"
    (small_tree / deleted).unlink()

    forward_counter["images"] = 0
    s = extract(small_tree, out)
    n = len(before) + len(added) - 1
    assert (s["n_images"], s["extracted"], s["reused"], s["removed"], s["skipped"]) == (n, 3, n - 3, 1, 0)
    assert forward_counter["images"] == 3  # only the edited and the new images ran through the backbone

    after = rows(out)
    assert deleted not in after and all(a in after for a in added)
    for p in before:
        if p not in (edited, deleted):
            assert np.array_equal(before[p], after[p]), p  # reused rows are bit-identical
    assert not np.allclose(before[edited], after[edited])

    # the updated cache equals a from-scratch extraction of the edited folder
    fresh = tmp_path / "fresh.h5"
    extract(small_tree, fresh)
    assert_same_cache(out, fresh, exact=False)
    c = read_cache(out)
    for path, label, split in zip(c.paths, c.labels, c.split):
        assert path.split("/")[0] == split and c.class_names[label] == path.split("/")[1]


def test_new_class_relabels_reused_rows(small_tree, tmp_path, forward_counter):
    out = tmp_path / "c.h5"
    extract(small_tree, out)
    write_class_images(small_tree / "train" / "amber", (255, 191, 0), 2, np.random.default_rng(1))
    forward_counter["images"] = 0
    s = extract(small_tree, out)
    assert s["extracted"] == 2 and forward_counter["images"] == 2
    c = read_cache(out)
    assert c.class_names == sorted([*CLASSES, "amber"])
    for path, label in zip(c.paths, c.labels):  # "amber" sorts first: every old label shifted by one
        assert c.class_names[label] == path.split("/")[1]


def test_touched_file_is_recomputed_unless_verify_content(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    extract(small_tree, out, "--verify-content")
    c = read_cache(out)
    assert all(len(h) == 64 for h in c.file_sha256)  # sha256 recorded per image
    target = small_tree / "val" / "red" / "img_000.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime
    s = extract(small_tree, out, "--verify-content")
    assert (s["extracted"], s["reused"]) == (0, c.n_rows)  # the bytes decide
    rel = target.relative_to(small_tree).as_posix()
    c2 = read_cache(out)
    assert int(c2.file_mtime_ns[c2.paths.index(rel)]) == target.stat().st_mtime_ns  # recorded state refreshed
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))  # touched again
    s = extract(small_tree, out)
    assert (s["extracted"], s["reused"]) == (1, c.n_rows - 1)  # size + mtime decide


def _swap_content_keep_size_and_mtime(target: Path, rng) -> None:
    st = target.stat()
    noisy_image((40, 40, 250), rng).save(target)  # other content; a BMP keeps its size ...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and we restore the mtime
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns


def test_verify_content_detects_change_with_same_size_and_mtime(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(7)
    target = small_tree / "train" / "green" / "zz.bmp"  # BMP: the file size depends only on the dimensions
    noisy_image((40, 190, 40), rng).save(target)
    rel = target.relative_to(small_tree).as_posix()
    extract(small_tree, out, "--verify-content")
    before = rows(out)[rel]
    _swap_content_keep_size_and_mtime(target, rng)
    s = extract(small_tree, out, "--verify-content")  # the bytes decide
    assert (s["extracted"], s["reused"]) == (1, N)
    assert not np.allclose(rows(out)[rel], before)


def test_without_verify_content_size_and_mtime_decide(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(7)
    target = small_tree / "train" / "green" / "zz.bmp"
    noisy_image((40, 190, 40), rng).save(target)
    rel = target.relative_to(small_tree).as_posix()
    extract(small_tree, out)
    before = rows(out)[rel]
    _swap_content_keep_size_and_mtime(target, rng)
    s = extract(small_tree, out)  # size+mtime unchanged: reused (the documented cheap default)
    assert s["extracted"] == 0
    assert np.array_equal(rows(out)[rel], before)


def test_verify_content_on_rows_recorded_without_hash(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(7)
    target = small_tree / "train" / "green" / "zz.bmp"
    noisy_image((40, 190, 40), rng).save(target)
    rel = target.relative_to(small_tree).as_posix()
    extract(small_tree, out)  # no hashes recorded
    before = rows(out)[rel]
    _swap_content_keep_size_and_mtime(target, rng)
    s = extract(small_tree, out, "--verify-content")
    # No hash was recorded, so nothing can prove a row unchanged: every row is re-extracted once
    # (which records the hashes), and the swapped file gets its new features.
    assert s["extracted"] == s["n_images"] and s["reused"] == 0
    assert not np.allclose(rows(out)[rel], before)
    again = extract(small_tree, out, "--verify-content")
    assert again["extracted"] == 0 and again["reused"] == s["n_images"]


def test_speed_only_flags_keep_the_fingerprint(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    first = extract(small_tree, out)
    s = invoke("extract", small_tree, "-o", out, *FAST, "--device", "cpu", "--workers", "1", "--batch-size", "5",
               "--json")
    assert s.exit_code == 0, s.stderr
    s = s.json()
    assert (s["extracted"], s["reused"]) == (0, first["n_images"])
    assert s["fingerprint"] == first["fingerprint"]


def test_workers_and_batch_size_give_the_same_features(small_tree, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(small_tree, a, "--batch-size", "64")
    res = invoke("extract", small_tree, "-o", b, *FAST, "--device", "cpu", "--workers", "1", "--batch-size", "4",
                 "--json")
    assert res.exit_code == 0, res.stderr
    assert_same_cache(a, b, exact=False)


@pytest.mark.parametrize("change", [
    ["--pool", "max"], ["--layer", "layer2"], ["--dtype", "float16"], ["--seed", "1"],
])
def test_different_config_refuses_without_overwrite(small_tree, tmp_path, change):
    out = tmp_path / "c.h5"
    first = extract(small_tree, out)
    stamp = (out.stat().st_mtime_ns, out.read_bytes())
    args = [a for a in BASE]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    res = invoke("extract", small_tree, "-o", out, *args)
    assert_one_line_error(res, "different configuration", "--overwrite")
    assert (out.stat().st_mtime_ns, out.read_bytes()) == stamp  # untouched
    res = invoke("extract", small_tree, "-o", out, *args, "--overwrite", "--json")
    assert res.exit_code == 0, res.stderr
    s = res.json()
    assert s["reused"] == 0 and s["extracted"] == first["n_images"]
    assert s["fingerprint"] != first["fingerprint"]
    assert read_cache(out).fingerprint == s["fingerprint"]


def test_decoding_policy_is_part_of_the_fingerprint(small_tree, tmp_path, monkeypatch):
    """Changing how pixels are decoded (alpha, 16-bit, EXIF...) must invalidate the cache's rows."""
    from featcache.pipeline.extraction.images import IMAGE_POLICY

    out = tmp_path / "c.h5"
    first = extract(small_tree, out)
    assert read_cache(out).attrs["image_policy"] == IMAGE_POLICY  # recorded in the file
    monkeypatch.setitem(IMAGE_POLICY, "alpha", "composite on RGB(0, 0, 0)")
    res = invoke("extract", small_tree, "-o", out, *BASE)
    assert_one_line_error(res, "different configuration", "--overwrite")
    s = extract(small_tree, out, "--overwrite")
    assert s["fingerprint"] != first["fingerprint"] and s["reused"] == 0


def test_existing_file_that_is_not_a_cache_is_not_overwritten(small_tree, tmp_path):
    out = tmp_path / "notes.h5"
    out.write_text("precious")
    res = invoke("extract", small_tree, "-o", out, *BASE)
    assert_one_line_error(res, "--overwrite")
    assert out.read_text() == "precious"
    s = extract(small_tree, out, "--overwrite")
    assert s["n_images"] == N and read_cache(out).n_rows == N


def test_output_that_is_a_folder_is_refused(small_tree, tmp_path):
    out = tmp_path / "outdir"
    out.mkdir()
    assert_one_line_error(invoke("extract", small_tree, "-o", out, *BASE), "folder")
    assert out.is_dir()


def test_output_that_is_a_folder_is_refused_even_with_overwrite(small_tree, tmp_path):
    out = tmp_path / "outdir"
    out.mkdir()
    line = assert_one_line_error(invoke("extract", small_tree, "-o", out, *BASE, "--overwrite", "--json"), "folder")
    assert "internal error" not in line
    assert out.is_dir()


def test_float16_cache(small_tree, tmp_path):
    a, b = tmp_path / "f32.h5", tmp_path / "f16.h5"
    extract(small_tree, a)
    extract(small_tree, b, "--dtype", "float16")
    ca, cb = read_cache(a), read_cache(b)
    assert cb.features.dtype == np.float16 and cb.attrs["dtype"] == "float16"
    np.testing.assert_allclose(cb.features.astype(np.float32), ca.features, rtol=2e-3, atol=2e-3)
    s = extract(small_tree, b, "--dtype", "float16")  # float16 rows are reused as they are
    assert s["reused"] == N
    np.testing.assert_array_equal(read_cache(b).features, cb.features)


# ---- hostile input -------------------------------------------------------------------------------

def test_hostile_files_are_skipped_reported_and_recorded(hostile_tree, tmp_path):
    out = tmp_path / "h.h5"
    s = extract(hostile_tree.root, out)
    assert s["n_images"] == len(hostile_tree.good)
    assert s["skipped"] == len(hostile_tree.bad)
    assert s["classes"] == hostile_tree.classes
    reported = dict(map(tuple, s["skipped_files"]))
    c = read_cache(out)
    recorded = dict(c.skipped)
    assert set(recorded) == set(hostile_tree.bad) == set(reported)
    for path, word in hostile_tree.bad.items():
        assert word.lower() in recorded[path].lower(), (path, recorded[path])
        assert recorded[path] == reported[path]
    assert c.paths == hostile_tree.good  # Unicode paths round-trip, in order
    assert c.class_names == hostile_tree.classes
    for p, label in zip(c.paths, c.labels):
        assert c.class_names[label] == p.split("/")[0]
    info = invoke("info", out, "--json")
    assert info.exit_code == 0, info.stderr
    data = info.json()
    assert {d["path"]: d["reason"] for d in data["skipped"]} == recorded
    assert set(data["classes"]) == {"plain", UNICODE_CLASS}
    assert data["attrs"]["class_names"] == hostile_tree.classes


def test_fixed_file_is_picked_up_next_run(hostile_tree, tmp_path):
    out = tmp_path / "h.h5"
    extract(hostile_tree.root, out)
    noisy_image((9, 9, 9), np.random.default_rng(0)).save(hostile_tree.root / "plain" / "trunc.jpg", "JPEG")
    s = extract(hostile_tree.root, out)
    assert s["extracted"] == 1 and s["skipped"] == len(hostile_tree.bad) - 1
    assert "plain/trunc.jpg" in read_cache(out).paths


def test_max_skipped_fails_the_run(hostile_tree, tmp_path):
    out = tmp_path / "h.h5"
    n_files = len(hostile_tree.good) + len(hostile_tree.bad)  # 8 good + 5 bad = 38% unusable
    res = invoke("extract", hostile_tree.root, "-o", out, *BASE, "--max-skipped", "0.2", "--json")
    line = assert_one_line_error(res, "--max-skipped")
    assert f"{len(hostile_tree.bad)} of {n_files}" in line
    assert not out.exists()
    s = extract(hostile_tree.root, out, "--max-skipped", "0.4")
    assert s["skipped"] == len(hostile_tree.bad)
    res = invoke("extract", hostile_tree.root, "-o", tmp_path / "x.h5", *BASE, "--max-skipped", "1.5")
    assert_one_line_error(res, "--max-skipped")


def test_max_skipped_error_is_one_line_without_json(hostile_tree, tmp_path):
    res = invoke("extract", hostile_tree.root, "-o", tmp_path / "h.h5", *BASE, "--max-skipped", "0.1")
    assert_one_line_error(res, "--max-skipped")


def test_nothing_usable_is_a_one_line_error(tmp_path):
    root = tmp_path / "bad"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a.jpg").write_bytes(b"")
    (root / "cls" / "b.png").write_text("nope")
    res = invoke("extract", root, "-o", tmp_path / "c.h5", *BASE, "--max-skipped", "1", "--json")
    assert_one_line_error(res, "could be used")
    assert not (tmp_path / "c.h5").exists()


# ---- crash leftovers -----------------------------------------------------------------------------

def test_stale_tmp_file_from_a_killed_run_is_removed(small_tree, tmp_path):
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    extract(small_tree, ref)
    stale = tmp_path / "c.h5.tmp-999999"
    stale.write_bytes(b"half-written by a killed run")
    extract(small_tree, out)
    assert not stale.exists()
    assert leftovers(out) == []
    assert_same_cache(out, ref)


def test_stale_tmp_cleanup_with_glob_characters_in_the_name(small_tree, tmp_path):
    out = tmp_path / "run[1].h5"
    stale = tmp_path / "run[1].h5.tmp-999999"
    stale.write_bytes(b"left by a killed run")
    other = tmp_path / "run1.h5.tmp-12345"  # another extract, writing another cache right now
    other.write_bytes(b"someone else's work in progress")
    extract(small_tree, out)
    assert other.exists(), "deleted another cache's temporary file"
    assert not stale.exists(), "left its own stale temporary file"


def test_fifo_with_image_extension_does_not_hang(small_tree, tmp_path):
    """A named pipe called *.jpg must be skipped, not opened: reading it blocks until a writer appears."""
    import threading

    fifo = small_tree / "train" / "red" / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict = {}

    def run():
        result["res"] = invoke("extract", small_tree, "-o", tmp_path / "c.h5", *BASE, "--json")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    opened = 0
    while t.is_alive():  # if the extract opens the pipe for reading, let it through (EOF) and note it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
        except OSError:
            time.sleep(0.01)
            continue
        opened += 1
        os.close(fd)
    t.join()
    res = result["res"]
    assert res.exit_code == 0, res.stderr
    assert opened == 0, "extract opened a FIFO for reading: with no writer it would block forever"
    assert "train/red/pipe.jpg" in dict(read_cache(tmp_path / "c.h5").skipped)


def _journal_with_part(tmp_path, fingerprint: str, part_bytes: bytes) -> Path:
    parts = tmp_path / "c.h5.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (parts / "part-00000000.npz").write_bytes(part_bytes)
    return parts


def test_garbage_journal_part_is_ignored(small_tree, tmp_path):
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    fp = extract(small_tree, ref)["fingerprint"]
    _journal_with_part(tmp_path, fp, b"not an npz at all")
    s = extract(small_tree, out)
    assert s["resumed_batches"] == 0
    assert_same_cache(out, ref)
    assert leftovers(out) == []


def test_torn_journal_part_is_ignored(small_tree, tmp_path):
    import io

    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    fp = extract(small_tree, ref)["fingerprint"]
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(["a"]), features=np.zeros((1, 64), np.float32), reasons=np.array([""]))
    _journal_with_part(tmp_path, fp, buf.getvalue()[: len(buf.getvalue()) // 2])  # a torn write
    s = extract(small_tree, out)
    assert_same_cache(out, ref)
    assert s["resumed_batches"] == 0


def test_journal_of_another_config_is_discarded(small_tree, tmp_path):
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    extract(small_tree, ref)
    _journal_with_part(tmp_path, "0" * 64, b"junk")
    s = extract(small_tree, out)
    assert s["resumed_batches"] == 0
    assert_same_cache(out, ref)


# ---- fault injection: real SIGKILLs --------------------------------------------------------------

CRASH_ENV = "FEATCACHE_TEST_CRASH_AFTER_BATCHES"
CRASH_ARGS = [*FAST, "--device", "cpu", "--batch-size", "3"]  # 15 images -> 5 batches


def sub_extract(root, out, *extra, crash_after: int | None = None, workers: int = 0) -> subprocess.CompletedProcess:
    """`python cli.py extract` in a child process, optionally SIGKILLing itself after n committed batches."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_after is not None:
        env[CRASH_ENV] = str(crash_after)
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(root), "-o", str(out), *CRASH_ARGS,
           "--workers", str(workers), "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def resume(root, out, *extra) -> dict:
    """Re-run the same command (in-process: resuming needs no separate process)."""
    res = invoke("extract", root, "-o", out, *CRASH_ARGS, "--workers", "0", "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def n_parts(out: Path) -> int:
    d = Path(f"{out}.parts")
    return len(list(d.glob("part-*.npz"))) if d.exists() else 0


@pytest.fixture(scope="module")
def crash_tree(tmp_path_factory) -> Path:
    return make_flat_tree(tmp_path_factory.mktemp("crash") / "images", per_class=5, seed=11)


@pytest.fixture(scope="module")
def crash_reference(crash_tree, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("crash_ref") / "ref.h5"
    res = invoke("extract", crash_tree, "-o", out, *CRASH_ARGS, "--workers", "0", "--json")
    assert res.exit_code == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def crashed_twice(crash_tree, tmp_path_factory) -> Path:
    """SIGKILL after 1 committed batch, re-run, SIGKILL after 2 more (with a decoding worker)."""
    out = tmp_path_factory.mktemp("crashed") / "c.h5"
    p = sub_extract(crash_tree, out, crash_after=1)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()  # never a partial file at the final path
    assert not list(out.parent.glob("c.h5.tmp-*"))
    assert n_parts(out) == 1  # the committed batch is on disk
    p = sub_extract(crash_tree, out, crash_after=2, workers=1)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    return out


def test_injected_crashes_then_resume_equal_uninterrupted_run(crash_tree, crash_reference, crashed_twice):
    out = crashed_twice
    s = resume(crash_tree, out)
    assert s["n_images"] == 15 and s["extracted"] == 15 and s["skipped"] == 0
    assert_same_cache(out, crash_reference)  # same rows, same order, identical features
    assert leftovers(out) == []


class SimulatedCrash(BaseException):
    """Raised where the fault-injection hook would SIGKILL (for in-process runs)."""


@pytest.fixture
def crash_in_process(monkeypatch):
    """Make the extract's fault-injection hook raise instead of killing the test process.

    The journal's state afterwards is what a SIGKILL leaves (parts are committed atomically before
    the hook fires); the real-SIGKILL tests above check the same thing across processes."""
    def arm(n: int | None):
        if n is None:
            monkeypatch.delenv(CRASH_ENV, raising=False)
        else:
            monkeypatch.setenv(CRASH_ENV, str(n))

    real_kill = os.kill

    def fake_kill(pid, sig):
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise SimulatedCrash()
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", fake_kill)
    yield arm
    monkeypatch.delenv(CRASH_ENV, raising=False)


def crash_then(root, out, n, arm, *extra):
    arm(n)
    with pytest.raises(SimulatedCrash):
        invoke("extract", root, "-o", out, *CRASH_ARGS, "--workers", "0", "--json", *extra)
    arm(None)


def test_resume_reuses_committed_batches(crash_tree, crash_reference, tmp_path, crash_in_process, forward_counter):
    out = tmp_path / "c.h5"
    crash_then(crash_tree, out, 2, crash_in_process)
    assert n_parts(out) == 2 and not out.exists()
    forward_counter["images"] = 0
    s = resume(crash_tree, out)
    assert_same_cache(out, crash_reference)
    assert forward_counter["images"] == 15 - 2 * 3  # committed batches are not recomputed
    assert s["resumed_batches"] == 2


def test_resume_reuses_committed_batches_with_verify_content(crash_tree, crash_reference, tmp_path, forward_counter):
    """Batches committed by a SIGKILLed process are reused by the next run, bit for bit."""
    out = tmp_path / "c.h5"
    p = sub_extract(crash_tree, out, "--verify-content", crash_after=2)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert n_parts(out) == 2 and not out.exists()
    forward_counter["images"] = 0
    s = resume(crash_tree, out, "--verify-content")
    assert s["resumed_batches"] == 2
    assert forward_counter["images"] == 15 - 2 * 3  # committed batches were not recomputed
    assert_same_cache(out, crash_reference)
    assert leftovers(out) == []


def test_crash_during_incremental_update_keeps_previous_cache(crash_tree, crash_reference, tmp_path):
    import shutil

    tree = tmp_path / "images"
    shutil.copytree(crash_tree, tree)
    out = tmp_path / "c.h5"
    shutil.copy2(crash_reference, out)  # an existing complete cache of the same folder and config
    before = read_cache(out)
    write_class_images(tree / "red", (200, 40, 40), 7, np.random.default_rng(5), start=100)  # 3 batches of new work
    p = sub_extract(tree, out, crash_after=2)
    assert p.returncode == -signal.SIGKILL
    after_crash = read_cache(out)  # readers still get the last complete cache
    assert after_crash.paths == before.paths
    np.testing.assert_array_equal(after_crash.features, before.features)
    s = resume(tree, out)
    assert (s["extracted"], s["reused"], s["n_images"]) == (7, 15, 22)
    fresh = tmp_path / "fresh.h5"
    resume(tree, fresh)
    assert_same_cache(out, fresh)


def test_sigkill_at_a_random_moment_then_resume(crash_tree, crash_reference, tmp_path):
    out = tmp_path / "c.h5"
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(crash_tree), "-o", str(out), *FAST,
           "--device", "cpu", "--workers", "1", "--batch-size", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != CRASH_ENV})
    # wait until the run is under way (journal opened), then kill it at a random moment
    deadline = time.monotonic() + 240
    while proc.poll() is None and not Path(f"{out}.parts").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    delay = random.uniform(0.0, 1.5)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    msg = f"killed {delay:.2f}s into the run (rc {proc.returncode}, {n_parts(out)} parts)"
    if out.exists():
        read_cache(out)  # either nothing or a complete cache at the final path, never a partial one
    s = resume(crash_tree, out)
    assert s["n_images"] == 15, msg
    assert_same_cache(out, crash_reference)
    assert leftovers(out) == [], msg


# ---- the lock and concurrent readers -------------------------------------------------------------

def test_second_writer_refused_while_lock_held_in_process(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    with cache_lock(out):
        res = invoke("extract", small_tree, "-o", out, *BASE)
        assert_one_line_error(res, "lock", str(out))
        assert not out.exists()
    extract(small_tree, out)  # released: works


def test_second_writer_refused_while_another_process_holds_the_lock(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    extract(small_tree, out)
    stamp = out.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\n"
         "from featcache.cache.lock import cache_lock\nwith cache_lock(sys.argv[1]):\n"
         " print('locked', flush=True); sys.stdin.read()",
         str(out), str(REPO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = invoke("extract", small_tree, "-o", out, *BASE, "--overwrite", "--pool", "max", "--json")
        assert_one_line_error(res, "another featcache extract", str(out))
        assert out.read_bytes() == stamp  # the cache was not touched
        holder.kill()  # a holder that dies (even by SIGKILL) releases the lock
        holder.wait(timeout=30)
        s = extract(small_tree, out)
        assert s["reused"] == N
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_readers_see_the_last_complete_cache_while_extract_rewrites(small_tree, tmp_path):
    from featcache.cache.store import open_checked

    out = tmp_path / "c.h5"
    extract(small_tree, out)
    old = read_cache(out)
    held = open_checked(out)  # a reader that opened the cache before the rewrite
    try:
        write_class_images(small_tree / "train" / "red", (200, 40, 40), 3, np.random.default_rng(9), start=200)
        cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(small_tree), "-o", str(out), *FAST,
               "--device", "cpu", "--workers", "0", "--batch-size", "1", "--pool", "max", "--overwrite", "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = set()
        reads = 0
        while proc.poll() is None or reads == 0:
            c = read_cache(out)  # never an error, never a partial cache
            assert c.attrs["complete"]
            assert c.features.shape[0] == len(c.paths) == len(c.labels)
            if c.fingerprint == old.fingerprint:
                assert c.paths == old.paths
                np.testing.assert_array_equal(c.features, old.features)
                seen.add("old")
            else:
                assert c.n_rows == old.n_rows + 3 and c.attrs["pool"] == "max"
                seen.add("new")
            info = invoke("info", out, "--json")
            assert info.exit_code == 0, info.stderr
            reads += 1
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "old" in seen
        new = read_cache(out)
        assert new.n_rows == old.n_rows + 3 and new.attrs["pool"] == "max"
        # the handle opened before the rewrite still reads the old, complete data
        np.testing.assert_array_equal(held["features"][...], old.features)
        assert held.attrs["pool"] == old.attrs["pool"]
    finally:
        held.close()
