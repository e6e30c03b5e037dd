"""finetune: starts from the fit-head solution, trains on CPU, saves a loadable model + metrics."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, invoke


def test_finetune_trains_saves_and_predicts(fast_run, split_tree_ro, tmp_path):
    ft = tmp_path / "ft"
    res = invoke("finetune", split_tree_ro, "--from", fast_run, "-o", ft, "--epochs", "2", "--batch-size", "8",
                 "--unfreeze", "1", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    m = json.loads((ft / "metrics.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "best_epoch", "history", "config",
                "frozen_head_val_accuracy"):
        assert key in m, key
    assert m["trainable_blocks"] == 1 and 0 <= m["best_epoch"] <= 2 and len(m["history"]) >= 1
    assert m["decode_workers"] == 0 and m["precision"] == "fp32"  # CPU default: decoding takes turns with compute
    if m["best_epoch"]:  # scored where and how it trained: the val score is the best epoch's own
        assert m["val_accuracy"] == pytest.approx(m["history"][m["best_epoch"] - 1]["val_accuracy"])
    # epoch 0 competes, so fine-tuning never ends worse on val loss than the frozen-feature head
    assert m["val_accuracy"] >= m["frozen_head_val_accuracy"] - 1e-9 or m["best_epoch"] > 0
    state = torch.load(ft / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    pred = invoke("predict", ft, split_tree_ro / "val", "--json", "--device", "cpu")
    assert pred.exit_code == 0, pred.stderr
    assert len(pred.json()["predictions"]) == 9


def test_unfreeze_selects_last_blocks_and_decay_split(fast_run):
    from featcache.pipeline.use.finetune import FinetuneConfig, blocks, param_groups, set_trainable
    from featcache.pipeline.use.model import load_run

    model = load_run(fast_run).model
    all_blocks = blocks(model.backbone)
    chosen = set_trainable(model, "2")
    assert chosen == all_blocks[-2:]
    trainable = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert trainable == {id(p) for b in chosen for p in b.parameters()}
    groups = param_groups(model, FinetuneConfig("x", "y", "z", weight_decay=0.01))
    for g in groups:  # biases and norm parameters (1-d) never get weight decay
        assert (g["weight_decay"] > 0) == all(p.ndim >= 2 for p in g["params"])
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-5, 1e-4])  # backbone lr = head lr x 0.1


def test_finetune_errors(fast_run, split_tree_ro, flat_tree_ro, tmp_path):
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", fast_run, "-o", tmp_path / "x",
                                 "--unfreeze", "lots"), "unfreeze")
    assert_one_line_error(invoke("finetune", tmp_path / "nope", "--from", fast_run, "-o", tmp_path / "x"), "not found")
    # flat_tree_ro has the same class names; a tree with other classes must be refused
    other = tmp_path / "other" / "cats"
    other.mkdir(parents=True)
    import shutil

    for f in list((flat_tree_ro / "red").iterdir())[:2]:
        shutil.copy(f, other / f.name)
    shutil.copytree(flat_tree_ro / "blue", tmp_path / "other" / "dogs")
    assert_one_line_error(invoke("finetune", tmp_path / "other", "--from", fast_run, "-o", tmp_path / "x"), "classes")


def test_finetune_holds_out_the_same_val_images_as_fit_head(flat_tree_ro, flat_cache):
    """A folder without val/: finetune's validation images are fit-head's held-out rows."""
    from featcache.cache.store import read_cache
    from featcache.pipeline.extraction.discover import discover
    from featcache.pipeline.heads.data import make_splits
    from featcache.pipeline.use.finetune import _splits

    cache = read_cache(flat_cache, features=False)
    rows, source = make_splits(cache, 0.25, 0)  # 4.5 of 18 rows: sklearn alone would hold out 5
    disc = discover(flat_tree_ro)
    idx = _splits(disc, cache.class_names, 0.25, 0)
    assert source.startswith("held out") and len(rows["val"]) > 0
    for split in ("train", "val"):
        assert [disc.records[i].path for i in idx[split]] == [cache.paths[r] for r in rows[split]]


def test_save_finetuned_writes_each_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """A save that dies mid-write leaves neither a torn model.pt nor a temporary file behind."""
    import torch
    from torch import nn

    from featcache.pipeline.use import model as model_mod

    def torn_save(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("killed mid-write")

    monkeypatch.setattr(model_mod.torch, "save", torn_save)
    with pytest.raises(OSError):
        model_mod.save_finetuned(tmp_path / "ft", nn.Linear(2, 2), {"x": 1})
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == []
    monkeypatch.undo()
    model_mod.save_finetuned(tmp_path / "ft", nn.Linear(2, 2), {"x": 1})
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == sorted([model_mod.FT_WEIGHTS, model_mod.FT_META])
    assert set(torch.load(tmp_path / "ft" / model_mod.FT_WEIGHTS, weights_only=True)) == {"weight", "bias"}


def test_decode_workers_default_feeds_a_gpu_from_worker_processes(monkeypatch):
    from featcache.pipeline import device as device_mod
    from featcache.pipeline.use.finetune import decode_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cores, want in ((16, 15), (3, 2), (2, 1), (1, 1)):
        monkeypatch.setattr(device_mod, "usable_cores", lambda c=cores: c)
        assert decode_workers(cuda, None) == want, cores  # the main process only feeds the GPU
        assert decode_workers(cpu, None) == 0  # training threads already hold every core
    assert decode_workers(cuda, 0) == 0 and decode_workers(cpu, 3) == 3  # --workers is obeyed


def test_loaders_pin_memory_and_keep_workers_for_the_gpu(fast_run, split_tree_ro):
    from featcache.pipeline.extraction.discover import discover
    from featcache.pipeline.extraction.preprocess import imagenet_default
    from featcache.pipeline.use.finetune import FinetuneConfig, TransformedFiles, _loader

    disc = discover(split_tree_ro)
    spec = imagenet_default("test")
    ds = TransformedFiles(disc.root, [r.path for r in disc.records], spec, spec.transform())
    labels = torch.tensor([r.label for r in disc.records])
    cfg = FinetuneConfig("x", "y", "z", batch_size=4)
    dl = _loader(ds, [0, 1, 2], labels, cfg, False, workers=1, pin=True, persistent=True)
    assert dl.num_workers == 1 and dl.pin_memory and dl.persistent_workers
    dl = _loader(ds, [0, 1, 2], labels, cfg, False, workers=0, pin=False, persistent=True)
    assert dl.num_workers == 0 and not dl.pin_memory and not dl.persistent_workers  # nothing to keep
    x, y = next(iter(dl))
    assert x.shape == (3, 3, spec.crop_size, spec.crop_size) and y.tolist() == labels[:3].tolist()


def test_finetune_negative_workers_is_one_line_error(fast_run, split_tree_ro, tmp_path):
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", fast_run, "-o", tmp_path / "x",
                                 "--workers", "-1"), "--workers")
