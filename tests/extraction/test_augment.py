"""Augmented views: the seeded recipe (pipeline/augment.py), ``extract --augment`` (views stored aligned
with the originals, incremental and crash-safe) and ``fit-head --use-augmented``."""
from __future__ import annotations

import json
import signal

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST, assert_one_line_error, invoke, run_subprocess
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from featcache.cache.store import read_cache, read_views
from featcache.pipeline.extraction.augment import AugmentRecipe, crop_params, make_view, view_rng
from featcache.pipeline.extraction.backbones import build_backbone
from featcache.pipeline.extraction.images import load_rgb
from featcache.pipeline.heads.train import HeadParams, TrainData, TrainSettings, train_group

ARGS = [*FAST, "--device", "cpu", "--workers", "0"]


def extract(root, out, *extra) -> dict:
    res = invoke("extract", root, "-o", out, *ARGS, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def views_of(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["views"][...]


# ---- the recipe ----------------------------------------------------------------------------------

def test_crop_params_are_seeded_in_bounds_and_within_the_scale_range():
    for v in range(50):
        a = crop_params(view_rng(0, "train/x/a.png", v), 120, 80, (0.3, 0.6), (3 / 4, 4 / 3))
        assert a == crop_params(view_rng(0, "train/x/a.png", v), 120, 80, (0.3, 0.6), (3 / 4, 4 / 3))
        top, left, h, w = a
        assert 0 <= top <= 80 - h and 0 <= left <= 120 - w
        assert 0.3 * 0.9 <= h * w / (120 * 80) <= 0.6 * 1.1  # rounding of w, h
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    draws = {crop_params(view_rng(s, p, v), 120, 80, (0.08, 1), (3 / 4, 4 / 3))
             for s in (0, 1) for p in ("a", "b") for v in range(3)}
    assert len(draws) == 12  # seed, path and view index each change the stream


def test_crop_params_fall_back_to_a_central_crop_like_torchvision():
    # a 400 x 10 strip cannot hold a 0.9-1.0 area crop of ratio <= 4/3: torchvision's fallback
    assert crop_params(view_rng(0, "p", 0), 400, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, (400 - 13) // 2, 10, 13)


def test_make_view_is_the_requested_size_and_deterministic():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    r = AugmentRecipe(views=2, seed=3, rotate=15)
    a, b = make_view(img, r, "p.png", 0, 32, "bilinear"), make_view(img, r, "p.png", 0, 32, "bilinear")
    assert a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(make_view(img, r, "p.png", 1, 32, "bilinear")))


def test_make_view_applies_crop_then_flip_with_torchvision_ops():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    whole = AugmentRecipe(views=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)  # whole image, always flipped
    got = make_view(img, whole, "p", 0, 24, "bicubic")
    want = TF.horizontal_flip(TF.resized_crop(img, 0, 0, 40, 40, [24, 24], interpolation=TF.InterpolationMode.BICUBIC,
                                              antialias=True))
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("flags,words", [
    (["--augment", "-1"], ["--augment"]),
    (["--augment", "2", "--augment-scale", "0", "1"], ["--augment-scale"]),
    (["--augment", "2", "--augment-scale", "0.9", "0.5"], ["--augment-scale"]),
    (["--augment", "2", "--augment-flip", "1.5"], ["--augment-flip"]),
    (["--augment", "2", "--augment-rotate", "-5"], ["--augment-rotate"]),
    (["--augment-flip", "5"], ["--augment-flip"]),  # checked even without --augment: a typo must not pass
])
def test_bad_recipe_is_a_one_line_error_before_any_work(small_tree_ro, tmp_path, flags, words):
    res = invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", *ARGS, *flags)
    assert_one_line_error(res, *words)
    assert not (tmp_path / "c.h5").exists()


# ---- extract --augment ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aug_cache(small_tree_ro, tmp_path_factory):
    """15 images (9 train), 2 views each, reference fp32 eager backbone; and the same without views."""
    d = tmp_path_factory.mktemp("aug")
    s = extract(small_tree_ro, d / "aug.h5", "--augment", "2", "--no-optimize", "--batch-size", "7")
    extract(small_tree_ro, d / "plain.h5", "--no-optimize", "--batch-size", "7")
    return d / "aug.h5", d / "plain.h5", s


def test_views_are_stored_aligned_for_train_rows_only(aug_cache):
    aug, plain, summary = aug_cache
    c = read_cache(aug)
    v = views_of(aug)
    assert v.shape == (c.n_rows, 2, c.features.shape[1]) and c.n_views == 2
    train = c.split == "train"
    assert np.isfinite(v[train]).all()
    assert np.isnan(v[~train]).all()  # never written: read back as the fill value
    assert summary["views"] == {"per_image": 2, "images": int(train.sum()),
                                "augment_fingerprint": c.attrs["augment_fingerprint"]}
    assert c.attrs["augment"]["views"] == 2 and c.attrs["augment"]["scale"] == [0.08, 1.0]
    assert not np.allclose(v[train][:, 0], v[train][:, 1])  # two different views
    assert not np.allclose(v[train][:, 0], c.features[train])  # not the un-augmented image


def test_originals_and_fingerprint_are_those_of_a_plain_extract(aug_cache):
    aug, plain, _ = aug_cache
    a, p = read_cache(aug), read_cache(plain)
    assert a.fingerprint == p.fingerprint  # heads trained on either fit both
    np.testing.assert_allclose(a.features, p.features, rtol=1e-5, atol=1e-6)
    assert p.n_views == 0 and p.attrs["augment_fingerprint"] == ""
    with h5py.File(plain, "r") as f:
        assert "views" not in f


def test_view_features_equal_the_backbone_on_the_seeded_views(aug_cache, small_tree_ro):
    aug, _, _ = aug_cache
    c = read_cache(aug)
    bb = build_backbone("resnet18", "none", "maxpool", "avg", seed=0)
    spec, model = bb.preprocess, bb.model.eval()
    recipe = AugmentRecipe(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in c.attrs["augment"].items()
                              if k not in ("version", "order")})
    rows = np.flatnonzero(c.split == "train")[[0, -1]]
    for r in rows:
        img = load_rgb(str(small_tree_ro / c.paths[r]), draft_min_side=2 * spec.resize_size)
        pix = [TF.to_dtype(TF.pil_to_tensor(make_view(img, recipe, c.paths[r], v, spec.crop_size, spec.interpolation)),
                           torch.float32, scale=True) for v in range(2)]
        x = TF.normalize(torch.stack(pix), list(spec.mean), list(spec.std))
        with torch.inference_mode():
            want = model(x).numpy()
        np.testing.assert_allclose(views_of(aug)[r], want, rtol=1e-4, atol=1e-5)


def test_views_do_not_depend_on_batch_size(aug_cache, small_tree_ro, tmp_path):
    aug, _, _ = aug_cache
    extract(small_tree_ro, tmp_path / "b2.h5", "--augment", "2", "--no-optimize", "--batch-size", "2")
    np.testing.assert_allclose(views_of(tmp_path / "b2.h5"), views_of(aug), rtol=1e-5, atol=1e-6)


def test_augment_fingerprint_covers_the_recipe(aug_cache, small_tree_ro, tmp_path):
    aug, _, _ = aug_cache
    extract(small_tree_ro, tmp_path / "s.h5", "--augment", "2", "--augment-scale", "0.5", "1", "--no-optimize")
    a, b = read_cache(aug), read_cache(tmp_path / "s.h5")
    assert a.fingerprint == b.fingerprint
    assert a.attrs["augment_fingerprint"] != b.attrs["augment_fingerprint"]
    assert b.attrs["augment"]["scale"] == [0.5, 1.0]


def test_incremental_runs_reuse_views_and_recompute_only_what_changed(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    first = extract(small_tree, out, "--augment", "2")
    v0, c0 = views_of(out), read_cache(out)
    again = extract(small_tree, out, "--augment", "2")
    assert (again["extracted"], again["reused"]) == (0, first["n_images"])
    np.testing.assert_array_equal(views_of(out), v0)  # copied from the previous cache

    touched = next(p for p in c0.paths if p.startswith("train/"))
    (small_tree / touched).touch()
    s = extract(small_tree, out, "--augment", "2")
    assert (s["extracted"], s["reused"]) == (1, first["n_images"] - 1)
    np.testing.assert_allclose(views_of(out), v0, rtol=1e-5, atol=1e-6)  # same seeds: same views

    n_train = int((c0.split == "train").sum())
    s = extract(small_tree, out, "--augment", "3")  # another recipe: train images again, val/test reused
    assert (s["extracted"], s["reused"]) == (n_train, first["n_images"] - n_train)
    assert views_of(out).shape[1] == 3
    np.testing.assert_array_equal(read_cache(out).features[c0.split != "train"], c0.features[c0.split != "train"])

    s = extract(small_tree, out, "--prune")  # no views asked for, dropping them consented: everything reused
    assert (s["extracted"], s["reused"], "views" in s) == (0, first["n_images"], False)
    with h5py.File(out, "r") as f:
        assert "views" not in f and read_cache(out).n_views == 0


def test_flat_tree_gets_views_for_every_image(flat_tree_ro, tmp_path):
    s = extract(flat_tree_ro, tmp_path / "f.h5", "--augment", "1")
    assert s["views"]["images"] == s["n_images"]
    assert np.isfinite(views_of(tmp_path / "f.h5")).all()


def test_killed_augment_extract_resumes_to_the_same_cache(small_tree_ro, tmp_path):
    args = ["extract", small_tree_ro, *ARGS, "--batch-size", "3", "--augment", "2", "--json"]
    ref, out = tmp_path / "ref.h5", tmp_path / "c.h5"
    assert run_subprocess(*args[:2], "-o", ref, *args[2:]).exit_code == 0
    p = run_subprocess(*args[:2], "-o", out, *args[2:], env_extra={"FEATCACHE_TEST_CRASH_AFTER_BATCHES": "2"})
    assert p.exit_code == -signal.SIGKILL and not out.exists()
    s = json.loads(run_subprocess(*args[:2], "-o", out, *args[2:]).stdout)
    assert s["resumed_batches"] == 2
    np.testing.assert_array_equal(read_cache(out).features, read_cache(ref).features)
    np.testing.assert_array_equal(views_of(out), views_of(ref))


def test_read_views_reads_rows_and_refuses_a_cache_without_views(aug_cache):
    aug, plain, _ = aug_cache
    rows = np.flatnonzero(read_cache(aug).split == "train")
    pick = rows[[0, 1, 4, 5, 8]]  # two runs and a single row
    np.testing.assert_array_equal(read_views(aug, pick), views_of(aug)[pick])
    with pytest.raises(Exception, match="no augmented views"):
        read_views(plain, pick)


# ---- fit-head with views -------------------------------------------------------------------------

def fit(cache, out, *extra) -> dict:
    res = invoke("fit-head", cache, "-o", out, "--epochs", "8", "--device", "cpu", "--no-plots", "--json", *extra)
    assert res.exit_code == 0, res.stderr
    return res.json()


def test_fit_head_uses_views_by_default_and_can_be_told_not_to(aug_cache, tmp_path):
    aug, plain, _ = aug_cache
    used = fit(aug, tmp_path / "a")
    off = fit(aug, tmp_path / "b", "--no-use-augmented")
    base = fit(plain, tmp_path / "c")
    assert used["augmented"]["used"] and used["augmented"]["train_rows_with_views"] == used["n_train"]
    assert not off["augmented"]["used"] and off["augmented"]["views_in_cache"] == 2
    assert base["augmented"] == {"used": False, "views_in_cache": 0}
    hist = [json.loads((tmp_path / r / "metrics.json").read_text())["history"] for r in ("a", "b")]
    assert hist[0] != hist[1]  # the training rows differ
    assert [h["epoch"] for h in hist[0]] == list(range(1, used["epochs_run"] + 1))


def test_use_augmented_on_a_cache_without_views_is_a_one_line_error(aug_cache, tmp_path):
    _, plain, _ = aug_cache
    res = invoke("fit-head", plain, "-o", tmp_path / "r", "--use-augmented", "--device", "cpu")
    assert_one_line_error(res, "no augmented views", "--augment")


def test_validation_rows_are_never_augmented(aug_cache, tmp_path):
    """The val loss each epoch reports is the saved head's loss on the un-augmented val features."""
    from featcache.pipeline.heads.headio import load_head
    from featcache.pipeline.heads.metrics import score

    aug, _, _ = aug_cache
    s = fit(aug, tmp_path / "r", "--patience", "0", "--no-standardize")
    head, _ = load_head(tmp_path / "r" / "head.pt")
    c = read_cache(aug)
    val = c.split == "val"
    got = score(head, torch.from_numpy(c.features[val]), torch.from_numpy(c.labels[val]))
    history = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
    assert s["augmented"]["used"]
    assert got["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-4)


def test_logreg_and_refit_train_on_views_too(aug_cache, tmp_path):
    aug, _, _ = aug_cache
    s = fit(aug, tmp_path / "lr", "--head", "logreg", "--C", "0.1,1", "--refit")
    assert s["augmented"]["used"] and s["refit"]["n_rows"] == s["n_train"] + s["n_val"]
    s = fit(aug, tmp_path / "lin", "--refit")
    assert s["augmented"]["used"] and s["refit"]["epochs"] == s["best_epoch"]


def test_train_group_with_identical_views_equals_training_without_views():
    """Views only replace the training rows: views equal to X give the very same head."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    Xv, yv = torch.randn(12, 6, generator=g), torch.arange(12) % 3
    p = [HeadParams(hidden=(8,), dropout=0.2, lr=1e-2), HeadParams(hidden=(8,), dropout=0.0, lr=3e-3)]
    settings = TrainSettings(epochs=6, batch_size=16, patience=0)
    plain = train_group(p, data=TrainData(X, y, 3, Xv, yv), settings=settings)
    same = train_group(p, data=TrainData(X, y, 3, Xv, yv, views=X[:, None].repeat(1, 3, 1)), settings=settings)
    noisy = X[:, None].repeat(1, 3, 1) + torch.randn(40, 3, 6, generator=g)
    other = train_group(p, data=TrainData(X, y, 3, Xv, yv, views=noisy), settings=settings)
    for a, b, c in zip(plain, same, other):
        for ta, tb in zip(a.head.state_dict().values(), b.head.state_dict().values()):
            assert torch.equal(ta, tb)
        assert a.history != c.history


def test_info_shows_the_views(aug_cache):
    aug, _, _ = aug_cache
    res = invoke("info", aug)
    assert res.exit_code == 0
    assert "views      2 augmented per train image: crop scale [0.08, 1.0], flip 0.5" in res.stdout


def test_predict_with_a_head_trained_on_views_reproduces_its_val_accuracy(small_tree_ro, tmp_path):
    """Views change the training rows only: the head still meets the live un-augmented path."""
    from pathlib import Path

    extract(small_tree_ro, tmp_path / "c.h5", "--augment", "2")
    s = fit(tmp_path / "c.h5", tmp_path / "run", "--epochs", "20")
    assert s["augmented"]["used"]
    res = invoke("predict", tmp_path / "run", small_tree_ro / "val", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    preds = res.json()["predictions"]
    assert len(preds) == s["n_val"]
    assert np.mean([p["label"] == Path(p["path"]).parent.name for p in preds]) == s["val_accuracy"]


def test_unlabeled_train_images_get_no_views(small_tree, tmp_path):
    from conftest import noisy_image, save_image

    save_image(small_tree / "train" / "loose.png", noisy_image((90, 90, 90), np.random.default_rng(0)))
    s = extract(small_tree, tmp_path / "c.h5", "--augment", "1")
    c = read_cache(tmp_path / "c.h5")
    loose = c.paths.index("train/loose.png")
    assert c.labels[loose] == -1 and np.isnan(views_of(tmp_path / "c.h5")[loose]).all()
    assert s["views"]["images"] == int(((c.split == "train") & (c.labels >= 0)).sum())


def test_float16_views_read_back_as_float32(small_tree_ro, tmp_path):
    extract(small_tree_ro, tmp_path / "h.h5", "--augment", "1", "--dtype", "float16")
    rows = np.flatnonzero(read_cache(tmp_path / "h.h5").split == "train")
    with h5py.File(tmp_path / "h.h5", "r") as f:
        assert f["views"].dtype == np.float16
        want = f["views"][...][rows].astype(np.float32)
    got = read_views(tmp_path / "h.h5", rows)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_logreg_weights_views_so_C_keeps_its_meaning():
    """Rows plus V copies of themselves, weighted 1/(1+V), are the same problem as the rows alone."""
    from featcache.pipeline.heads.kinds.sequential import with_views as _with_views
    from featcache.pipeline.heads.logreg import fit_logreg

    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(60, 5, generator=g), torch.arange(60) % 3
    Xa, ya, w = _with_views(X, y, X[:, None].repeat(1, 3, 1))
    assert Xa.shape == (240, 5) and w.shape == (240,) and w.sum() == pytest.approx(60)
    a = fit_logreg([0.1], X, y, 3)[0].head[0]
    b = fit_logreg([0.1], Xa, ya, 3, sample_weight=w)[0].head[0]
    torch.testing.assert_close(a.weight, b.weight, atol=2e-3, rtol=1e-3)


def test_training_rows_views_are_not_copied_and_head_records_them(aug_cache, tmp_path):
    from featcache.pipeline.heads.data import prepare
    from featcache.pipeline.heads.headio import load_head

    aug, _, _ = aug_cache
    d = prepare(read_cache(aug), 0.2, 0, True, torch.device("cpu"), use_views=True)
    assert d.views_of(d.rows["train"]) is d.views  # split layout: exactly the training rows
    fit(aug, tmp_path / "r")
    _, meta = load_head(tmp_path / "r" / "head.pt")
    assert meta["augmented"]["used"] and meta["augmented"]["views_in_cache"] == 2
