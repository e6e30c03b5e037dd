"""``featcache runs``: one table over past runs on several caches; JSON output; odd folders."""
from __future__ import annotations

import json

import pytest
from synthcache import fit, run_cli, write_cache


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """Three runs over two caches from different 'backbones', nested at different depths."""
    root = tmp_path_factory.mktemp("experiments")
    a = write_cache(root / "a.h5", dim=16, backbone="resnet18", sep=0.8)
    b = write_cache(root / "b.h5", dim=24, classes=4, backbone="efficientnet_lite0", seed=1)
    runs = {
        "resnet/linear": fit(a, root / "resnet" / "linear", "--epochs", "5", "--no-plots"),
        "resnet/mlp-sweep": fit(a, root / "resnet" / "mlp-sweep", "--head", "mlp", "--hidden", "8,16",
                                "--hidden", "8", "--lr", "1e-3,1e-2", "--epochs", "5", "--no-plots"),
        "effnet": fit(b, root / "effnet", "--head", "logreg", "--C", "0.1,1", "--refit", "--no-plots"),
    }
    return root, runs


def test_runs_json_lists_every_run_with_backbone_head_and_scores(experiments):
    root, runs = experiments
    code, out, err = run_cli("runs", root, "--json")
    assert code == 0, err
    data = json.loads(out)
    by_run = {r["run"]: r for r in data["runs"]}
    assert set(by_run) == set(runs) and data["skipped"] == []
    assert by_run["resnet/linear"]["backbone"] == "resnet18" and by_run["resnet/linear"]["feature_dim"] == 16
    assert by_run["effnet"]["backbone"] == "efficientnet_lite0" and by_run["effnet"]["feature_dim"] == 24
    assert [by_run[r]["head"] for r in ("resnet/linear", "resnet/mlp-sweep", "effnet")] == ["linear", "mlp", "logreg"]
    assert by_run["resnet/mlp-sweep"]["n_configs"] == 4 and by_run["effnet"]["refit"] is True
    for name, s in runs.items():
        for k in ("val_accuracy", "train_accuracy", "test_accuracy"):
            assert by_run[name][k] == s[k]
        assert by_run[name]["cache"] == s["cache"]
    vals = [r["val_accuracy"] for r in data["runs"]]
    assert vals == sorted(vals, reverse=True)  # default: best validation accuracy first


def test_runs_table_for_people(experiments):
    root, runs = experiments
    code, out, err = run_cli("runs", root, "--sort", "run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["run", "backbone", "dim", "cache", "head"]
    assert [ln.split()[0] for ln in lines[1:4]] == sorted(runs)  # --sort run: by folder
    assert "logreg +refit" in out and "efficientnet_lite0" in out and "b.h5" in out
    assert lines[-1].startswith("3 run(s) under")


def test_files_that_are_not_runs_are_skipped_with_a_reason(experiments, tmp_path):
    root, _ = experiments
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps({"loss": 0.1}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    good = json.loads((root / "resnet" / "linear" / "metrics.json").read_text())
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "metrics.json").write_text(json.dumps(good))
    code, out, err = run_cli("runs", tmp_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [r["run"] for r in data["runs"]] == ["good"]
    reasons = {s["path"].split("/")[-2]: s["reason"] for s in data["skipped"]}
    assert reasons == {"other": "not a fit-head metrics.json", "broken": "unreadable (JSONDecodeError)"}
    code, out, _ = run_cli("runs", tmp_path)
    assert code == 0 and "skipped" in out and "broken" in out


def test_empty_folder_says_so(tmp_path):
    code, out, err = run_cli("runs", tmp_path)
    assert code == 0 and out.strip() == f"no fit-head runs (metrics.json) under {tmp_path}"
    code, out, _ = run_cli("runs", tmp_path, "--json")
    assert code == 0 and json.loads(out)["runs"] == []


@pytest.mark.parametrize("target,words", [("missing", "not found"), ("file.txt", "not a folder")])
def test_bad_experiments_dir_is_a_one_line_error(tmp_path, target, words):
    (tmp_path / "file.txt").write_text("x")
    code, out, err = run_cli("runs", tmp_path / target)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and out == "" and len(lines) == 1 and words in lines[0] and "Traceback" not in err
