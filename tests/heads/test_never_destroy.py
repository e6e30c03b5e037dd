"""--overwrite replaces fit-head runs and nothing else; an output is never an input or a file inside a run."""
from __future__ import annotations

import os
import shutil

import pytest
from conftest import CliResult, assert_one_line_error, invoke
from synthcache import fit, run_cli, write_cache


def _cli(*args) -> CliResult:
    code, out, err = run_cli(*args)
    return CliResult(code, out, err)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_folder_holding_the_input_cache(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    cache = write_cache(project / "cache.h5", {"train": 10, "val": 4, "test": 4})
    (project / "notes.txt").write_text("my notes")
    before = _snapshot(project)
    line = assert_one_line_error(_cli("fit-head", cache, "-o", project, "--head", "logreg", "--overwrite"),
                                 "holds the input cache")
    assert str(project) in line
    assert _snapshot(project) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    data = tmp_path / "mine"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"png")
    (data / "notes.txt").write_text("keep me")
    before = _snapshot(data)
    assert_one_line_error(_cli("fit-head", cache, "-o", data, "--epochs", "2", "--overwrite"),
                          "replaces fit-head runs only", "not one")
    assert _snapshot(data) == before


def test_overwrite_refuses_an_experiments_folder_holding_runs(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    exp = tmp_path / "experiments"
    fit(cache, exp / "a", "--epochs", "2", "--no-plots")
    fit(cache, exp / "b", "--epochs", "2", "--no-plots")
    before = _snapshot(exp)
    assert_one_line_error(_cli("fit-head", cache, "-o", exp, "--epochs", "2", "--overwrite"), "not one")
    assert _snapshot(exp) == before


def test_overwrite_refuses_a_run_with_a_file_fit_head_did_not_write(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    run = tmp_path / "run"
    fit(cache, run, "--epochs", "2", "--no-plots")
    (run / "my_analysis.ipynb").write_text("{}")
    before = _snapshot(run)
    line = assert_one_line_error(_cli("fit-head", cache, "-o", run, "--epochs", "2", "--overwrite"),
                                 "my_analysis.ipynb", "did not write")
    assert "choose a new run folder" in line
    assert _snapshot(run) == before


def test_overwrite_replaces_a_run_and_its_own_files_only(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    run = tmp_path / "run"
    fit(cache, run, "--epochs", "2", "--lr", "1e-3,1e-2")  # with plots: sweep.png and the rest
    s = fit(cache, run, "--epochs", "2", "--no-plots", "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == sorted(s["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.") and not p.name.endswith(".lock")]


def test_runs_ignores_temporary_folders_a_killed_save_left(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    exp = tmp_path / "exp"
    fit(cache, exp / "a", "--epochs", "2", "--no-plots")
    shutil.copytree(exp / "a", exp / f".a.tmp-{os.getpid()}")  # as a SIGKILL during save leaves it
    res = _cli("runs", exp, "--json")
    assert res.exit_code == 0, res.stderr
    assert [r["run"] for r in res.json()["runs"]] == ["a"]


@pytest.fixture
def own_run(fast_run, tmp_path):
    """A private copy of the FAST run folder (a test that fails must not destroy the shared one)."""
    dst = tmp_path / "run"
    shutil.copytree(fast_run, dst)
    return dst


def test_predict_csv_never_overwrites_the_model_or_a_file_in_a_run(own_run, split_tree_ro, tmp_path):
    img = next(split_tree_ro.rglob("*.png"))
    before = _snapshot(own_run)
    for target in (own_run / "head.pt", own_run / "preds.csv"):
        assert_one_line_error(invoke("predict", own_run, img, "--csv", target), "--csv")
    assert_one_line_error(invoke("predict", own_run, img, "--csv", img), "would overwrite")
    assert _snapshot(own_run) == before
    res = invoke("predict", own_run, img, "--csv", tmp_path / "preds.csv")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "preds.csv").exists()


@pytest.mark.parametrize("name", ["head.pt", "model.pt2"])
def test_export_never_writes_into_the_run_it_reads(own_run, name):
    before = _snapshot(own_run)
    line = assert_one_line_error(invoke("export", own_run, "-o", own_run / name), "export output")
    assert "head.pt" in line or "inside the fit-head run" in line
    assert _snapshot(own_run) == before


def test_export_refuses_the_head_file_given_as_the_model(own_run):
    before = _snapshot(own_run)
    assert_one_line_error(invoke("export", own_run / "head.pt", "-o", own_run / "head.pt"), "would overwrite")
    assert _snapshot(own_run) == before


def test_finetune_output_is_never_an_input_or_a_foreign_folder(own_run, split_tree_ro, tmp_path):
    before = _snapshot(own_run)
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", own_run, "-o", own_run), "would overwrite")
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", own_run, "-o", split_tree_ro / "ft"),
                          "would overwrite")
    assert _snapshot(own_run) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", own_run, "-o", foreign), "not a finetune folder")
    assert (foreign / "notes.txt").read_text() == "keep"


def test_a_run_folder_name_too_long_fails_before_training(tmp_path, monkeypatch):
    from featcache.pipeline.heads import kinds

    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    monkeypatch.setattr(kinds.get("logreg"), "fit", lambda *a: pytest.fail("trained before the name was checked"))
    assert_one_line_error(_cli("fit-head", cache, "-o", tmp_path / ("r" * 250), "--head", "logreg"), "too long")
