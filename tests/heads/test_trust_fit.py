"""Issue 13, fit-head side: nothing silently wrong, a run folder holds one run, failures are one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, CliResult, assert_one_line_error
from synthcache import fit, run_cli, write_cache


def _cli(*args) -> CliResult:
    code, out, err = run_cli(*args)
    return CliResult(code, out, err)


def _poison(cache, row: int, value=np.nan):
    with h5py.File(cache, "r+") as f:
        feats = f["features"][row]
        feats[3] = value
        f["features"][row] = feats
        return f["paths"][row].decode()


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "c.h5", {"train": 20, "val": 8, "test": 8})


@pytest.mark.parametrize("split_row", [0, 65])  # a train row; a val row (rows 60-83 are val)
def test_non_finite_features_are_refused_with_the_first_paths(cache, tmp_path, split_row):
    path = _poison(cache, split_row)
    line = assert_one_line_error(_cli("fit-head", cache, "-o", tmp_path / "run"), "non-finite", "--drop-nonfinite")
    assert path in line
    assert not (tmp_path / "run").exists()


def test_drop_nonfinite_leaves_the_rows_out_and_says_so(cache, tmp_path):
    _poison(cache, 1, np.inf)
    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "run", "--drop-nonfinite", "--solver", "epochs",
                             "--epochs", "5", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["n_train"] == 59 and s["config"]["drop_nonfinite"] is True
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        next(ln for ln in err.splitlines() if ln.startswith("featcache: warning: left out 1 row"))]
    assert np.isfinite(s["train_loss"]) and s["best_epoch"] >= 1


@pytest.mark.parametrize("args, word", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--weight-decay", "1e309"], "--weight-decay"),
    (["--l1", "nan"], "--l1"), (["--patience", "-1"], "--patience"), (["--lr", "1e-3,,1e-2"], "--lr"),
    (["--head", "mlp", "--hidden", ""], "--hidden"), (["--dropout", "nan"], "--dropout"),
    (["--head", "logreg", "--C", "inf"], "--C"), (["--momentum", "nan"], "--momentum"),
])
def test_non_finite_or_meaningless_hyperparameters_are_one_line(cache, tmp_path, args, word):
    assert_one_line_error(_cli("fit-head", cache, "-o", tmp_path / "run", *args), word)
    assert not (tmp_path / "run").exists()


def test_val_fraction_that_leaves_too_few_training_rows_is_one_line(tmp_path):
    flat = write_cache(tmp_path / "flat.h5", {"train": 30})
    assert_one_line_error(_cli("fit-head", flat, "-o", tmp_path / "run", "--val-fraction", "0.999"), "--val-fraction")


def test_one_image_class_and_test_only_class_are_warned_about(tmp_path):
    c = write_cache(tmp_path / "odd.h5", {"train": 12}, classes=3)
    with h5py.File(c, "r+") as f:  # class 2 keeps one training image, the rest of it moves to test
        labels, split = f["labels"][...], f["split"][...].astype(str)
        idx = np.flatnonzero(labels == 2)
        split[idx[1:]] = "test"
        f["split"][...] = split.astype(object)
    code, out, err = run_cli("fit-head", c, "-o", tmp_path / "run", "--epochs", "3", "--json")
    assert code == 0, err
    assert any(ln.startswith("featcache: warning:") and "single training image" in ln for ln in err.splitlines())
    c2 = write_cache(tmp_path / "unseen.h5", {"train": 10, "test": 4}, classes=3)
    with h5py.File(c2, "r+") as f:  # class 2 only in test
        labels, split = f["labels"][...], f["split"][...].astype(str)
        labels[(labels == 2) & (split == "train")] = 0
        f["labels"][...] = labels
    code, out, err = run_cli("fit-head", c2, "-o", tmp_path / "run2", "--epochs", "3")
    assert code == 0, err
    assert any("class2" in ln and "no training images" in ln for ln in err.splitlines())


def test_existing_run_folder_is_replaced_only_with_overwrite_and_then_whole(cache, tmp_path):
    run = tmp_path / "run"
    fit(cache, run, "--lr", "1e-3,1e-2", "--epochs", "3")
    assert (run / "sweep.png").exists()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert_one_line_error(_cli("fit-head", cache, "-o", run, "--epochs", "3"), "already holds", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched
    s = fit(cache, run, "--epochs", "3", "--no-plots", "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == sorted(s["files"])  # no stale sweep.png or curves
    assert not any(p.name.startswith(".run.") for p in tmp_path.iterdir())  # no temporary, no lock file


def test_second_fit_head_into_one_run_folder_is_refused_while_the_first_holds_the_lock(cache, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom featcache.cache.lock import cache_lock\n"
         "with cache_lock(sys.argv[1], writer='featcache fit-head'):\n print('locked', flush=True); sys.stdin.read()",
         str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(_cli("fit-head", cache, "-o", run, "--epochs", "2"), "another featcache fit-head")
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
    fit(cache, run, "--epochs", "2")  # released by the dead holder
    assert not (tmp_path / ".run.lock").exists()  # the lock file it left is taken over and removed


def test_fit_head_killed_between_writes_leaves_the_old_run_intact(cache, tmp_path):
    run = tmp_path / "run"
    fit(cache, run, "--epochs", "3")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    env = {**os.environ, "FEATCACHE_TEST_KILL_AFTER_HEAD": "1"}
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit-head", str(cache), "-o", str(run), "--epochs", "7",
                        "--lr", "1e-2", "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9  # killed right after writing the new head.pt
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the old run, whole
    s = fit(cache, run, "--epochs", "2", "--overwrite")  # the next run cleans the dead one's temp folder
    assert not [q for q in tmp_path.iterdir() if ".tmp-" in q.name]
    assert s["epochs_run"] == 2


def test_output_under_a_file_is_one_line_before_training(cache, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(_cli("fit-head", cache, "-o", tmp_path / "afile" / "run"), "not a folder")


def test_head_whose_class_names_do_not_match_its_outputs_is_one_line(cache, tmp_path):
    fit(cache, tmp_path / "run", "--epochs", "2")
    obj = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    obj["metadata"]["class_names"] = obj["metadata"]["class_names"][:2]
    torch.save(obj, tmp_path / "run" / "head.pt")
    assert_one_line_error(_cli("evaluate", tmp_path / "run", cache), "class names", "outputs")


def test_runs_skips_a_finetune_folder_instead_of_crashing(cache, tmp_path):
    fit(cache, tmp_path / "exp" / "a", "--epochs", "2")
    ft = tmp_path / "exp" / "ft"
    ft.mkdir()
    (ft / "metrics.json").write_text(json.dumps({"val_accuracy": 0.9, "train_accuracy": 0.95, "config": {
        "image_dir": "imgs", "run_dir": "exp/a", "output": "exp/ft", "unfreeze": "all", "epochs": 3}}))
    code, out, err = run_cli("runs", tmp_path / "exp", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [r["run"] for r in data["runs"]] == ["a"]
    assert data["skipped"][0]["path"].endswith("ft/metrics.json")
