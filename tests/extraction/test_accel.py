"""The optimised inference path (pipeline/accel.py) computes the reference function (issue 5).

Reference = the backbone as built, fp32, eager, NCHW contiguous input. Every optimised form must
agree with it to cosine similarity >= 0.999 per feature row; in fp32 on the CPU it is far closer.
Fixtures are local to this file.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.accel import COMPILE_MIN_IMAGES, Normalizer, Runner, compile_wanted, fold_batchnorm
from featcache.pipeline.extraction.backbones import FeatureModel, build_backbone
from featcache.pipeline.extraction.preprocess import imagenet_default

MIN_COSINE = 0.999


def randomise_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine terms, so folding really changes weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def u8_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8 images: smooth ramps plus noise, like decoded photos."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    img = ramp[None, :, None, None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3)) + ramp[None, None, :, None] * 0.2
    img = img + rng.normal(0, 20, (n, size, size, 3))
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))


def reference(model: nn.Module, spec, u8: torch.Tensor) -> torch.Tensor:
    """fp32 eager features of a uint8 NHWC batch, normalised exactly as spec.transform() does.

    ``model.eval()`` again: deepcopy of an fx GraphModule (create_feature_extractor) resets its
    submodules to training mode.
    """
    model.eval()
    x = u8.permute(0, 3, 1, 2).contiguous().float().mul_(1 / 255)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x.contiguous())


def assert_rows_agree(feats: np.ndarray, ref: torch.Tensor) -> None:
    got = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got, ref.float(), dim=1)
    assert float(cos.min()) >= MIN_COSINE, cos


@pytest.fixture(scope="module")
def small_batch() -> torch.Tensor:
    return u8_batch(3, 224, seed=1)


@pytest.mark.parametrize("name,weights", [
    ("resnet18", "none"), ("alexnet", "none"), ("efficientnet_lite0", "DEFAULT"), ("mobilenet_v3_small", "none"),
])
def test_optimised_runner_matches_reference_fp32_eager(name, weights, small_batch):
    bb = build_backbone(name, weights)
    randomise_bn_stats(bb.model)
    ref = reference(copy.deepcopy(bb.model), bb.preprocess, small_batch)
    runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), optimize=True)
    with torch.inference_mode():
        feats = runner(small_batch)
    assert feats.dtype == np.float32 and feats.shape == (3, bb.feature_dim)
    assert_rows_agree(feats, ref)
    assert runner.accel.channels_last and runner.accel.autocast is None  # CPU stays fp32
    if name != "alexnet":  # alexnet has no batch norm
        assert runner.accel.folded_bn > 0
        assert not any(isinstance(m, nn.BatchNorm2d) and type(m) is nn.BatchNorm2d for m in bb.model.modules())


def test_reference_runner_is_exactly_the_eager_model(small_batch):
    bb = build_backbone("resnet18", "none", layer="layer2", pool="avg")
    ref = reference(copy.deepcopy(bb.model), bb.preprocess, small_batch)
    runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), optimize=False)
    with torch.inference_mode():
        feats = runner(small_batch)
    np.testing.assert_array_equal(feats, ref.numpy())
    assert runner.accel.describe() == "reference eager fp32"


def test_fold_batchnorm_counts_and_preserves_function():
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
    ).eval()
    randomise_bn_stats(m, seed=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = m(x)
    folded, n = fold_batchnorm(m)
    assert n == 2
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


def test_batchnorm_reading_a_shared_conv_output_is_not_folded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice: folding would change the sum

    m = randomise_bn_stats(Branchy().eval())
    x = torch.randn(2, 3, 8, 8)
    out, n = fold_batchnorm(m)
    assert n == 0 and out is m
    with torch.inference_mode():
        torch.testing.assert_close(out(x), m(x))


def test_untraceable_trunk_runs_unfolded():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    m = DataDependent().eval()
    assert fold_batchnorm(m) == (m, 0)


def test_normaliser_is_bit_identical_to_the_per_image_transform():
    from PIL import Image

    spec = imagenet_default("test")
    u8 = u8_batch(2, spec.crop_size, seed=4)
    tf = spec.transform()  # on a crop-sized image resize(256) changes it, so compare after the PIL stage
    from featcache.pipeline.extraction.loader import pil_stage

    imgs = [Image.fromarray(a.numpy()).resize((300, 260)) for a in u8]
    want = torch.stack([tf(im) for im in imgs])
    staged = torch.from_numpy(np.stack([np.asarray(pil_stage(spec)(im)) for im in imgs]))
    for channels_last in (False, True):
        got = Normalizer(spec, torch.device("cpu"), channels_last)(staged)
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_hooks_on_the_feature_model_still_fire(small_batch):
    bb = build_backbone("resnet18", "none", layer="layer1", pool="avg")
    seen = []
    bb.model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].shape[0]))
    runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), optimize=True)
    with torch.inference_mode():
        runner(small_batch)
    assert seen == [3]


def test_heap_reuse_is_transparent(small_batch):
    import platform
    import sys

    from featcache.pipeline.extraction.accel import heap_reuse

    bb = build_backbone("resnet18", "none", layer="layer1", pool="avg")
    runner = Runner(bb.model, bb.preprocess, torch.device("cpu"))
    with torch.inference_mode():
        plain = runner(small_batch)
        with heap_reuse() as active:
            tuned = runner(small_batch)
        with heap_reuse(enabled=False) as inactive:
            assert inactive is False
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert active is glibc  # a no-op without glibc
    np.testing.assert_array_equal(plain, tuned)


def test_compile_decision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("on", cpu, 1) and not compile_wanted("off", cpu, 10**9)
    assert not compile_wanted("auto", cpu, COMPILE_MIN_IMAGES["cpu"] - 1)
    assert compile_wanted("auto", cpu, COMPILE_MIN_IMAGES["cpu"])
    assert compile_wanted("auto", cuda, COMPILE_MIN_IMAGES["cuda"])
    with pytest.raises(FeatcacheError, match="--compile"):
        compile_wanted("sometimes", cpu, 1)


def test_compiled_runner_matches_reference_and_pads_short_batches():
    """torch.compile (inductor) on a tiny trunk: same features, one static shape for every call."""
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    model = FeatureModel(randomise_bn_stats(trunk.eval(), seed=5), "avg").eval()
    spec = imagenet_default("test")
    spec = type(spec)(**{**spec.to_dict(), "resize_size": 36, "crop_size": 32})
    full, short = u8_batch(4, 32, seed=6), u8_batch(2, 32, seed=7)
    ref_full = reference(copy.deepcopy(model), spec, full)
    ref_short = reference(copy.deepcopy(model), spec, short)
    seen = []
    model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].shape[0]))
    runner = Runner(model, spec, torch.device("cpu"), optimize=True, compile_model=True, batch_size=4)
    assert runner.accel.compiled and runner.accel.compile_seconds > 0
    with torch.inference_mode():
        a, b = runner(full), runner(short)
    assert a.shape == (4, 16) and b.shape == (2, 16)
    assert_rows_agree(a, ref_full)
    assert_rows_agree(b, ref_short)
    assert set(seen) == {4}  # the short batch was padded, so the compiled graph saw one shape


def test_failed_compile_falls_back_under_auto_and_is_one_line_error_under_on(monkeypatch, small_batch):
    class Broken(nn.Module):  # what torch.compile returns fails on its first call
        def forward(self, _x):
            raise RuntimeError("no C++ compiler\nlong inductor log")

    def broken_compile(module, **_kw):
        return Broken()

    monkeypatch.setattr(torch, "compile", broken_compile)
    bb = build_backbone("resnet18", "none", layer="layer1", pool="avg")
    ref = reference(copy.deepcopy(bb.model), bb.preprocess, small_batch)
    runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), compile_model=True, compile_fallback=True)
    assert not runner.accel.compiled and "no C++ compiler" in runner.accel.compile_error
    assert "not compiled" in runner.accel.describe()
    with torch.inference_mode():
        assert_rows_agree(runner(small_batch), ref)
    bb = build_backbone("resnet18", "none", layer="layer1", pool="avg")
    with pytest.raises(FeatcacheError, match="--compile off") as e:
        Runner(bb.model, bb.preprocess, torch.device("cpu"), compile_model=True, compile_fallback=False)
    assert "\n" not in str(e.value)


def test_cpu_bf16_autocast_is_asked_for_not_implied(small_batch):
    """--amp bf16 on the CPU: bf16 autocast (AMX/AVX-512 bf16), still within the faithful tolerance of
    the fp32 reference, and really another computation than the fp32 default."""
    bb = build_backbone("resnet18", "none", layer="layer3", pool="avg")
    randomise_bn_stats(bb.model)
    ref = reference(copy.deepcopy(bb.model), bb.preprocess, small_batch)
    fp32 = Runner(copy.deepcopy(bb.model), bb.preprocess, torch.device("cpu"))
    bf16 = Runner(bb.model, bb.preprocess, torch.device("cpu"), amp="bf16")
    assert fp32.accel.autocast is None and bf16.accel.autocast == torch.bfloat16
    assert "autocast bfloat16" in bf16.accel.describe()
    with torch.inference_mode():
        a, b = fp32(small_batch), bf16(small_batch)
    assert_rows_agree(b, ref)
    assert not np.array_equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "off"])
def test_cuda_runner_matches_reference(small_batch, amp):
    bb = build_backbone("resnet18", "none")
    randomise_bn_stats(bb.model)
    ref = reference(copy.deepcopy(bb.model), bb.preprocess, small_batch)
    runner = Runner(bb.model, bb.preprocess, torch.device("cuda"), optimize=True, amp=amp)
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8
    want = {"auto": torch.bfloat16 if native_bf16 else torch.float16, "bf16": torch.bfloat16,
            "fp16": torch.float16, "off": None}[amp]
    assert runner.accel.autocast == want and runner.accel.channels_last and runner.accel.folded_bn > 0
    with torch.inference_mode():
        feats = runner(small_batch.pin_memory())
    assert_rows_agree(feats, ref)
    if amp == "off":  # fp32 with TF32 off: far closer than the autocast tolerance
        torch.testing.assert_close(torch.from_numpy(feats), ref, rtol=1e-3, atol=1e-4)
