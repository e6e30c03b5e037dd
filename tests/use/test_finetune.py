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
    groups = param_groups(model, FinetuneConfig("x", "y", "z", weight_decay=0.01, lr=1e-3, backbone_lr_mult=0.1))
    for g in groups:  # biases and norm parameters (1-d) never get weight decay
        assert (g["weight_decay"] > 0) == all(p.ndim >= 2 for p in g["params"])
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-4, 1e-3])  # backbone lr = head lr x 0.1


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


# ---- the small-data recipe: schedule, augmentation, epoch selection, resolution, blocks that run ----

def test_lr_warms_up_then_decays_to_zero_on_a_cosine():
    from featcache.pipeline.use.finetune import lr_factor, schedule

    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total + 1)]
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup + 1]))  # rising through the warm-up
    assert 0 < f[0] <= 0.1 and f[warmup] == pytest.approx(1.0)  # starts near 0, peaks after it
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # then never rising
    assert f[(warmup + total) // 2] == pytest.approx(0.5) and f[total] == pytest.approx(0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = schedule(opt, epochs=4, steps_per_epoch=5)  # 20 steps, 2 of warm-up (FT_WARMUP 0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3) and lrs[-1] < 1e-4


@pytest.mark.parametrize("augment", ["none", "mild", "strong"])
def test_train_transform_strengths(augment):
    from PIL import Image

    from featcache.pipeline.config import FT_AUGMENT
    from featcache.pipeline.extraction.preprocess import imagenet_default
    from featcache.pipeline.use.finetune import finetune_spec, train_transform

    spec = finetune_spec(imagenet_default("test"), 32)
    assert (spec.resize_size, spec.crop_size) == (32, 32)  # the image's own side: no crop margin
    t = train_transform(spec, augment)
    img = Image.new("RGB", (48, 40), (200, 30, 30))
    assert t(img).shape == (3, 32, 32)
    crops = [s for s in t.transforms if type(s).__name__ == "RandomResizedCrop"]
    if augment == "none":  # the eval preprocessing exactly
        assert not crops and torch.equal(t(img), spec.transform()(img))
    else:
        assert [c.scale for c in crops] == [FT_AUGMENT[augment]]
    assert FT_AUGMENT["mild"][0] > FT_AUGMENT["strong"][0]  # mild keeps more of a centred subject


def test_finetune_spec_keeps_the_runs_preprocessing_by_default():
    from featcache.pipeline.extraction.preprocess import imagenet_default
    from featcache.pipeline.use.finetune import finetune_spec

    spec = imagenet_default("test")
    assert finetune_spec(spec, None) is spec
    assert finetune_spec(spec, 96).to_dict() | {"source": ""} == {**spec.to_dict(), "resize_size": 96,
                                                                   "crop_size": 96, "source": ""}


def test_epochs_are_kept_by_val_accuracy_then_loss():
    from featcache.pipeline.use.finetune import _better

    assert _better({"accuracy": 0.8, "loss": 2.0}, {"accuracy": 0.7, "loss": 0.5})  # accuracy first
    assert _better({"accuracy": 0.7, "loss": 0.4}, {"accuracy": 0.7, "loss": 0.5})  # a tie: lower loss
    assert not _better({"accuracy": 0.7, "loss": 0.5}, {"accuracy": 0.7, "loss": 0.5})  # equal is no gain


class _Unused(torch.nn.Module):
    """A backbone like timm's with pre_logits: ``classifier`` has parameters but never runs."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3)
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4))
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Linear(4, 1000)

    def forward(self, x):
        return self.pool(self.stage(self.stem(x))).flatten(1)


def _classifier(backbone, width=4):
    from featcache.pipeline.use.model import Classifier

    return Classifier(backbone, torch.nn.Linear(width, 3)).eval()


def test_unfreeze_counts_only_blocks_the_forward_pass_runs():
    from featcache.pipeline.use.finetune import blocks, set_trainable

    model = _classifier(_Unused())
    bb = model.backbone
    assert blocks(bb) == [bb.stem, bb.stage[0], bb.stage[1], bb.classifier]  # by structure alone
    chosen = set_trainable(model, "1", 16)
    assert chosen == [bb.stage[1]]  # the last block that runs, not the classifier after it
    assert not any(p.requires_grad for p in bb.classifier.parameters())
    assert len(set_trainable(model, "all", 16)) == 3
    assert model.training is False  # the probe pass leaves the mode as it found it


def test_image_size_the_backbone_cannot_take_is_a_one_line_error():
    from featcache.pipeline.errors import FeatcacheError
    from featcache.pipeline.use.finetune import set_trainable

    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())  # width depends on the side
    model = _classifier(flat, width=2 * 14 * 14)
    assert set_trainable(model, "all", 16)
    with pytest.raises(FeatcacheError, match=r"^--image-size 20: the backbone and head do not take 20-px images"):
        set_trainable(model, "all", 20)


def _ft(fast_run, split_tree_ro, out, **kw):
    from featcache.pipeline.use.finetune import FinetuneConfig, run_finetune

    run_finetune(FinetuneConfig(str(split_tree_ro), str(fast_run), str(out), batch_size=8, device="cpu", **kw),
                 progress=False)
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "model.json").read_text())


def test_image_size_trains_at_that_side_and_predict_uses_it(fast_run, split_tree_ro, tmp_path, monkeypatch):
    from featcache.pipeline.use import finetune as ft

    monkeypatch.setattr(ft, "_better", lambda v, best: True)  # every epoch improves: the last is kept
    m, meta = _ft(fast_run, split_tree_ro, tmp_path / "ft", epochs=2, unfreeze="1", image_size=32, augment="none")
    assert m["best_epoch"] == 2 and m["image_size"] == 32
    assert (meta["preprocess"]["resize_size"], meta["preprocess"]["crop_size"]) == (32, 32)
    assert m["val_accuracy"] == m["history"][-1]["val_accuracy"]  # the kept epoch's own score, not rescored
    pred = invoke("predict", tmp_path / "ft", split_tree_ro / "val", "--json", "--device", "cpu")
    assert pred.exit_code == 0, pred.stderr


def test_epoch_0_keeps_the_runs_own_preprocessing_and_patience_stops(fast_run, split_tree_ro, tmp_path, monkeypatch):
    from featcache.pipeline.extraction.preprocess import PreprocessSpec
    from featcache.pipeline.use import finetune as ft
    from featcache.pipeline.use.model import load_run

    monkeypatch.setattr(ft, "_better", lambda v, best: False)  # no epoch beats the frozen head
    m, meta = _ft(fast_run, split_tree_ro, tmp_path / "ft", epochs=5, patience=2, image_size=32)
    own = load_run(fast_run).preprocess
    assert m["best_epoch"] == 0 and m["epochs_run"] == 2  # stopped after 2 epochs without a better val score
    assert PreprocessSpec.from_dict(meta["preprocess"]) == own and m["image_size"] == own.crop_size
    assert m["val_accuracy"] == m["frozen_head_val_accuracy"]


def test_finetune_option_errors_name_the_option(fast_run, split_tree_ro, tmp_path):
    from featcache.pipeline.errors import FeatcacheError
    from featcache.pipeline.use.finetune import FinetuneConfig, run_finetune

    for kw, words in ((dict(augment="heavy"), "--augment must be one of none, mild, strong"),
                      (dict(image_size=0), "--image-size must be")):
        with pytest.raises(FeatcacheError, match=words):
            run_finetune(FinetuneConfig(str(split_tree_ro), str(fast_run), str(tmp_path / "x"), **kw))
    assert_one_line_error(invoke("finetune", split_tree_ro, "--from", fast_run, "-o", tmp_path / "x",
                                 "--augment", "heavy"), "--augment")


def test_every_finetune_cli_default_is_the_config_default():
    """Each default is declared once, in FinetuneConfig; every field is a finetune option."""
    import dataclasses

    import click

    from featcache import cli
    from featcache.pipeline.config import FinetuneConfig

    cmd = cli.main.commands["finetune"]
    ctx = click.Context(cmd)
    params = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(FinetuneConfig):
        assert f.name in params, f.name
        if f.default is not dataclasses.MISSING:
            assert params[f.name].get_default(ctx) == f.default, f.name
