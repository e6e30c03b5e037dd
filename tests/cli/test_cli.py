"""The command line contract of issue 2 (and the error contract of issue 3): extract / info / fit-head,
their flags, their --json output, metrics.json and head.pt, and one-line errors for every bad input."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import (
    FAST,
    assert_one_line_error,
    invoke,
    noisy_image,
    run_subprocess,
    save_image,
)

from featcache.cache.store import read_cache


def only_json(res) -> dict:
    """stdout holds exactly one JSON object and nothing else."""
    assert res.exit_code == 0, res.stderr
    text = res.stdout.strip()
    assert text.startswith("{") and text.endswith("}")
    assert len(text.splitlines()) == 1, "one JSON object on one line, nothing else on stdout"
    obj = json.loads(text)
    assert isinstance(obj, dict)
    return obj


# ---- extract ------------------------------------------------------------------------------------

def test_extract_json_summary_and_flags(small_tree_ro, tmp_path):
    out = tmp_path / "c.h5"
    res = invoke("extract", small_tree_ro, "-o", out, "--backbone", "resnet18", "--weights", "none",
                 "--layer", "layer1", "--pool", "max", "--batch-size", "4", "--device", "cpu", "--workers", "0",
                 "--dtype", "float16", "--seed", "3", "--max-skipped", "0.1", "--verify-content", "--json")
    s = only_json(res)
    for key in ("cache", "n_images", "feature_dim", "backbone", "seconds", "extracted", "reused", "removed",
                "skipped"):
        assert key in s, key
    assert s["cache"] == str(out) and s["n_images"] == 15 and s["feature_dim"] == 64
    assert s["backbone"] == "resnet18" and s["weights"] == "random(seed=3)"
    assert (s["extracted"], s["reused"], s["removed"], s["skipped"]) == (15, 0, 0, 0)
    assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0
    c = read_cache(out)
    assert c.features.dtype == np.float16 and c.features.shape == (15, 64)
    assert c.attrs["layer"] == "layer1" and c.attrs["pool"] == "max" and c.attrs["dtype"] == "float16"
    assert all(len(h) == 64 for h in c.file_sha256)  # --verify-content recorded hashes
    assert c.split.tolist().count("val") == 3


def test_extract_human_output(small_tree_ro, tmp_path, device):
    res = invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", *FAST, "--device", device, "--workers", "0")
    assert res.exit_code == 0, res.stderr
    assert "15 images" in res.stdout and "extracted 15" in res.stdout
    assert not res.stdout.lstrip().startswith("{")


def test_extract_resnet18_default_layer_is_512(split_cache):
    c = read_cache(split_cache, features=False)
    assert c.attrs["feature_dim"] == 512 and c.attrs["backbone"] == "resnet18"
    with h5py.File(split_cache, "r") as f:
        assert f["features"].shape == (42, 512)


def test_extract_alexnet_default_and_pool_avg(tmp_path):
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        save_image(root / cls / "x.png", noisy_image((200, 10, 10) if cls == "a" else (10, 10, 200), rng))
    out = tmp_path / "alex.h5"
    s = only_json(invoke("extract", root, "-o", out, "--backbone", "alexnet", "--weights", "none", "--workers", "0",
                         "--json"))
    assert s["feature_dim"] == 9216 and read_cache(out).features.shape == (2, 9216)
    s = only_json(invoke("extract", root, "-o", out, "--backbone", "alexnet", "--weights", "none", "--workers", "0",
                         "--pool", "avg", "--overwrite", "--json"))
    assert s["feature_dim"] == 256 and read_cache(out).features.shape == (2, 256)


def test_extract_weights_path_equals_the_same_random_init(small_tree_ro, tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    a, b = tmp_path / "file.h5", tmp_path / "none.h5"
    sa = only_json(invoke("extract", small_tree_ro, "-o", a, "--weights", path, "--layer", "maxpool", "--pool", "avg",
                          "--workers", "0", "--json"))
    assert sa["weights"].startswith("sha256:")
    only_json(invoke("extract", small_tree_ro, "-o", b, *FAST, "--workers", "0", "--json"))
    np.testing.assert_array_equal(read_cache(a).features, read_cache(b).features)
    assert read_cache(a).fingerprint != read_cache(b).fingerprint  # weights identity differs


def test_extract_device_auto(small_tree_ro, tmp_path):
    s = only_json(invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", *FAST, "--device", "auto", "--workers",
                         "0", "--json"))
    assert s["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")


def test_extract_device_cuda_without_gpu_or_with(small_tree_ro, tmp_path):
    res = invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", *FAST, "--device", "cuda", "--workers", "0",
                 "--json")
    if torch.cuda.is_available():
        assert only_json(res)["device"].startswith("cuda")
    else:
        assert_one_line_error(res, "cuda", "--device cpu")


def test_extract_on_cuda_matches_cpu(cuda_device, small_tree_ro, tmp_path):
    cpu = only_json(invoke("extract", small_tree_ro, "-o", tmp_path / "cpu.h5", *FAST, "--device", "cpu",
                           "--workers", "0", "--json"))
    gpu = only_json(invoke("extract", small_tree_ro, "-o", tmp_path / "gpu.h5", *FAST, "--device", cuda_device,
                           "--workers", "0", "--json"))
    assert gpu["device"].startswith("cuda") and cpu["n_images"] == gpu["n_images"]
    np.testing.assert_allclose(read_cache(tmp_path / "gpu.h5").features, read_cache(tmp_path / "cpu.h5").features,
                               rtol=2e-2, atol=2e-2)


# ---- info ---------------------------------------------------------------------------------------

def test_info_json(split_cache):
    d = only_json(invoke("info", split_cache, "--json"))
    assert d["n_images"] == 42 and d["feature_dim"] == 512
    assert d["classes"] == {c: {"train": 8, "val": 3, "test": 3} for c in ("blue", "green", "red")}
    assert d["splits"] == {"train": 24, "val": 9, "test": 9}
    assert d["skipped"] == []
    a = d["attrs"]
    for key in ("backbone", "weights", "layer", "pool", "preprocess", "dtype", "torch_version", "torchvision_version",
                "schema_version", "created", "fingerprint", "class_names"):
        assert key in a, key


def test_info_human(split_cache):
    res = invoke("info", split_cache)
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "42 x 512" in out and "resnet18" in out
    for cls in ("blue", "green", "red"):
        assert cls in out
    assert "fingerprint" in out and "schema" in out


# ---- fit-head -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_run(split_cache, tmp_path_factory, device):
    run = tmp_path_factory.mktemp("runs") / "linear"
    res = invoke("fit-head", split_cache, "-o", run, "--epochs", "30", "--device", device, "--json")
    return run, only_json(res)


def test_fit_head_json_and_metrics(linear_run, split_cache):
    run, s = linear_run
    m = json.loads((run / "metrics.json").read_text())
    for key in ("val_accuracy", "train_accuracy", "test_accuracy", "best_epoch", "history", "config"):
        assert key in m, key
    assert m["val_accuracy"] >= 0.9 and m["train_accuracy"] >= 0.9 and m["test_accuracy"] >= 0.8
    assert 1 <= m["best_epoch"] <= len(m["history"]) <= 30
    for h in m["history"]:
        assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(h)
    assert m["config"]["head"] == "linear" and m["config"]["epochs"] == 30
    assert m["n_val"] == 9 and m["n_test"] == 9 and m["val_source"] == "cache"
    assert m["cache_fingerprint"] == read_cache(split_cache, features=False).fingerprint
    assert s["val_accuracy"] == m["val_accuracy"] and s["run_dir"] == str(run)


def test_head_pt_is_a_plain_state_dict_with_json_metadata(linear_run, split_cache):
    run, s = linear_run
    obj = torch.load(run / "head.pt", map_location="cpu", weights_only=True)  # no pickled code needed
    state, meta = obj["state_dict"], obj["metadata"]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    json.dumps(meta)  # JSON-serialisable
    cache = read_cache(split_cache)
    assert meta["class_names"] == cache.class_names
    assert meta["cache_fingerprint"] == cache.fingerprint
    assert meta["config"]["head"] == "linear"
    assert len(meta["standardize"]["mean"]) == 512 and len(meta["standardize"]["scale"]) == 512
    # the saved head + stats reproduce the reported validation accuracy from raw cached features
    from featcache.pipeline.heads.headio import StandardizedHead, load_head

    head, meta2 = load_head(run / "head.pt")
    model = StandardizedHead(head, np.asarray(meta["standardize"]["mean"]), np.asarray(meta["standardize"]["scale"]))
    val = cache.split == "val"
    with torch.no_grad():
        pred = model(torch.from_numpy(cache.features[val].astype(np.float32))).argmax(1).numpy()
    assert (pred == cache.labels[val]).mean() == pytest.approx(s["val_accuracy"])
    mean = np.asarray(meta["standardize"]["mean"])
    train = cache.split == "train"
    np.testing.assert_allclose(mean, cache.features[train].mean(0), rtol=1e-4, atol=1e-4)  # train rows only


def test_fit_head_mlp_every_flag(split_cache, tmp_path, device):
    run = tmp_path / "mlp"
    res = invoke("fit-head", split_cache, "-o", run, "--head", "mlp", "--hidden", "16,8", "--dropout", "0.2",
                 "--weight-decay", "1e-3", "--l1", "1e-5", "--batchnorm", "--optimizer", "sgd", "--lr", "0.05",
                 "--momentum", "0.8", "--epochs", "12", "--batch-size", "8", "--patience", "3", "--val-fraction", "0.3",
                 "--no-standardize", "--seed", "2", "--device", device, "--json")
    s = only_json(res)
    p = s["params"]
    assert p["hidden"] == [16, 8] and p["dropout"] == 0.2 and p["batchnorm"] is True
    assert p["optimizer"] == "sgd" and p["lr"] == 0.05 and p["momentum"] == 0.8
    assert p["weight_decay"] == 1e-3 and p["l1"] == 1e-5 and p["seed"] == 2
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["history"]) <= 12 and m["config"]["batch_size"] == 8 and m["config"]["patience"] == 3
    assert m["val_source"] == "cache"  # the cache's own val split wins over --val-fraction
    obj = torch.load(run / "head.pt", weights_only=True)
    assert obj["metadata"]["standardize"] is None
    assert any("running_mean" in k for k in obj["state_dict"])  # batch norm layers
    assert obj["state_dict"]["0.weight"].shape == (16, 512)


def test_fit_head_val_fraction_standardize_and_patience(flat_cache, tmp_path):
    s = only_json(invoke("fit-head", flat_cache, "-o", tmp_path / "r", "--val-fraction", "0.25", "--standardize",
                         "--epochs", "7", "--patience", "0", "--json"))
    assert s["n_val"] == int(round(0.25 * 18)) and s["n_train"] == 18 - s["n_val"]
    assert "held out" in s["val_source"]
    assert s["epochs_run"] == 7 and s["best_epoch"] == 7  # --patience 0: no early stopping
    assert "test_accuracy" not in s
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "test_accuracy" not in m  # no test split in a flat folder


def test_fit_head_sweep(split_cache, tmp_path):
    s = only_json(invoke("fit-head", split_cache, "-o", tmp_path / "sweep", "--head", "mlp", "--hidden", "8",
                         "--hidden", "16", "--lr", "0.01,0.05", "--dropout", "0", "--epochs", "5", "--json"))
    assert s["n_configs"] == 4 and len(s["leaderboard"]) == 4
    best = s["leaderboard"][0]
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in s["leaderboard"])
    assert s["val_accuracy"] == best["val_accuracy"]


def test_fit_head_is_reproducible(split_cache, tmp_path):
    args = ["--head", "mlp", "--hidden", "8", "--epochs", "6", "--seed", "5", "--json"]
    a = only_json(invoke("fit-head", split_cache, "-o", tmp_path / "a", *args))
    b = only_json(invoke("fit-head", split_cache, "-o", tmp_path / "b", *args))
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["history"] == mb["history"] and a["val_loss"] == b["val_loss"]


def test_fit_head_human_output(split_cache, tmp_path):
    res = invoke("fit-head", split_cache, "-o", tmp_path / "h", "--epochs", "3")
    assert res.exit_code == 0, res.stderr
    assert "val accuracy" in res.stdout and "head.pt" in res.stdout


# ---- errors: one line on stderr, non-zero exit, no traceback ------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    (base / "empty").mkdir()
    (base / "noimages" / "cls").mkdir(parents=True)
    (base / "noimages" / "cls" / "readme.txt").write_text("x")
    (base / "text.h5").write_text("not a cache")
    with h5py.File(base / "foreign.h5", "w") as f:
        f["data"] = np.arange(3)
    (base / "a_file").write_text("x")
    rng = np.random.default_rng(0)
    for i in range(3):
        save_image(base / "one" / "only" / f"{i}.png", noisy_image((10, 200, 10), rng))
    for i in range(4):
        save_image(base / "unlabeled" / f"{i}.png", noisy_image((10 * i, 200, 10), rng))
    return base


EXTRACT_ERRORS = {
    "missing folder": (["extract", "{base}/nope", "-o", "{tmp}/c.h5"], ["not found"]),
    "empty folder": (["extract", "{base}/empty", "-o", "{tmp}/c.h5"], ["no images"]),
    "folder with no images": (["extract", "{base}/noimages", "-o", "{tmp}/c.h5"], ["no images"]),
    "file instead of folder": (["extract", "{base}/a_file", "-o", "{tmp}/c.h5"], ["not a folder"]),
    "unknown backbone": (["extract", "{small}", "-o", "{tmp}/c.h5", "--backbone", "resnet9000"], ["unknown backbone"]),
    "unknown weights": (["extract", "{small}", "-o", "{tmp}/c.h5", "--weights", "IMAGENET_V42"], ["unknown weights"]),
    "weights file missing": (["extract", "{small}", "-o", "{tmp}/c.h5", "--weights", "{tmp}/w.pt"], ["not found"]),
    "unknown layer": (["extract", "{small}", "-o", "{tmp}/c.h5", "--weights", "none", "--layer", "nope"],
                      ["unknown layer"]),
    "unknown pool": (["extract", "{small}", "-o", "{tmp}/c.h5", "--pool", "median"], ["--pool"]),
    "unknown dtype": (["extract", "{small}", "-o", "{tmp}/c.h5", "--dtype", "float64"], ["--dtype"]),
    "unknown device": (["extract", "{small}", "-o", "{tmp}/c.h5", "--device", "tpu"], ["device"]),
    "bad batch size": (["extract", "{small}", "-o", "{tmp}/c.h5", "--batch-size", "0"], ["--batch-size"]),
    "non-integer batch size": (["extract", "{small}", "-o", "{tmp}/c.h5", "--batch-size", "x"], ["--batch-size"]),
    "bad workers": (["extract", "{small}", "-o", "{tmp}/c.h5", "--workers", "-1"], ["--workers"]),
    "bad max-skipped": (["extract", "{small}", "-o", "{tmp}/c.h5", "--max-skipped", "2"], ["--max-skipped"]),
    "missing -o": (["extract", "{small}"], ["-o"]),
    "output folder missing": (["extract", "{small}", "-o", "{tmp}/no/such/dir/c.h5"], ["does not exist"]),
    "unknown option": (["extract", "{small}", "-o", "{tmp}/c.h5", "--frobnicate"], ["--frobnicate"]),
    "unknown command": (["frobnicate"], ["frobnicate"]),
}

READ_ERRORS = {
    "info missing cache": (["info", "{tmp}/none.h5"], ["not found"]),
    "info not HDF5": (["info", "{base}/text.h5"], ["not an HDF5 file"]),
    "info foreign HDF5": (["info", "{base}/foreign.h5"], ["not a featcache cache"]),
    "info folder": (["info", "{base}/empty"], ["folder"]),
    "fit-head missing cache": (["fit-head", "{tmp}/none.h5", "-o", "{tmp}/run"], ["not found"]),
    "fit-head not HDF5": (["fit-head", "{base}/text.h5", "-o", "{tmp}/run"], ["not an HDF5 file"]),
    "fit-head foreign HDF5": (["fit-head", "{base}/foreign.h5", "-o", "{tmp}/run"], ["not a featcache cache"]),
    "fit-head unknown head": (["fit-head", "{cache}", "-o", "{tmp}/run", "--head", "svm"], ["--head"]),
    "fit-head unknown optimizer": (["fit-head", "{cache}", "-o", "{tmp}/run", "--optimizer", "rmsprop"],
                                   ["unknown optimizer"]),
    "fit-head bad lr": (["fit-head", "{cache}", "-o", "{tmp}/run", "--lr", "abc"], ["--lr"]),
    "fit-head negative lr": (["fit-head", "{cache}", "-o", "{tmp}/run", "--lr", "-1"], ["--lr"]),
    "fit-head bad hidden": (["fit-head", "{cache}", "-o", "{tmp}/run", "--hidden", "x"], ["--hidden"]),
    "fit-head bad dropout": (["fit-head", "{cache}", "-o", "{tmp}/run", "--dropout", "1.5"], ["--dropout"]),
    "fit-head bad momentum": (["fit-head", "{cache}", "-o", "{tmp}/run", "--momentum", "2"], ["--momentum"]),
    "fit-head bad epochs": (["fit-head", "{cache}", "-o", "{tmp}/run", "--epochs", "0"], ["--epochs"]),
    "fit-head bad val-fraction": (["fit-head", "{flat}", "-o", "{tmp}/run", "--val-fraction", "1.5"],
                                  ["--val-fraction"]),
    "fit-head run dir is a file": (["fit-head", "{cache}", "-o", "{base}/a_file"], ["not a folder"]),
    "fit-head missing -o": (["fit-head", "{cache}"], ["-o"]),
}


def _fill(args, **kw):
    return [a.format(**kw) for a in args]


@pytest.mark.parametrize("case", list(EXTRACT_ERRORS))
def test_extract_errors_are_one_line(case, bad_inputs, small_tree_ro, tmp_path):
    args, words = EXTRACT_ERRORS[case]
    res = invoke(*_fill(args, base=bad_inputs, tmp=tmp_path, small=small_tree_ro))
    assert_one_line_error(res, *words)
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("case", list(READ_ERRORS))
def test_read_errors_are_one_line(case, bad_inputs, split_cache, flat_cache, tmp_path):
    args, words = READ_ERRORS[case]
    res = invoke(*_fill(args, base=bad_inputs, tmp=tmp_path, cache=split_cache, flat=flat_cache))
    assert_one_line_error(res, *words)
    assert not (tmp_path / "run" / "head.pt").exists()


def test_fit_head_single_class_is_one_line(bad_inputs, tmp_path):
    out = tmp_path / "one.h5"
    only_json(invoke("extract", bad_inputs / "one", "-o", out, *FAST, "--workers", "0", "--json"))
    res = invoke("fit-head", out, "-o", tmp_path / "run")
    assert_one_line_error(res, "at least two classes")
    assert not (tmp_path / "run" / "head.pt").exists()


def test_fit_head_unlabeled_cache_is_a_clear_one_line_error(bad_inputs, tmp_path):
    out = tmp_path / "unl.h5"
    only_json(invoke("extract", bad_inputs / "unlabeled", "-o", out, *FAST, "--workers", "0", "--json"))
    res = invoke("fit-head", out, "-o", tmp_path / "run")
    line = assert_one_line_error(res)
    assert "internal error" not in line and "class" in line


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("extract", "info", "fit-head"):
        assert cmd in res.stdout
    for cmd in ("extract", "info", "fit-head"):
        sub = invoke(cmd, "--help")
        assert sub.exit_code == 0 and "--json" in sub.stdout


EXTRACT_CONTRACT_FLAGS = ["--backbone", "--weights", "--layer", "--pool", "--batch-size", "--device", "--workers",
                          "--dtype", "--json", "--overwrite", "--verify-content", "--max-skipped", "-o"]
FIT_CONTRACT_FLAGS = ["--head", "--hidden", "--dropout", "--weight-decay", "--l1", "--batchnorm", "--optimizer", "--lr",
                      "--momentum", "--epochs", "--batch-size", "--patience", "--val-fraction", "--standardize",
                      "--no-standardize", "--seed", "--device", "--json", "-o"]


def test_contract_flags_exist():
    ext = invoke("extract", "--help").stdout
    for flag in EXTRACT_CONTRACT_FLAGS:
        assert flag in ext, flag
    fit = invoke("fit-head", "--help").stdout
    for flag in FIT_CONTRACT_FLAGS:
        assert flag in fit, flag
    assert "--json" in invoke("info", "--help").stdout


# ---- the real process: exit codes and stderr as a shell sees them ---------------------------------

def test_real_process_error_exit_code_and_stderr(tmp_path):
    res = run_subprocess("extract", tmp_path / "missing", "-o", tmp_path / "c.h5")
    assert res.exit_code == 1
    assert_one_line_error(res, "not found")
    assert res.stderr.startswith("featcache: error:")


def test_real_process_json_on_stdout(split_cache, tmp_path):
    res = run_subprocess("info", split_cache, "--json")
    d = only_json(res)
    assert d["n_images"] == 42
    bad = run_subprocess("info", tmp_path / "x.h5")
    assert bad.exit_code != 0
    assert_one_line_error(bad, "not found")
