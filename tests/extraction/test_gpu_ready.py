"""Issue 26, "ready for the first GPU", checked on the CPU: the precision a cache records and compares,
the --amp flag, --device edge cases, the overlapped device-to-host copy, and no per-step host syncs
in fine-tuning. tests/use/test_cuda.py holds the same promises checked on a real GPU.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import FAST, assert_one_line_error, invoke, noisy_image, save_image
from torch import nn

from featcache.pipeline import device as device_mod
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning
from featcache.pipeline.extraction import accel
from featcache.pipeline.extraction.accel import Runner, precision_identity, precision_record, resolve_amp


@pytest.fixture(autouse=True)
def _fresh_cuda_probe():
    """device.cuda_probe caches its answer per process; tests that fake CUDA need a fresh one."""
    device_mod.cuda_probe.cache_clear()
    yield
    device_mod.cuda_probe.cache_clear()


def _extract(tree, out, *extra):
    return invoke("extract", tree, "-o", out, *FAST, "--workers", "0", "--batch-size", "8", "--json", *extra)


def _attrs(path) -> dict:
    from featcache.cache.store import read_cache

    return read_cache(path, features=False).attrs


def _add_image(tree, name="extra.png", seed=9):
    save_image(tree / "train" / "red" / name, noisy_image((200, 40, 40), np.random.default_rng(seed)))


# ---- the precision is part of what a cache records and compares ------------------------------------

def test_a_cpu_fp32_cache_keeps_the_fingerprint_caches_had_before_precision_was_recorded(small_tree_ro, tmp_path):
    """Absent precision = CPU fp32: an existing CPU cache stays up to date for a CPU re-run."""
    from featcache.cache.fingerprint import fingerprint
    from featcache.pipeline.extraction.backbones import build_backbone
    from featcache.pipeline.extraction.extract import cache_identity

    res = _extract(small_tree_ro, tmp_path / "c.h5", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    attrs = _attrs(tmp_path / "c.h5")
    assert "precision" not in attrs["description"]
    bb = build_backbone("resnet18", "none", "maxpool", "avg", 0)
    assert attrs["fingerprint"] == fingerprint(cache_identity(bb, "float32", True)) == res.json()["fingerprint"]
    again = _extract(small_tree_ro, tmp_path / "c.h5", "--device", "cpu")
    assert again.exit_code == 0 and again.json()["extracted"] == 0 and again.json()["reused"] == 15


def test_an_update_in_another_precision_is_refused_in_one_line_and_overwrite_re_extracts(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    assert _extract(small_tree, out, "--device", "cpu").exit_code == 0
    before = out.read_bytes()
    _add_image(small_tree)
    line = assert_one_line_error(_extract(small_tree, out, "--device", "cpu", "--amp", "bf16"),
                                 "on the CPU in fp32", "bf16", "--device cpu", "--overwrite")
    assert "never mix" in line
    assert out.read_bytes() == before  # refused before any work: the cache is untouched
    res = _extract(small_tree, out, "--device", "cpu", "--amp", "bf16", "--overwrite")
    assert res.exit_code == 0, res.stderr
    s = res.json()
    assert s["extracted"] == 16 and s["reused"] == 0 and "bfloat16" in s["inference"]
    assert _attrs(out)["description"]["precision"] == {"device_type": "cpu", "amp": "bf16"}
    _add_image(small_tree, "extra2.png", seed=10)
    line = assert_one_line_error(_extract(small_tree, out, "--device", "cpu"), "bf16", "--amp bf16")
    assert "records no precision" not in line  # this cache records its precision


def test_bf16_rows_differ_from_fp32_rows_but_agree_to_rounding(small_tree_ro, tmp_path):
    """The flag really changes the computation (so the record is not cosmetic), within bf16 rounding."""
    from featcache.cache.store import read_cache

    assert _extract(small_tree_ro, tmp_path / "a.h5", "--device", "cpu").exit_code == 0
    assert _extract(small_tree_ro, tmp_path / "b.h5", "--device", "cpu", "--amp", "bf16").exit_code == 0
    a, b = read_cache(tmp_path / "a.h5"), read_cache(tmp_path / "b.h5")
    assert a.paths == b.paths and a.fingerprint != b.fingerprint
    assert not np.array_equal(a.features, b.features)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a.features), torch.from_numpy(b.features), dim=1)
    assert float(cos.min()) >= 0.999


def test_amp_flag_errors_are_one_line(small_tree_ro, tmp_path):
    assert_one_line_error(_extract(small_tree_ro, tmp_path / "c.h5", "--device", "cpu", "--amp", "fp16"),
                          "--amp fp16", "cuda", "bf16")
    assert_one_line_error(_extract(small_tree_ro, tmp_path / "c.h5", "--amp", "fp8"), "amp")
    assert not (tmp_path / "c.h5").exists()


def test_resolve_amp(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp("auto", cpu) == "off" and resolve_amp("bf16", cpu) == "bf16" and resolve_amp("off", cpu) == "off"
    for capability, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None, c=capability: c)
        assert resolve_amp("auto", cuda) == want
    assert resolve_amp("auto", cuda, optimize=False) == "off"  # --no-optimize: the fp32 reference
    assert resolve_amp("fp16", cuda) == "fp16" and resolve_amp("off", cuda) == "off"
    with pytest.raises(FeatcacheError, match="--amp fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)
    with pytest.raises(FeatcacheError, match="unknown --amp 'half'"):
        resolve_amp("half", cuda)


def test_precision_record_and_identity():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert precision_identity(precision_record(cpu, "off")) == {}
    assert precision_identity(precision_record(cpu, "bf16")) == {"precision": {"device_type": "cpu", "amp": "bf16"}}
    # a GPU in fp32 is still another device: its rows are not the CPU's bits
    assert precision_identity(precision_record(cuda, "off")) == {"precision": {"device_type": "cuda", "amp": "off"}}


def test_precision_conflict_answers_only_when_the_precision_is_the_one_difference():
    from featcache.cache.fingerprint import fingerprint

    base = {"backbone": "resnet18", "dtype": "float32"}
    cpu_attrs = {"fingerprint": fingerprint(base), "description": dict(base)}
    gpu = precision_record(torch.device("cuda"), "bf16")
    msg = accel.precision_conflict(cpu_attrs, base, gpu)
    assert "on the CPU in fp32" in msg and "on CUDA with bf16 autocast" in msg and "--device cpu" in msg
    assert "records no precision" in msg  # old caches cannot say whether a GPU made them
    assert accel.precision_conflict(cpu_attrs, {**base, "dtype": "float16"}, gpu) is None  # another config
    assert accel.precision_conflict(cpu_attrs, base, precision_record(torch.device("cpu"), "off")) is None
    gpu_attrs = {"fingerprint": fingerprint({**base, "precision": gpu}), "description": {**base, "precision": gpu}}
    msg = accel.precision_conflict(gpu_attrs, base, precision_record(torch.device("cpu"), "off"))
    assert "--device cuda --amp bf16" in msg and "records no precision" not in msg


# ---- the backbone's numerics: TF32 off, deterministic cuDNN, no autotuning, restored afterwards ----

def _flags() -> tuple:
    cudnn = torch.backends.cudnn
    return cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_cuda_math_sets_and_restores_the_process_wide_flags():
    before = _flags()
    with device_mod.cuda_math(deterministic=True, benchmark=False, tf32=False):
        assert _flags() == (True, False, False, False)
        with device_mod.cuda_math(deterministic=False, benchmark=True, tf32=True):
            assert _flags() == (False, True, True, True)
        assert _flags() == (True, False, False, False)
    assert _flags() == before
    with pytest.raises(RuntimeError), device_mod.cuda_math(deterministic=True, benchmark=True, tf32=False):
        raise RuntimeError("boom")
    assert _flags() == before


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_backbone_runs_deterministic_without_tf32_or_autotuning_and_leaves_flags_alone(amp):
    from featcache.pipeline.extraction.backbones import build_backbone

    bb = build_backbone("resnet18", "none", layer="maxpool", pool="avg")
    seen = []
    bb.model.register_forward_pre_hook(lambda _m, _i: seen.append((_flags(), torch.is_autocast_enabled("cpu"))))
    torch.backends.cudnn.benchmark = True  # a user's setting, e.g. left by fine-tuning in the same process
    try:
        before = _flags()
        runner = Runner(bb.model, bb.preprocess, torch.device("cpu"), amp=amp)
        with torch.inference_mode():
            runner(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
        assert seen == [((True, False, False, False), amp == "bf16")]
        assert _flags() == before
    finally:
        torch.backends.cudnn.benchmark = False


# ---- Runner.stream: one batch in flight on CUDA, in order, timed ------------------------------------

class _CountingRunner(Runner):
    submitted: int = 0

    def submit(self, u8):
        type(self).submitted += 1
        return super().submit(u8)


def _tiny_runner(cls=Runner) -> Runner:
    from featcache.pipeline.extraction.backbones import FeatureModel
    from featcache.pipeline.extraction.preprocess import imagenet_default

    spec = imagenet_default("test")
    spec = type(spec)(**{**spec.to_dict(), "resize_size": 18, "crop_size": 16})
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    return cls(FeatureModel(trunk.eval(), "avg").eval(), spec, torch.device("cpu"))


def _u8(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("lagged", [False, True])
def test_stream_yields_every_batch_in_order_with_its_features(lagged):
    runner = _tiny_runner(_CountingRunner)
    _CountingRunner.submitted = 0
    if lagged:  # what CUDA does: take the lagged path (features still computed on the CPU here)
        runner.device = torch.device("cuda")
    batches = [("a", _u8(3, 0)), ("b", _u8(2, 1)), ("c", None), ("d", _u8(1, 2))]
    phases: dict = {}
    got, submitted_when_yielded = [], []
    with torch.inference_mode():
        for tag, feats in runner.stream(iter(batches), phases):
            got.append((tag, feats))
            submitted_when_yielded.append(_CountingRunner.submitted)
        want = [(t, None if x is None else runner(x)) for t, x in batches]
    assert [t for t, _ in got] == ["a", "b", "c", "d"]
    for (_, f), (_, w) in zip(got, want):
        assert (f is None and w is None) or np.array_equal(f, w)
    # lagged: batch a is handed over only once batch b is queued behind it on the GPU
    assert submitted_when_yielded == ([2, 2, 3, 3] if lagged else [1, 2, 2, 3])
    assert set(phases) == {"decode_s", "compute_s"} and all(v >= 0 for v in phases.values())


def test_stream_on_the_cpu_goes_through_call_so_a_wrapped_runner_is_honoured():
    class Doubling(Runner):
        def __call__(self, u8):
            return 2 * super().__call__(u8)

    runner, x = _tiny_runner(Doubling), _u8(2, 3)
    with torch.inference_mode():
        (_, feats), = list(runner.stream([("only", x)]))
        np.testing.assert_array_equal(feats, 2 * Runner.__call__(runner, x))


# ---- fp16 overflow names the flag ---------------------------------------------------------------

def test_fp16_overflow_advice_names_the_amp_flag_only_when_fp32_is_finite():
    runner = _tiny_runner()
    x = _u8(2, 4)
    runner.amp = "fp16"  # as on CUDA; the overflowing fp16 result is simulated below
    overflowed = accel._Pending(runner, x, np.full((2, 4), np.inf, np.float32))
    with torch.inference_mode(), pytest.raises(FeatcacheError, match="--amp bf16") as e:
        overflowed.result()
    assert "\n" not in str(e.value) and "fp16" in str(e.value)
    with torch.no_grad():
        runner.model.trunk[0].weight.fill_(float("inf"))  # non-finite in fp32 too: the backbone's own fault
    with torch.inference_mode():
        assert np.isinf(accel._Pending(runner, x, np.full((2, 4), np.inf, np.float32)).result()).all()
    runner.amp = "bf16"  # only fp16 can overflow where fp32 does not
    assert np.isinf(accel._Pending(runner, x, np.full((2, 4), np.inf, np.float32)).result()).all()


# ---- --device edges ------------------------------------------------------------------------------

def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_index_beyond_the_device_count_is_a_one_line_error(monkeypatch, flat_cache, tmp_path):
    _fake_cuda(monkeypatch, 2)
    assert device_mod.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FeatcacheError, match=r"cuda:2: this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        device_mod.resolve_device("cuda:2")
    assert_one_line_error(invoke("fit-head", flat_cache, "-o", tmp_path / "run", "--device", "cuda:5"),
                          "cuda:5", "2 CUDA GPUs")
    assert not (tmp_path / "run").exists()


def test_unknown_or_absent_devices_are_one_line_errors(monkeypatch, flat_cache, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "nvidia_gpu_present", lambda: False)
    assert_one_line_error(invoke("fit-head", flat_cache, "-o", tmp_path / "r", "--device", "cuda"), "no CUDA GPU")
    assert_one_line_error(invoke("fit-head", flat_cache, "-o", tmp_path / "r", "--device", "gpu0"), "unknown device")
    with pytest.raises(FeatcacheError, match="unknown device 'meta'"):
        device_mod.resolve_device("meta")


def _failing_init(monkeypatch, message="CUDA initialization: The NVIDIA driver on your system is too old"):
    def is_available():
        warnings.warn(message, UserWarning, stacklevel=2)  # what torch does when cuInit fails (once per process)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)


def test_auto_says_in_one_warning_when_it_falls_back_to_the_cpu(monkeypatch, flat_cache, tmp_path):
    _failing_init(monkeypatch)
    with pytest.warns(FeatcacheWarning, match="--device auto: CUDA initialization: The NVIDIA driver .* too old; "
                                              "running on the CPU"):
        assert device_mod.resolve_device("auto") == torch.device("cpu")
    device_mod.cuda_probe.cache_clear()
    res = invoke("fit-head", flat_cache, "-o", tmp_path / "run", "--solver", "epochs", "--epochs", "2", "--json")
    assert res.exit_code == 0, res.stderr
    assert res.stderr_lines == ["featcache: warning: --device auto: CUDA initialization: The NVIDIA driver on your "
                                "system is too old; running on the CPU"]
    assert json.loads(res.stdout)["device"] == "cpu"


def test_auto_warns_for_a_gpu_torch_cannot_use_and_stays_quiet_without_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.warns(FeatcacheWarning, match="NVIDIA GPU is present but this torch .* built without CUDA"):
        assert device_mod.resolve_device("auto").type == "cpu"
    device_mod.cuda_probe.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: the CPU is what was asked for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_mod.resolve_device("auto").type == "cpu"
    device_mod.cuda_probe.cache_clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(device_mod, "nvidia_gpu_present", lambda: False)  # no NVIDIA GPU at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_mod.resolve_device("auto").type == "cpu"


def test_explicit_cuda_names_why_it_cannot_be_used(monkeypatch):
    _failing_init(monkeypatch, "CUDA initialization: CUDA driver initialization failed")
    with pytest.raises(FeatcacheError, match=r"--device cuda requested but no CUDA GPU is available "
                                             r"\(CUDA initialization: CUDA driver initialization failed\)"):
        device_mod.resolve_device("cuda")


# ---- fine-tuning: no host sync per step ---------------------------------------------------------

SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts reads of tensor values into Python made by finetune.py itself (each one is a host sync
    on CUDA); calls from torch's own code (e.g. AdamW reading its CPU step counter) are not counted."""
    from featcache.pipeline.use import finetune

    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            if sys._getframe(1).f_code.co_filename == finetune.__file__:
                calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


