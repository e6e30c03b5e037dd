"""Input sources (pipeline/extraction/sources.py): a .csv/.tsv manifest works wherever a folder tree
does -- extract (incremental, no-op, resume), predict and finetune -- with malformed rows and
unusable files skipped with their reasons, and a malformed manifest refused in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, FAST_KW, REPO, assert_one_line_error, invoke, noisy_image

from featcache.cache.store import read_cache
from featcache.pipeline.extraction.quickcheck import up_to_date
from featcache.pipeline.extraction.sources import _READERS, open_source, register_reader, source_kind

BASE = [*FAST, "--device", "cpu", "--workers", "0"]


def extract(source, out, *extra) -> dict:
    res = invoke("extract", source, "-o", out, *BASE, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def tree_rows(root: Path) -> list[tuple[str, str, str]]:
    """(path, label, split) of every image of a ROOT/split/class/ tree, as a manifest lists them."""
    return [(p.relative_to(root).as_posix(), p.parent.name, p.parent.parent.name)
            for p in sorted(root.glob("*/*/*.*"))]


def write_manifest(path: Path, rows, header=("path", "label", "split"), sep: str = ",") -> Path:
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def manifest(small_tree) -> Path:
    """labels.csv beside the small tree's split folders, listing its 15 images in reverse order."""
    return write_manifest(small_tree / "labels.csv", reversed(tree_rows(small_tree)))


def test_manifest_extracts_like_the_equivalent_folder(manifest, small_tree, tmp_path):
    a = extract(small_tree, tmp_path / "tree.h5")
    b = extract(manifest, tmp_path / "csv.h5")
    ta, tb = read_cache(tmp_path / "tree.h5"), read_cache(tmp_path / "csv.h5")
    assert (b["n_images"], b["skipped"], b["classes"], b["splits"]) == (15, 0, a["classes"], a["splits"])
    assert list(tb.paths) == list(ta.paths) and list(tb.split) == list(ta.split)
    assert np.array_equal(tb.labels, ta.labels) and tb.class_names == ta.class_names
    np.testing.assert_allclose(tb.features, ta.features, rtol=0, atol=1e-6)
    assert tb.attrs["source"]["kind"] == "manifest" and len(tb.attrs["source"]["sha256"]) == 64
    assert "source" not in ta.attrs


def test_tsv_empty_label_and_no_split_column(small_tree, tmp_path):
    rows = [(p, "" if p.startswith("test/") else lab) for p, lab, _ in tree_rows(small_tree)]
    (tmp_path / "lists").mkdir()
    tsv = write_manifest(tmp_path / "lists" / "list.tsv", [(f"../images/{p}", lab) for p, lab in rows],
                         header=("Path ", "LABEL"), sep="\t")  # header matched without case or spaces
    disc = open_source(tsv)
    assert not disc.has_splits and {r.split for r in disc.records} == {"train"}  # no column: all train
    assert all(r.path.startswith("../images/") for r in disc.records)  # '..' allowed, kept as written
    s = extract(tsv, tmp_path / "c.h5")
    c = read_cache(tmp_path / "c.h5", features=False)
    unlabeled = {p for p, lab in rows if not lab}
    assert len(unlabeled) == 3 and s["n_images"] == 15
    assert {p for p, lab in zip(c.paths, c.labels) if lab == -1} == {f"../images/{p}" for p in unlabeled}
    assert c.class_names == ["blue", "green", "red"]  # sorted unique non-empty labels


def test_bad_rows_and_files_are_skipped_with_reasons(manifest, small_tree, tmp_path):
    (small_tree / "junk.png").write_text("not a png")
    rows = tree_rows(small_tree) + [("", "red", "train"), ("junk.png", "red", "train"),
                                    ("gone.jpg", "red", "val"), ("train/red/img_000.png", "blue", "test"),
                                    ("train/red/./img_001.jpg", "red", "train"), ("x.png", "red", "holdout")]
    write_manifest(manifest, rows)
    res = invoke("extract", manifest, "-o", tmp_path / "c.h5", *BASE)
    assert res.exit_code == 0, res.stderr
    c = read_cache(tmp_path / "c.h5", features=False)
    reasons = dict(c.skipped)
    n = len(tree_rows(small_tree)) + 1  # header line 1, tree rows from line 2
    assert reasons[f"labels.csv:{n + 1}"] == "row has no path"
    assert "cannot identify" in reasons["junk.png"]
    assert "No such file" in reasons["gone.jpg"]
    assert "repeats line" in reasons[f"labels.csv:{n + 4}"] and "first row wins" in reasons[f"labels.csv:{n + 4}"]
    assert "repeats line" in reasons[f"labels.csv:{n + 5}"]  # same file once normalised
    assert "unknown split 'holdout'" in reasons[f"labels.csv:{n + 6}"]
    assert len(reasons) == 6 and c.n_rows == 15
    red0 = list(c.paths).index("train/red/img_000.png")
    assert c.class_names[int(c.labels[red0])] == "red" and c.split[red0] == "train"  # the first row won
    skipped_lines = [ln for ln in res.stderr_lines if ln.startswith("  skipped ")]
    assert len(skipped_lines) == 6 and any("labels.csv" in ln and "row has no path" in ln for ln in skipped_lines)


