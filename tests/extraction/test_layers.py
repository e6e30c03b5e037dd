"""Layers: each family's own feature API, several layers in one pass, column ranges, --pool truth,
wrong names, ``featcache layers``. Random-init models at tiny input sizes only (no downloads)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke

from featcache.cache.fingerprint import fingerprint
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.backbones import build_backbone
from featcache.pipeline.extraction.extract import cache_identity


def batch(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def run(bb, x) -> torch.Tensor:
    with torch.inference_mode():
        return bb.model(x)


def _timm(name: str, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def test_tf_efficientnet_lite0_intermediate_layer_despite_same_padding():
    """torch.fx cannot trace TF SAME padding; forward_intermediates can. blocks.3 = the stem and
    the first four block stages, average pooled."""
    bb = build_backbone("timm:tf_efficientnet_lite0@64", "none", layer="blocks.3")
    ref = _timm("tf_efficientnet_lite0")
    x = batch(64)
    with torch.inference_mode():
        y = ref.bn1(ref.conv_stem(x))
        for blk in ref.blocks[:4]:
            y = blk(y)
    assert bb.layers == [{"name": "blocks.3", "shape": [80, 4, 4], "pool": "avg", "start": 0, "stop": 80}]
    torch.testing.assert_close(run(bb, x), y.mean(dim=(2, 3)))
    mx = build_backbone("timm:tf_efficientnet_lite0@64", "none", layer="blocks.3", pool="max")
    torch.testing.assert_close(run(mx, x), y.amax(dim=(2, 3)))


def test_bundled_lite0_layer_is_no_longer_a_trace_error():
    bb = build_backbone("efficientnet_lite0", "DEFAULT", layer="blocks.4")
    assert bb.feature_dim == 112 and bb.layers[0]["shape"] == [112, 14, 14]


def test_several_layers_in_one_pass_are_the_single_layers_side_by_side():
    name, x = "timm:resnet18@64", batch(64)
    multi = build_backbone(name, "none", layer="layer2,layer4,pre_logits")
    assert [(r["name"], r["start"], r["stop"], r["pool"], r["shape"]) for r in multi.layers] == [
        ("layer2", 0, 128, "avg", [128, 8, 8]), ("layer4", 128, 640, "avg", [512, 2, 2]),
        ("pre_logits", 640, 1152, "none", [512])]
    assert multi.feature_dim == 1152 and multi.description["layer"] == "layer2,layer4,pre_logits"
    out = run(multi, x)
    for r in multi.layers:
        single = build_backbone(name, "none", layer=r["name"])
        torch.testing.assert_close(out[:, r["start"]:r["stop"]], run(single, x))
    # pre_logits is the default layer's value
    torch.testing.assert_close(out[:, 640:], run(build_backbone(name, "none"), x))


def test_convnext_layers_and_flatten():
    bb = build_backbone("timm:convnext_atto@64", "none", layer="stages.1,stages.3", pool="flatten")
    assert [(r["shape"], r["stop"] - r["start"]) for r in bb.layers] == [([80, 8, 8], 80 * 64), ([320, 2, 2], 1280)]
    ref = _timm("convnext_atto")
    with torch.inference_mode():
        maps = ref.forward_intermediates(batch(64), indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(run(bb, batch(64)), torch.cat([m.flatten(1) for m in maps], 1))


def test_vit_blocks_pool_the_patch_tokens_without_the_class_token():
    bb = build_backbone("timm:vit_tiny_patch16_224@32", "none", layer="blocks.5,features")
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = batch(32)
    with torch.inference_mode():
        t = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
        for blk in ref.blocks[:6]:
            t = blk(t)
        final = ref.forward_features(x)
    assert ref.num_prefix_tokens == 1
    out = run(bb, x)
    torch.testing.assert_close(out[:, :192], t[:, 1:].mean(1))  # 2x2 = 4 patch tokens, class token dropped
    torch.testing.assert_close(out[:, 192:], final[:, 1:].mean(1))
    assert not torch.allclose(out[:, :192], t.mean(1))  # including the class token would differ


def test_torchvision_multi_layer_and_max_pool_of_the_default_layer():
    x = batch(64)
    multi = build_backbone("resnet18", "none", layer="layer1,layer3")
    assert [(r["start"], r["stop"]) for r in multi.layers] == [(0, 64), (64, 320)]
    torch.testing.assert_close(run(multi, x)[:, 64:], run(build_backbone("resnet18", "none", layer="layer3"), x))
    # --pool max without --layer max-pools the map the classifier's avgpool reads (it used to be
    # the avg-pooled vector, recorded as max)
    mx = build_backbone("resnet18", "none", pool="max")
    l4 = build_backbone("resnet18", "none", layer="layer4", pool="max")
    torch.testing.assert_close(run(mx, x), run(l4, x))
    assert not torch.allclose(run(mx, x), run(build_backbone("resnet18", "none"), x))
    assert mx.description["pool"] == "max" and mx.layers[0]["pool"] == "max"


@pytest.mark.parametrize("name, layer", [("timm:resnet18@64", "pre_logits"), ("resnet18", "flatten"),
                                         ("timm:resnet18@64", "layer3,pre_logits")])
def test_pool_on_a_flat_layer_is_an_error_not_ignored(name, layer):
    with pytest.raises(FeatcacheError, match="no spatial extent") as info:
        build_backbone(name, "none", layer=layer, pool="max")
    assert "\n" not in str(info.value)
    assert build_backbone(name, "none", layer=layer).layers[-1]["pool"] == "none"  # unset: stored as is


@pytest.mark.parametrize("name, bad, listed", [
    ("resnet18", "layer9", "layer4"),
    ("timm:resnet18@64", "layer9", "layer4, features, pre_logits"),
    ("timm:vit_tiny_patch16_224@32", "blocks.12", "blocks.11, features, pre_logits"),
    ("timm:convnext_atto@64", "stage.1", "stages.1"),
    ("efficientnet_lite0", "blocks.7", "stem, blocks.0"),
])
def test_wrong_layer_name_lists_valid_names(name, bad, listed):
    with pytest.raises(FeatcacheError) as info:
        build_backbone(name, "none", layer=f"{bad}")
    msg = str(info.value)
    assert "\n" not in msg and f"unknown layer {bad!r}" in msg and listed in msg


def test_layer_list_errors():
    with pytest.raises(FeatcacheError, match="more than once"):
        build_backbone("resnet18", "none", layer="layer1,layer1")
    with pytest.raises(FeatcacheError, match="names no layer"):
        build_backbone("resnet18", "none", layer=" , ")


def test_fingerprint_changes_with_the_layer_set():
    fps = {layer: fingerprint(cache_identity(build_backbone("timm:resnet18@64", "none", layer=layer), "float32"))
           for layer in ("layer2", "layer2,layer4", "layer4,layer2", None)}
    assert len(set(fps.values())) == 4


def test_layers_command_lists_names_and_shapes():
    res = invoke("layers", "efficientnet_lite0")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "224x224" in lines[0]
    assert lines[1].split() == ["stem", "32x112x112", "32"]
    assert ["blocks.3", "80x14x14", "80"] in [ln.split() for ln in lines]
    assert lines[-1].split() == ["pre_logits", "1280", "1280"]
    js = json.loads(invoke("layers", "timm:vit_tiny_patch16_224@32", "--json").stdout)
    assert js["input_size"] == 32
    assert [r["name"] for r in js["layers"]][-3:] == ["blocks.11", "features", "pre_logits"]
    assert js["layers"][0] == {"name": "blocks.0", "shape": [192, 2, 2], "features": 192}
    tv = json.loads(invoke("layers", "resnet18", "--json").stdout)
    assert {"name": "layer3", "shape": [256, 14, 14], "features": 256} in tv["layers"]
    assert_one_line_error(invoke("layers", "timm:nosuchnet"), "unknown timm model")


def test_every_listed_layer_can_be_extracted():
    """What `featcache layers` lists is exactly what --layer accepts, with the listed shapes."""
    from featcache.pipeline.extraction.backbones import list_layers

    listing = list_layers("timm:efficientnet_b0@64")
    names = ",".join(r["name"] for r in listing["layers"])
    bb = build_backbone("timm:efficientnet_b0@64", "none", layer=names)
    assert [r["shape"] for r in bb.layers] == [r["shape"] for r in listing["layers"]]
    assert run(bb, batch(64)).shape == (2, bb.feature_dim)


def test_extract_cli_records_layer_columns_and_info_shows_them(tmp_path, small_tree_ro):
    out = tmp_path / "multi.h5"
    res = invoke("extract", small_tree_ro, "-o", out, "--backbone", "timm:resnet18@64", "--weights", "none",
                 "--layer", "layer2,layer4", "--workers", "0", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [(r["name"], r["start"], r["stop"]) for r in summary["layers"]] == [("layer2", 0, 128), ("layer4", 128, 640)]
    with h5py.File(out) as f:
        assert f["features"].shape == (15, 640)
        assert json.loads(f.attrs["layers"]) == summary["layers"]
        feats = f["features"][:]
    single = tmp_path / "single.h5"
    assert invoke("extract", small_tree_ro, "-o", single, "--backbone", "timm:resnet18@64", "--weights", "none",
                  "--layer", "layer4", "--workers", "0").exit_code == 0
    with h5py.File(single) as f:
        np.testing.assert_allclose(feats[:, 128:], f["features"][:], rtol=1e-4, atol=1e-5)
    text = invoke("info", out).stdout
    assert "layers     2, columns of /features:" in text
    assert any(ln.split() == ["layer4", "[128:640)", "512x2x2", "pool=avg"] for ln in text.splitlines())


def test_extract_cli_bad_layer_is_one_line(tmp_path, small_tree_ro):
    res = invoke("extract", small_tree_ro, "-o", tmp_path / "c.h5", "--backbone", "efficientnet_lite0",
                 "--layer", "blocks.4,blocks.99", "--workers", "0")
    assert_one_line_error(res, "unknown layer 'blocks.99'", "blocks.6")


def test_finetune_sees_the_blocks_behind_multi_layer_wrappers():
    from featcache.pipeline.use.finetune import blocks

    for name in ("timm:resnet18@64", "resnet18"):
        bb = build_backbone(name, "none", layer="layer2,layer4")
        assert len(blocks(bb.model)) >= 5, name  # stem parts and the four stages, not one wrapper
