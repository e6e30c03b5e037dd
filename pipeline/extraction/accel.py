"""The backbone in its fastest faithful form on the device, and the batch tensors fed to it.

"Faithful" means the same function as the reference (fp32, eager, NCHW) up to float rounding:
tests/test_accel.py checks cosine similarity >= 0.999 per feature row against that reference.

CPU  : batch norm folded into the preceding convolution (one conv instead of conv + a full pass
       over the activations), weights and activations in channels_last (oneDNN's native NHWC
       layout, no reorders), optionally torch.compile (inductor, weights frozen) when the job is
       large enough to repay compiling. fp32 throughout.
CUDA : the same plus fp16 autocast, uint8 batches copied from pinned memory without blocking and
       normalised on the GPU (a quarter of the bytes of a float batch cross the bus).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.preprocess import PreprocessSpec

# glibc mallopt parameters (malloc.h) and values, bytes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD = 1 << 30  # while extracting: buffers up to 1 GiB come from, and go back to, the heap
# afterwards: where glibc's own dynamic thresholds settle once large blocks have been freed
# (mmap threshold capped at 32 MiB on 64-bit, trim threshold twice that)
SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD = 32 << 20, 64 << 20

COMPILE_MODES = ("auto", "on", "off")
# --compile auto: compile only when the job is large enough to repay compiling. On the 2-core
# AVX-512 CPU, `bench/extract.py --compile-check` measured ResNet-18 compiling in ~23 s with
# inductor's disk cache cold (~6 s warm) for a steady 62 -> 79 img/s, i.e. paying off after
# ~6.5k images; 10k leaves a margin for slower-compiling models. CUDA is unmeasured here (no GPU):
# there decoding usually bounds throughput, so compiling is left to large jobs or --compile on.
COMPILE_MIN_IMAGES = {"cpu": 10_000, "cuda": 50_000}


@dataclass(frozen=True)
class Accel:
    """How the backbone runs; reported in the extract summary (never part of the fingerprint)."""

    channels_last: bool  # NHWC activations and weights
    folded_bn: int = 0  # batch norms folded into convolutions
    autocast: torch.dtype | None = None  # CUDA mixed precision; None = fp32
    compiled: bool = False  # torch.compile (inductor)
    pad_to: int | None = None  # compiled: every call is padded to this many rows (one static shape)
    compile_seconds: float = 0.0  # compiling + the first batch
    compile_error: str = ""  # why --compile auto fell back to running uncompiled

    def describe(self) -> str:
        if not (self.channels_last or self.compiled or self.autocast):
            return "reference eager fp32"
        parts = ["fp32" if self.autocast is None else f"autocast {str(self.autocast).replace('torch.', '')}"]
        if self.channels_last:
            parts.append("channels_last")
        if self.folded_bn:
            parts.append(f"{self.folded_bn} BN folded")
        if self.compiled:
            parts.append(f"compiled in {self.compile_seconds:.1f}s")
        if self.compile_error:
            parts.append(f"not compiled ({self.compile_error})")
        return ", ".join(parts)


@contextlib.contextmanager
def heap_reuse(enabled: bool = True):
    """Serve large CPU tensors from the heap for the duration (Linux/glibc; a no-op elsewhere).

    PyTorch has no caching allocator on the CPU, and glibc hands every buffer over 32 MiB
    (ResNet-18's first activations at batch 64 are 205 MB) to mmap and back to the kernel on
    free, so each forward pays page faults and kernel page zeroing for every large activation.
    Raising the mmap and trim thresholds keeps freed activations in the heap for the next batch.
    Afterwards the thresholds go to where glibc's dynamic ones settle after large frees (setting
    them is the only interface; there is no "back to dynamic") and the heap is trimmed.
    """
    libc = None
    if enabled and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if not (libc.mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_THRESHOLD)):
                libc = None
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            libc = None
    try:
        yield libc is not None
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
            libc.malloc_trim(0)


class _LeafConvBN(fx.Tracer):
    """Keep convolutions and batch norms (including timm's subclasses) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _bn_tail(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What must still run after ``bn`` once its affine map is folded away, or None if unknown."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    try:  # timm's BatchNormAct2d is batch_norm -> drop -> act (EfficientNet-Lite0, ...)
        from timm.layers import BatchNormAct2d
    except ImportError:
        return None
    if type(bn) is BatchNormAct2d:
        return nn.Sequential(bn.drop, bn.act)
    return None


def _set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Fold every eval-mode BatchNorm2d that reads only a Conv2d's output into that conv.

    Returns (module, number folded); the module is returned unchanged when it cannot be traced.
    """
    try:
        gm = fx.GraphModule(module, _LeafConvBN().trace(module))
    except Exception:  # data-dependent control flow etc.: run unfolded rather than fail
        return module, 0
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None:
            continue
        src = node.args[0] if node.args else None
        conv = mods.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        tail = _bn_tail(bn)
        if not isinstance(conv, nn.Conv2d) or conv.training or len(src.users) != 1 or tail is None:
            continue
        _set_module(gm, src.target, fuse_conv_bn_eval(conv, bn))
        if isinstance(tail, nn.Identity):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            _set_module(gm, node.target, tail)
        folded += 1
    if not folded:
        return module, 0
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval(), folded


def compile_wanted(mode: str, device: torch.device, n_images: int) -> bool:
    """--compile on|off|auto -> whether to compile for a job of ``n_images`` images."""
    if mode not in COMPILE_MODES:
        raise FeatcacheError(f"unknown --compile {mode!r}: choose auto, on or off")
    if mode != "auto":
        return mode == "on"
    return n_images >= COMPILE_MIN_IMAGES.get(device.type, COMPILE_MIN_IMAGES["cuda"])


class Normalizer:
    """uint8 NHWC batch -> normalised float NCHW batch on the device, bit-identical to
    ``PreprocessSpec.transform()`` (same ops in the same order: to float, * 1/255, - mean, / std)."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        """Args: u8 (N, H, W, 3) uint8 on the CPU (pinned for CUDA). Returns (N, 3, H, W) float32."""
        x = u8.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a view; NHWC memory = channels_last
        x = x.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)
        return x if self.channels_last else x.contiguous()


class Runner:
    """The backbone in its fast form: ``runner(u8 batch) -> features (N, D) float32 numpy``.

    Only ``model.trunk`` (of a backbones.FeatureModel) is replaced, in place, so hooks registered
    on ``model`` itself keep firing and ``model`` is what runs.

    Args:
        optimize: BN folding + channels_last (+ fp16 autocast and cuDNN autotuning on CUDA);
            False runs the reference: eager fp32, NCHW.
        compile_model: torch.compile the trunk now (its cost is timed and reported).
        compile_fallback: if compiling fails, run uncompiled (--compile auto) instead of raising.
        batch_size: compiled calls are padded to this many images.
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, device: torch.device, optimize: bool = True,
                 compile_model: bool = False, batch_size: int = 64, compile_fallback: bool = False):
        self.model = model.eval().to(device)
        folded = 0
        if optimize:
            model.trunk, folded = fold_batchnorm(model.trunk)
            model.to(device=device, memory_format=torch.channels_last)
        self.normalize = Normalizer(spec, device, channels_last=optimize)
        autocast = torch.float16 if optimize and device.type == "cuda" else None
        if autocast is not None:
            torch.backends.cudnn.benchmark = True  # fixed shapes: time the conv algorithms once
        self.accel = Accel(optimize, folded, autocast)
        if compile_model:
            self._compile(spec, batch_size, compile_fallback)

    def _compile(self, spec: PreprocessSpec, batch_size: int, fallback: bool) -> None:
        eager, before, t0 = self.model.trunk, self.accel, time.perf_counter()
        # freezing: weights become constants, so inductor folds and pre-packs them once.
        self.model.trunk = torch.compile(eager, dynamic=False, options={"freezing": True})
        self.accel = replace(before, compiled=True, pad_to=batch_size)
        try:
            with torch.inference_mode():  # compile now, so its cost is measured and reported
                self(torch.zeros(1, spec.crop_size, spec.crop_size, 3, dtype=torch.uint8))
        except Exception as e:  # no C++ compiler, unsupported op, ...
            self.model.trunk, self.accel = eager, before
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            if not fallback:
                raise FeatcacheError(f"torch.compile failed ({reason}); run with --compile off") from None
            self.accel = replace(before, compile_error=reason)
            return
        self.accel = replace(self.accel, compile_seconds=time.perf_counter() - t0)

    def __call__(self, u8: torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) -> features (N, D) float32 on the CPU. Call under inference_mode."""
        n, pad_to = u8.shape[0], self.accel.pad_to
        if pad_to is not None and n < pad_to:  # compiled: one static shape, no recompiles for short batches
            u8 = torch.cat([u8, u8.new_zeros((pad_to - n, *u8.shape[1:]))])
        x = self.normalize(u8)
        amp = (torch.autocast(x.device.type, dtype=self.accel.autocast) if self.accel.autocast is not None
               else contextlib.nullcontext())
        with amp:
            feats = self.model(x)
        return feats[:n].float().cpu().numpy()