def test_unchanged_manifest_is_a_quick_noop_relabel_and_added_row(manifest, small_tree, tmp_path):
    out = tmp_path / "c.h5"
    extract(manifest, out)
    sha = read_cache(out, features=False).attrs["source"]["sha256"]
    again = extract(manifest, out)
    assert (again["up_to_date"], again["extracted"], again["reused"]) == (True, 0, 15)

    rows = tree_rows(small_tree)
    rows[0] = (rows[0][0], "green", rows[0][2])  # re-labelled: features reused, label changed
    write_manifest(manifest, rows)
    s = extract(manifest, out)
    assert (s["up_to_date"], s["extracted"], s["reused"]) == (False, 0, 15)
    c = read_cache(out, features=False)
    assert c.class_names[int(c.labels[list(c.paths).index(rows[0][0])])] == "green"
    assert c.attrs["source"]["sha256"] != sha  # the cache records the manifest it was made from
    assert extract(manifest, out)["up_to_date"] is True

    noisy_image((10, 200, 10), np.random.default_rng(3)).save(small_tree / "new.png")
    write_manifest(manifest, rows + [("new.png", "green", "val")])
    s = extract(manifest, out)
    assert (s["extracted"], s["reused"], s["n_images"]) == (1, 15, 16)


def test_quickcheck_declines_while_rows_are_skipped(manifest, small_tree, tmp_path):
    out = tmp_path / "c.h5"
    write_manifest(manifest, tree_rows(small_tree) + [("", "red", "train")])
    extract(manifest, out)
    from featcache.pipeline.config import ExtractConfig

    cfg = ExtractConfig(image_dir=str(manifest), output=str(out), **{**FAST_KW, "device": "cpu", "workers": 0})
    assert up_to_date(cfg) is None  # a malformed row is retried by the full path, as unreadable files are
    write_manifest(manifest, tree_rows(small_tree))
    assert extract(manifest, out)["up_to_date"] is False
    assert up_to_date(cfg) is not None


def test_resume_after_a_killed_run(manifest, tmp_path):
    out = tmp_path / "c.h5"
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(manifest), "-o", str(out), *BASE,
           "--batch-size", "3", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FEATCACHE_TEST_CRASH_AFTER_BATCHES": "2"})
    assert p.returncode != 0 and not out.exists()
    s = extract(manifest, out, "--batch-size", "3")
    assert (s["resumed_batches"], s["n_images"], s["extracted"]) == (2, 15, 15)
    extract(manifest, tmp_path / "ref.h5", "--batch-size", "3")  # the same run, uninterrupted
    np.testing.assert_allclose(read_cache(out).features, read_cache(tmp_path / "ref.h5").features, atol=1e-6)


@pytest.mark.parametrize("content, words", [
    (b"train/red/img_000.png,red,train\n", ["labels.csv", "no 'path' column"]),  # no header
    (b"file,label\na.png,red\n", ["labels.csv", "no 'path' column"]),
    (b"", ["labels.csv", "empty"]),
    (b"path,label\n\xff\xfe.png,red\n", ["labels.csv", "not UTF-8", "0xff"]),
    (b"path,label,path\na.png,red,b.png\n", ["labels.csv", "'path' twice"]),
    (b"path,label\n,red\n", ["labels.csv", "lists no images", "row has no path"]),
    (b'path,label\n"a.png,red\nb.png,blue\n', ["labels.csv", "not valid CSV at line 3", "unexpected end"]),
])
def test_malformed_manifest_is_one_line(small_tree, tmp_path, content, words):
    (small_tree / "labels.csv").write_bytes(content)
    assert_one_line_error(invoke("extract", small_tree / "labels.csv", "-o", tmp_path / "c.h5", *BASE), *words)