class _Backboned(nn.Module):
    """The shape finetune.train_epoch expects: .backbone (with a batch norm) and .head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _batches(n_batches: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n_batches)] + [(None, None)]  # a batch of unreadable files only


@pytest.mark.parametrize("n_batches", [2, 7])
def test_a_finetune_epoch_reads_values_back_once_not_per_step(n_batches, count_host_reads):
    from featcache.pipeline.use.finetune import evaluate, train_epoch

    torch.manual_seed(0)
    model = _Backboned()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    amp = torch.autocast("cpu", enabled=False)
    loader = _batches(n_batches)
    rec = train_epoch(model, loader, opt, torch.device("cpu"), amp)
    train_reads = list(count_host_reads)
    v = evaluate(model, loader, torch.device("cpu"), amp)
    assert train_reads == ["tolist"] and count_host_reads == ["tolist", "tolist"]  # once per pass, any length
    # and the sums read once are the per-batch values summed
    model.eval()
    with torch.no_grad():
        logits = [model(x) for x, _ in loader[:-1]]
    ys = [y for _, y in loader[:-1]]
    n = sum(len(y) for y in ys)
    want_loss = sum(float(nn.functional.cross_entropy(lg, y, reduction="sum")) for lg, y in zip(logits, ys)) / n
    want_acc = sum(int((lg.argmax(1) == y).sum()) for lg, y in zip(logits, ys)) / n
    assert v["loss"] == pytest.approx(want_loss, rel=1e-5) and v["accuracy"] == pytest.approx(want_acc)
    assert 0 <= rec["train_accuracy"] <= 1 and np.isfinite(rec["train_loss"])


def test_finetune_epoch_keeps_batch_norm_statistics_frozen(count_host_reads):
    from featcache.pipeline.use.finetune import train_epoch

    model = _Backboned()
    bn = copy.deepcopy(model.backbone[1].state_dict())
    train_epoch(model, _batches(3), torch.optim.AdamW(model.parameters(), lr=1e-2), torch.device("cpu"),
                torch.autocast("cpu", enabled=False))
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(model.backbone[1].state_dict()[k], bn[k], rtol=0, atol=0)
    assert not torch.equal(model.backbone[1].weight, bn["weight"])  # its affine parameters still trained


def test_extract_times_its_phases_through_the_stream(small_tree_ro, tmp_path):
    """decode_s and compute_s are still measured (by Runner.stream), and rows do not depend on batching."""
    from featcache.cache.store import read_cache

    res = _extract(small_tree_ro, tmp_path / "c.h5", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    phases = res.json()["phases"]
    assert phases["decode_s"] > 0 and phases["compute_s"] > 0
    copy_dir = tmp_path / "copy"
    shutil.copytree(small_tree_ro, copy_dir)
    res2 = _extract(copy_dir, tmp_path / "d.h5", "--device", "cpu", "--batch-size", "3")
    assert res2.exit_code == 0, res2.stderr
    a, b = read_cache(tmp_path / "c.h5"), read_cache(tmp_path / "d.h5")
    assert a.paths == b.paths
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)  # batch size: rounding only
