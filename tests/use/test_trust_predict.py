"""Issue 13, use side: predict/export/finetune outputs written whole, checked before the work, and
names of any bytes; plus the backbones' weights messages."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_line_error, deny_listing, invoke, noisy_image

BAD = b"bad\xff\xfe.png"
ODD = "odd\tname\nwith lines.png"


@pytest.fixture
def odd_folder(split_tree_ro, tmp_path) -> Path:
    """Two good images, one named with invalid UTF-8, one with a tab and a newline, a GIF and an AVIF."""
    d = tmp_path / "odd"
    d.mkdir()
    good = sorted((split_tree_ro / "test" / "red").iterdir())[:2]
    for p in good:
        shutil.copy(p, d / p.name)
    shutil.copy(good[0], os.path.join(os.fsencode(d), BAD))
    shutil.copy(good[0], d / ODD)
    img = noisy_image((200, 40, 40), np.random.default_rng(0))
    img.save(d / "anim.gif")
    img.save(d / "pic.avif")
    return d


def predict(*args):
    return invoke("predict", *args, "--device", "cpu")


def test_any_name_round_trips_through_json_csv_and_tsv(fast_run, odd_folder, tmp_path):
    res = predict(fast_run, odd_folder, "--json")
    assert res.exit_code == 0, res.stderr
    res.stdout.encode("utf-8")  # no lone surrogates: valid UTF-8 JSON
    preds = res.json()["predictions"]
    names = sorted(Path(p["path"]).name for p in preds)
    assert names == sorted(["anim.gif", "pic.avif", "bad\\xff\\xfe.png", ODD] + [n for n in os.listdir(odd_folder)
                                                                               if n.startswith("img")])
    assert all("error" not in p for p in preds)  # every one of them was classified

    out_csv = tmp_path / "p.csv"
    res = predict(fast_run, odd_folder, "--csv", out_csv)
    assert res.exit_code == 0, res.stderr
    raw = out_csv.read_bytes()
    assert b"\r\n" not in raw  # LF line endings
    rows = list(csv.DictReader(out_csv.open(newline="", encoding="utf-8")))
    assert len(rows) == 6 and "label" not in rows[0] and rows[0]["class_1"]
    assert any(r["path"].endswith(ODD) for r in rows)  # the newline survives CSV quoting
    lines = res.stdout.splitlines()
    assert len(lines) == 7  # 6 TSV lines + the count: tab and newline in a name cannot split a line
    assert all(len(ln.split("\t")) == 2 for ln in lines[:-1])
    assert any("odd\\tname\\nwith lines.png" in ln for ln in lines)


def test_predict_dir_and_file_agree_on_gif_and_avif(fast_run, odd_folder):
    from_dir = {Path(p["path"]).name: p for p in predict(fast_run, odd_folder, "--json").json()["predictions"]}
    for name in ("anim.gif", "pic.avif"):
        one = predict(fast_run, odd_folder / name, "--json").json()["predictions"][0]
        assert "error" not in one
        assert [t["class"] for t in one["top"]] == [t["class"] for t in from_dir[name]["top"]]
        np.testing.assert_allclose([t["probability"] for t in one["top"]],  # batch of 1 vs 6: float rounding
                                   [t["probability"] for t in from_dir[name]["top"]], rtol=1e-5)


def test_failed_predict_keeps_the_previous_csv(fast_run, tmp_path):
    keep = tmp_path / "keep.csv"
    keep.write_text("path,error,class_1,prob_1\na.png,,red,0.9\n")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert_one_line_error(predict(fast_run, bad, "--csv", keep), "none of the 1 files")
    assert keep.read_text() == "path,error,class_1,prob_1\na.png,,red,0.9\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "keep.csv"]


def test_predict_exits_non_zero_when_every_file_is_unreadable(fast_run, tmp_path):
    for n in ("a.png", "b.jpg"):
        (tmp_path / n).write_bytes(b"junk")
    assert_one_line_error(predict(fast_run, tmp_path / "a.png", tmp_path / "b.jpg"), "none of the 2 files", "a.png")


def test_predict_csv_into_a_bad_folder_fails_before_the_work(fast_run, split_tree_ro, tmp_path, monkeypatch):
    import featcache.pipeline.use.predict as pr

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(pr, "load_predictor", never)
    (tmp_path / "afile").write_text("x")
    img = split_tree_ro / "val"
    assert_one_line_error(predict(fast_run, img, "--csv", tmp_path / "nodir" / "p.csv"), "--csv", "does not exist")
    assert_one_line_error(predict(fast_run, img, "--csv", tmp_path / "afile" / "p.csv"), "is a file")


def test_predict_reports_an_unreadable_folder(fast_run, split_tree_ro, tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    shutil.copytree(split_tree_ro / "val", d)
    locked = d / "blue"
    deny_listing(monkeypatch, locked)
    res = predict(fast_run, d, "--json")
    assert res.exit_code == 0, res.stderr
    assert res.json()["unreadable_folders"] == [{"path": f"{locked}/", "reason": "folder cannot be read: "
                                                 "PermissionError: Permission denied"}]


def test_export_into_a_bad_folder_fails_before_the_work(fast_run, tmp_path, monkeypatch):
    import featcache.pipeline.use.export as ex

    monkeypatch.setattr(ex, "load_predictor", lambda *a: (_ for _ in ()).throw(AssertionError("loaded first")))
    assert_one_line_error(invoke("export", fast_run, "-o", tmp_path / "nodir" / "m.pt2"), "does not exist")
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(invoke("export", fast_run, "-o", tmp_path / "afile" / "m.pt"), "is a file")


def test_failed_export_keeps_the_previous_file(fast_run, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "m.pt"
    out.write_bytes(b"previous model")

    def broken_save(obj, path, **kw):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    res = invoke("export", fast_run, "-o", out)
    assert res.exit_code != 0
    assert out.read_bytes() == b"previous model" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_finetune_rejects_a_bad_unfreeze_before_loading(fast_run, split_tree_ro, tmp_path, monkeypatch):
    import featcache.pipeline.use.finetune as ft

    monkeypatch.setattr(ft, "load_run", lambda *a: (_ for _ in ()).throw(AssertionError("loaded first")))
    args = ["finetune", split_tree_ro, "--from", fast_run, "-o", tmp_path / "ft", "--device", "cpu"]
    assert_one_line_error(invoke(*args, "--unfreeze", "abc"), "--unfreeze", "'abc'")
    assert_one_line_error(invoke(*args, "--unfreeze", "-1"), "--unfreeze")
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(invoke(*args[:4], "-o", tmp_path / "afile" / "ft", "--device", "cpu"), "is a file")


def test_unknown_weights_name_lists_default_once(small_tree, tmp_path):
    line = assert_one_line_error(invoke("extract", small_tree, "-o", tmp_path / "c.h5", "--weights", "IMAGENET1K_V9"),
                                 "unknown weights")
    assert line.count("DEFAULT") == 1 and "IMAGENET1K_V1" in line


def test_weights_file_that_is_not_torch_is_a_short_line(small_tree, tmp_path):
    w = tmp_path / "some.h5"
    with h5py.File(w, "w") as f:
        f["x"] = np.zeros(3)
    line = assert_one_line_error(invoke("extract", small_tree, "-o", tmp_path / "c.h5", "--weights", w), "refusing")
    assert "PyTorch 2.6" not in line and "weights_only" not in line and len(line) < 300
