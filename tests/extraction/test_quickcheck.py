"""The no-op fast path (pipeline/extraction/quickcheck.py): answers "up to date" only where a full
run would compute nothing and write the same rows, and never imports torch when it does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import FAST, FAST_KW, REPO, assert_one_line_error, invoke, noisy_image

from featcache.cache.store import read_cache
from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.extraction import quickcheck
from featcache.pipeline.extraction.quickcheck import up_to_date

BASE = [*FAST, "--device", "cpu", "--workers", "0"]


def extract(root, out, *extra) -> dict:
    res = invoke("extract", root, "-o", out, *BASE, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def cfg_of(root, out, **kw) -> ExtractConfig:
    """The ExtractConfig the CLI builds for ``extract ROOT -o OUT *BASE`` (plus ``kw``)."""
    return ExtractConfig(image_dir=str(root), output=str(out), **{**FAST_KW, "device": "cpu", "workers": 0, **kw})


@pytest.fixture
def cached(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    first = extract(small_tree, out)
    assert first["up_to_date"] is False and first["extracted"] == first["n_images"]
    return small_tree, out, first


def test_unchanged_tree_is_answered_from_the_cache_without_rewriting_it(cached):
    root, out, first = cached
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    s = extract(root, out)
    assert s["up_to_date"] is True
    assert (s["extracted"], s["reused"], s["removed"], s["skipped"]) == (0, first["n_images"], 0, 0)
    assert (s["fingerprint"], s["splits"], s["classes"]) == (first["fingerprint"], first["splits"], first["classes"])
    assert set(s) == set(first)  # same summary keys as a full run
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before  # not rewritten


def test_recorded_attributes(cached):
    _, out, _ = cached
    a = read_cache(out, features=False).attrs
    assert a["library_versions"]["torch"] and a["library_versions"] == quickcheck.library_versions()
    assert a["code_sha256"] == quickcheck.code_sha256()
    # what discovery matched, torchvision's ImageFolder tuple (quickcheck refuses a cache whose differs)
    from torchvision.datasets.folder import IMG_EXTENSIONS
    assert tuple(a["image_extensions"]) == IMG_EXTENSIONS
    assert "weights_file" not in a  # random weights: no file to stat


def test_changed_added_removed_image_goes_down_the_full_path(cached):
    root, out, first = cached
    cfg = cfg_of(root, out)
    assert up_to_date(cfg) is not None
    img = next((root / "train").rglob("*.*"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: size + mtime decide
    assert up_to_date(cfg) is None
    s = extract(root, out)
    assert (s["up_to_date"], s["extracted"]) == (False, 1)
    assert up_to_date(cfg) is not None

    noisy_image((10, 200, 10), np.random.default_rng(3)).save(img.parent / "added.png")
    assert up_to_date(cfg) is None
    assert extract(root, out)["extracted"] == 1

    (img.parent / "added.png").unlink()
    assert up_to_date(cfg) is None
    assert extract(root, out)["removed"] == 1
    assert up_to_date(cfg) is not None


def test_new_class_folder_or_moved_image_goes_down_the_full_path(cached):
    root, out, _ = cached
    cfg = cfg_of(root, out)
    img = next((root / "train").rglob("*.*"))
    (root / "train" / "newclass").mkdir()
    shutil.move(img, root / "train" / "newclass" / img.name)  # same bytes and mtime, new path and label
    assert up_to_date(cfg) is None
    s = extract(root, out)
    assert "newclass" in s["classes"] and s["extracted"] == 1


def test_verify_content_touched_file_goes_down_the_full_path_to_record_its_mtime(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    extract(small_tree, out, "--verify-content")
    cfg = cfg_of(small_tree, out, verify_content=True)
    assert up_to_date(cfg) is not None
    img = next((small_tree / "val").rglob("*.*"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))  # same bytes: reused, but re-recorded
    assert up_to_date(cfg) is None
    s = extract(small_tree, out, "--verify-content")
    assert (s["up_to_date"], s["extracted"]) == (False, 0)
    assert up_to_date(cfg) is not None


def test_changed_flag_goes_down_the_full_path(cached):
    root, out, first = cached
    assert up_to_date(cfg_of(root, out, batch_size=5)) is None  # speed-only, but recorded in config
    assert up_to_date(cfg_of(root, out, verify_content=True)) is None
    assert up_to_date(cfg_of(root, out, pool="max")) is None
    s = extract(root, out, "--batch-size", "5")
    assert (s["up_to_date"], s["reused"]) == (False, first["n_images"])  # full run, every row reused
    assert up_to_date(cfg_of(root, out, batch_size=5)) is not None  # now recorded
    res = invoke("extract", root, "-o", out, *BASE, "--pool", "max", "--json")
    assert_one_line_error(res, "different configuration")  # exactly what the full run says


def test_changed_library_version_goes_down_the_full_path(cached, monkeypatch):
    root, out, first = cached
    cfg = cfg_of(root, out)
    real = quickcheck.metadata.version
    monkeypatch.setattr(quickcheck.metadata, "version", lambda name: "99.0" if name == "torch" else real(name))
    assert up_to_date(cfg) is None
    s = extract(root, out)  # the full run records the versions it ran with
    assert (s["up_to_date"], s["reused"]) == (False, first["n_images"])
    assert read_cache(out, features=False).attrs["library_versions"]["torch"] == "99.0"
    assert up_to_date(cfg) is not None


def test_changed_featcache_code_goes_down_the_full_path(cached, monkeypatch):
    root, out, _ = cached
    monkeypatch.setattr(quickcheck, "code_sha256", lambda: "0" * 64)
    assert up_to_date(cfg_of(root, out)) is None


def test_weights_file_stat_then_bytes_decide(small_tree, tmp_path):
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, weights)
    out = tmp_path / "c.h5"
    args = ["--backbone", "resnet18", "--weights", str(weights), "--layer", "maxpool", "--pool", "avg",
            "--device", "cpu", "--workers", "0", "--json"]
    res = invoke("extract", small_tree, "-o", out, *args)
    assert res.exit_code == 0, res.stderr
    a = read_cache(out, features=False).attrs
    assert a["weights"].startswith("sha256:") and a["weights_file"]["size"] == weights.stat().st_size
    cfg = ExtractConfig(image_dir=str(small_tree), output=str(out), backbone="resnet18", weights=str(weights),
                        layer="maxpool", pool="avg", device="cpu", workers=0)
    assert up_to_date(cfg) is not None
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))  # touched, same bytes: same identity
    assert up_to_date(cfg) is not None
    sd["conv1.weight"] = sd["conv1.weight"] * 1.5  # new weights, same size
    torch.save(sd, weights)
    assert up_to_date(cfg) is None
    assert_one_line_error(invoke("extract", small_tree, "-o", out, *args), "different configuration")
    weights.unlink()
    assert up_to_date(cfg) is None


def test_journal_or_skipped_files_go_down_the_full_path(cached, tmp_path):
    root, out, _ = cached
    cfg = cfg_of(root, out)
    parts = tmp_path / "c.h5.parts"
    parts.mkdir()
    assert up_to_date(cfg) is None
    parts.rmdir()
    (root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "bad.jpg").write_bytes(b"not a jpeg")
    s = extract(root, out)
    assert s["skipped"] == 1
    assert up_to_date(cfg) is None  # a full run would try the skipped file again


def test_no_op_process_never_imports_torch_and_a_full_run_after_it_still_works(cached):
    """A real process: the no-op answer comes without torch; when a file changed, the full run
    that follows imports the real discover/torchvision and extracts as usual."""
    root, out, first = cached
    code = (
        "import json, sys\nfrom featcache import cli\n"
        "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps({'torch': 'torch' in sys.modules}))\n"
    )
    argv = ["extract", str(root), "-o", str(out), *BASE, "--json"]

    def run() -> tuple[dict, dict]:
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=str(REPO),
                           timeout=300)
        assert p.returncode == 0, p.stderr
        summary, probe = p.stdout.strip().splitlines()[-2:]
        return json.loads(summary), json.loads(probe)

    s, probe = run()
    assert s["up_to_date"] is True and probe["torch"] is False
    (next((root / "val").rglob("*.*"))).write_bytes(next((root / "train").rglob("*.*")).read_bytes())
    s, probe = run()
    assert (s["up_to_date"], s["extracted"], probe["torch"]) == (False, 1, True)


def test_a_different_extension_set_goes_down_the_full_path(cached, monkeypatch):
    """The cache records which extensions discovery matched; a build matching others decides in full."""
    root, out, _ = cached
    cfg = cfg_of(root, out)
    assert up_to_date(cfg) is not None
    monkeypatch.setattr(quickcheck, "IMG_EXTENSIONS", quickcheck.IMG_EXTENSIONS + (".jxl",))
    assert up_to_date(cfg) is None
