"""HDF5 cache format (schema 1): round trip, dtypes, attrs, atomic writer, validating reader."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import CLASSES, SPLIT_COUNTS, UNICODE_CLASS

from featcache.cache.store import SCHEMA_VERSION, CacheWriter, feature_shape, open_checked, read_cache, read_feature_rows
from featcache.pipeline.errors import FeatcacheError

CLASS_NAMES = ["a b", UNICODE_CLASS, "z"]


def write_cache(path, n=7, d=5, dtype="float32", seed=0, skipped=(("bad/x.jpg", "truncated"),)):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    labels = [i % 3 for i in range(n)]
    labels[-1] = -1
    paths = [f"{['train', 'val', 'test'][i % 3]}/{CLASS_NAMES[i % 3]}/img {i}é.png" for i in range(n)]
    split = [p.split("/")[0] for p in paths]
    w = CacheWriter(path, n, d, dtype)
    assert not path.exists()  # nothing at the final path until finish()
    # write out of order in two calls (contiguous slab and scattered rows)
    w.write_features(np.arange(0, 3), feats[0:3].astype(dtype))
    w.write_features(np.array([3, 5, 6]), feats[[3, 5, 6]].astype(dtype))
    w.write_features(np.array([4]), feats[[4]].astype(dtype))
    w.write_columns({"labels": labels, "paths": paths, "split": split, "file_size": list(range(n)),
                     "file_mtime_ns": [10**18 + i for i in range(n)], "file_sha256": ["" for _ in range(n)]})
    attrs = {"fingerprint": "f" * 64, "class_names": CLASS_NAMES, "backbone": "resnet18", "weights": "random(seed=0)",
             "layer": "input of fc", "pool": "flatten", "preprocess": {"resize_size": 256, "mean": [0.1, 0.2, 0.3]},
             "dtype": dtype, "feature_dim": d, "n_images": n, "torch_version": "x", "created": "now",
             "ratio": 0.5, "flag": True}
    w.finish(attrs, list(skipped))
    return feats, labels, paths, split, attrs


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    feats, labels, paths, split, attrs = write_cache(path)
    assert path.exists() and not list(tmp_path.glob("*.tmp-*"))
    c = read_cache(path)
    np.testing.assert_array_equal(c.features, feats)
    assert c.features.dtype == np.float32
    assert c.labels.tolist() == labels and c.labels.dtype == np.int64
    assert c.paths == paths
    assert c.split.tolist() == split
    assert c.class_names == CLASS_NAMES
    assert c.skipped == [("bad/x.jpg", "truncated")]
    assert c.file_size.tolist() == list(range(7))
    assert c.file_mtime_ns.tolist() == [10**18 + i for i in range(7)]
    for k, v in attrs.items():
        assert c.attrs[k] == v, k
    assert c.attrs["complete"] is True or c.attrs["complete"] == 1
    assert c.attrs["schema_version"] == SCHEMA_VERSION
    assert c.fingerprint == "f" * 64 and c.n_rows == 7
    assert feature_shape(path) == (7, 5)
    np.testing.assert_array_equal(read_feature_rows(path, np.array([1, 4])), feats[[1, 4]])
    assert read_cache(path, features=False).features is None


def test_float16(tmp_path):
    path = tmp_path / "c16.h5"
    feats, *_ = write_cache(path, dtype="float16")
    c = read_cache(path)
    assert c.features.dtype == np.float16
    np.testing.assert_array_equal(c.features, feats.astype(np.float16))
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16


def test_layout_on_disk(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path, n=50, d=8)
    with h5py.File(path, "r") as f:
        assert set(f) >= {"features", "labels", "paths", "split", "skipped", "file_size", "file_mtime_ns",
                          "file_sha256"}
        assert f["features"].chunks is not None and f["features"].chunks[1] == 8  # chunked by whole rows
        assert f["labels"].dtype == np.int64
        assert h5py.check_string_dtype(f["paths"].dtype).encoding == "utf-8"
        assert f.attrs["format"] == "featcache"
        assert set(f["skipped"].dtype.names) == {"path", "reason"}


def test_empty_skipped_list(tmp_path):
    write_cache(tmp_path / "c.h5", skipped=())
    assert read_cache(tmp_path / "c.h5").skipped == []


def test_abort_leaves_nothing(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, 3, 2, "float32")
    w.write_features(np.arange(3), np.zeros((3, 2), np.float32))
    w.abort()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_unfinished_writer_never_touches_the_previous_cache(tmp_path):
    path = tmp_path / "c.h5"
    feats, *_ = write_cache(path)
    w = CacheWriter(path, 2, 5, "float32")  # a second run that "crashes" before finish()
    w.write_features(np.arange(2), np.ones((2, 5), np.float32))
    w.f.flush()
    np.testing.assert_array_equal(read_cache(path).features, feats)  # readers still see the old one
    w.abort()
    np.testing.assert_array_equal(read_cache(path).features, feats)


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_reader_rejects_missing_file(tmp_path):
    with pytest.raises(FeatcacheError) as e:
        read_cache(tmp_path / "nope.h5")
    _one_line(e, "not found")


def test_reader_rejects_folder(tmp_path):
    with pytest.raises(FeatcacheError) as e:
        read_cache(tmp_path)
    _one_line(e, "folder")


@pytest.mark.parametrize("content", [b"", b"hello, not hdf5\n", b"\x89PNG\r\n\x1a\n" + b"\0" * 100])
def test_reader_rejects_non_hdf5(tmp_path, content):
    p = tmp_path / "x.h5"
    p.write_bytes(content)
    with pytest.raises(FeatcacheError) as e:
        read_cache(p)
    _one_line(e, "not an HDF5 file")


def test_reader_rejects_foreign_hdf5(tmp_path):
    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.zeros((2, 2))
        f.attrs["complete"] = True
    with pytest.raises(FeatcacheError) as e:
        read_cache(p)
    _one_line(e, "not a featcache cache")


def test_reader_rejects_incomplete_file(tmp_path):
    p = tmp_path / "c.h5"
    write_cache(p)
    with h5py.File(p, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(FeatcacheError) as e:
        read_cache(p)
    _one_line(e, "incomplete")
    # the writer's own temporary file is incomplete too
    w = CacheWriter(tmp_path / "d.h5", 1, 1, "float32")
    w.f.flush()
    with pytest.raises(FeatcacheError, match="incomplete"):
        read_cache(w.tmp_path)
    w.abort()


def test_reader_rejects_other_schema_version(tmp_path):
    p = tmp_path / "c.h5"
    write_cache(p)
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(FeatcacheError) as e:
        read_cache(p)
    _one_line(e, "schema")


def test_open_checked_returns_open_file(tmp_path):
    p = tmp_path / "c.h5"
    write_cache(p)
    with open_checked(p) as f:
        assert f["features"].shape == (7, 5)


# ---- the real cache written by `featcache extract` ------------------------------------------------

def test_extracted_cache_schema(split_cache, split_tree_ro):
    c = read_cache(split_cache)
    n = sum(SPLIT_COUNTS.values()) * len(CLASSES)
    assert c.features.shape == (n, 512) and c.features.dtype == np.float32
    assert np.isfinite(c.features).all()
    assert c.class_names == sorted(CLASSES)
    for path, label, split in zip(c.paths, c.labels, c.split):  # rows aligned
        s, cls, _ = path.split("/")
        assert s == split and c.class_names[label] == cls
        assert (split_tree_ro / path).is_file()
    assert c.paths == sorted(c.paths)
    a = c.attrs
    for key in ("class_names", "backbone", "weights", "layer", "pool", "preprocess", "dtype", "torch_version",
                "torchvision_version", "schema_version", "created", "fingerprint", "image_policy", "feature_dim",
                "n_images"):
        assert key in a, key
    assert a["backbone"] == "resnet18" and a["weights"] == "random(seed=0)" and a["dtype"] == "float32"
    assert a["feature_dim"] == 512 and a["n_images"] == n
    assert a["preprocess"]["crop_size"] == 224
    assert len(a["fingerprint"]) == 64
    sizes = [(split_tree_ro / p).stat().st_size for p in c.paths]
    assert c.file_size.tolist() == sizes
    assert c.skipped == []