def test_missing_manifest_and_bom(small_tree, tmp_path):
    assert_one_line_error(invoke("extract", tmp_path / "nope.csv", "-o", tmp_path / "c.h5", *BASE),
                          "manifest not found", "nope.csv")
    (small_tree / "bom.csv").write_bytes(b"\xef\xbb\xbfpath,label\ntrain/red/img_000.png,red\n")  # Excel's UTF-8
    assert [r.path for r in open_source(small_tree / "bom.csv").records] == ["train/red/img_000.png"]


def test_a_new_reader_is_one_registration(tmp_path):
    from featcache.pipeline.extraction.discover import Discovery, ImageRecord

    (tmp_path / "a.list").write_text("x.png\n")
    def read(p):
        return Discovery(p.parent, tuple(ImageRecord(ln, -1, "train") for ln in p.read_text().split()), (), False)

    register_reader("list", lambda p: p.suffix == ".list", read)
    try:
        assert source_kind(tmp_path / "a.list") == "list" and source_kind(tmp_path) == "folder"
        assert [r.path for r in open_source(tmp_path / "a.list").records] == ["x.png"]
    finally:
        _READERS.pop()


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory):
    """A fit-head run over FAST features extracted from a manifest (predict and finetune start here)."""
    from conftest import SMALL_COUNTS, make_split_tree

    d = tmp_path_factory.mktemp("manifest_run")
    root = make_split_tree(d / "images", counts=SMALL_COUNTS, seed=5)
    m = write_manifest(d / "labels.csv", [(f"images/{p}", lab, s) for p, lab, s in tree_rows(root)])
    assert invoke("extract", m, "-o", d / "c.h5", *BASE).exit_code == 0
    res = invoke("fit-head", d / "c.h5", "-o", d / "run", "--epochs", "10", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    return d, m


def test_predict_on_a_manifest(manifest_run, tmp_path):
    d, m = manifest_run
    text = m.read_text().splitlines()
    bad = write_manifest(tmp_path / "more.csv", [(str(d / p), lab) for p, lab, _ in
                                                 (ln.split(",") for ln in text[1:4])] + [("", "red"), ("/nope.png", "red")],
                         header=("path", "label"))
    res = invoke("predict", d / "run", m, bad, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    s = res.json()
    assert s["n_files"] == 15 + 4 and s["n_errors"] == 1  # /nope.png
    assert s["skipped_rows"] == [{"path": str(tmp_path / "more.csv:5"), "reason": "row has no path"}]
    acc = s["manifest_accuracy"]
    assert acc["n"] == 18 and acc["not_scored"] == 1  # absolute paths allowed; the missing file not scored
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in s["predictions"] if "label" in r)
    assert acc["correct"] == correct and acc["accuracy"] == pytest.approx(correct / 18)
    human = invoke("predict", d / "run", bad, "--device", "cpu")
    assert human.exit_code == 0 and "1 manifest row(s) skipped" in human.stdout and "accuracy " in human.stdout


def test_finetune_from_a_manifest(manifest_run, tmp_path):
    d, m = manifest_run
    res = invoke("finetune", m, "--from", d / "run", "-o", tmp_path / "ft", "--epochs", "1", "--batch-size", "8",
                 "--unfreeze", "0", "--device", "cpu", "--workers", "0", "--json")
    assert res.exit_code == 0, res.stderr
    s = res.json()
    assert s["class_names"] == ["blue", "green", "red"] and s["epochs_run"] == 1 and 0.0 <= s["val_accuracy"] <= 1.0
    assert (tmp_path / "ft" / "metrics.json").exists()
    other = write_manifest(tmp_path / "two.csv", [(str(d / "images/train/red/img_000.png"), "red"),
                                                  (str(d / "images/train/blue/img_000.png"), "cyan")],
                           header=("path", "label"))
    assert_one_line_error(invoke("finetune", other, "--from", d / "run", "-o", tmp_path / "ft2", "--device", "cpu"),
                          "manifest labels", "head's classes")


def test_manifest_noop_needs_no_torch(small_tree, tmp_path):
    """The quick answer for a manifest re-reads it without importing torch (a real process)."""
    m = write_manifest(small_tree / "three.csv", tree_rows(small_tree)[:3])
    extract(m, tmp_path / "c.h5")
    code = ("import json, sys\nfrom featcache.pipeline.config import ExtractConfig\n"
            "from featcache.pipeline.extraction.quickcheck import up_to_date\n"
            f"s = up_to_date(ExtractConfig(image_dir={str(m)!r}, output={str(tmp_path / 'c.h5')!r}, "
            f"**{ {**FAST_KW, 'device': 'cpu', 'workers': 0}!r}))\n"
            "print(json.dumps({'up': bool(s and s['up_to_date']), 'torch': 'torch' in sys.modules}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == '{"up": true, "torch": false}'
