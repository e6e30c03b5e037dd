"""Preprocessing read from the weights equals what the weights themselves prescribe (no downloads:
``weights.transforms()`` and timm's data config need no weight files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import get_model_weights

from featcache.pipeline.extraction.preprocess import PreprocessSpec, from_timm_config, from_torchvision_weights, imagenet_default


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("model, enum_name", [
    ("resnet18", "DEFAULT"),
    ("resnet50", "IMAGENET1K_V2"),  # resize 232, crop 224
    ("alexnet", "DEFAULT"),
    ("efficientnet_b0", "DEFAULT"),  # bicubic, resize 256, crop 224
    ("efficientnet_b3", "DEFAULT"),  # bicubic, resize 320, crop 300
    ("inception_v3", "DEFAULT"),  # resize 342, crop 299
    ("vit_b_16", "DEFAULT"),
])
@pytest.mark.parametrize("size", [(300, 260), (64, 48)])  # larger than the crop, and a tiny upsampled one
def test_spec_matches_weights_transforms(model, enum_name, size):
    enum = get_model_weights(model)
    weights = enum.DEFAULT if enum_name == "DEFAULT" else enum[enum_name]
    spec = from_torchvision_weights(weights)
    ref = weights.transforms()
    assert spec.resize_size == ref.resize_size[0] and spec.crop_size == ref.crop_size[0]
    assert spec.interpolation == ref.interpolation.value
    assert list(spec.mean) == list(ref.mean) and list(spec.std) == list(ref.std)
    img = random_image(*size)
    ours = spec.transform()(img)
    theirs = ref(img)
    assert ours.shape == theirs.shape == (3, spec.crop_size, spec.crop_size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_imagenet_default_matches_torchvision_preset():
    from torchvision.transforms._presets import ImageClassification

    spec = imagenet_default("test")
    ref = ImageClassification(crop_size=224)  # torchvision's defaults: resize 256, bilinear, ImageNet stats
    img = random_image(120, 90, seed=1)
    torch.testing.assert_close(spec.transform()(img), ref(img), rtol=0, atol=1e-6)
    assert (spec.resize_size, spec.crop_size, spec.interpolation) == (256, 224, "bilinear")


def test_timm_spec_matches_timm_eval_transform():
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    cfg = resolve_data_config({}, model=model)
    spec = from_timm_config(cfg, source="test")
    ref = create_transform(**cfg, is_training=False)
    for size in ((300, 260), (64, 48)):
        img = random_image(*size, seed=2)
        torch.testing.assert_close(spec.transform()(img), ref(img), rtol=0, atol=1e-5)


def test_lite0_backbone_uses_timm_preprocessing():
    from featcache.pipeline.extraction.backbones import build_backbone

    bb = build_backbone("efficientnet_lite0", "none")
    assert bb.preprocess.crop_size == 224
    assert bb.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))  # TF-ported weights expect [-1, 1]
    assert "timm" in bb.preprocess.source


def test_spec_dict_round_trip():
    spec = from_torchvision_weights(get_model_weights("resnet18").DEFAULT)
    d = spec.to_dict()
    import json

    back = PreprocessSpec.from_dict(json.loads(json.dumps(d)))  # survives JSON (tuples -> lists)
    assert back == spec
    img = random_image(80, 60)
    assert torch.equal(back.transform()(img), spec.transform()(img))


def test_random_and_file_weights_use_imagenet_defaults(tmp_path):
    from featcache.pipeline.extraction.backbones import build_backbone

    bb = build_backbone("resnet18", "none", layer="conv1")
    assert (bb.preprocess.resize_size, bb.preprocess.crop_size) == (256, 224)
    assert bb.preprocess.mean == imagenet_default("x").mean


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("wh", [(500, 375), (375, 500), (97, 64), (256, 256)])
def test_pil_stage_is_pixel_for_pixel_the_v2_resize_and_crop(interpolation, wh):
    """loader.pil_stage runs torchvision.transforms (v1) to keep v2's torch._dynamo import out of
    start-up; on PIL images it must give exactly what spec.transform()'s v2 steps give."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, v2

    from featcache.pipeline.extraction.loader import pil_stage

    spec = PreprocessSpec(crop_size=224, resize_size=256, interpolation=interpolation, antialias=True,
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    v2_steps = v2.Compose([v2.Resize(256, InterpolationMode(interpolation), antialias=True), v2.CenterCrop(224)])
    np.testing.assert_array_equal(np.asarray(pil_stage(spec)(img)), np.asarray(v2_steps(img)))
