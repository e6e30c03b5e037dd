"""The backbone in its fastest faithful form on the device, and the batch tensors fed to it.

"Faithful" means the same function as the reference (fp32, eager, NCHW) up to float rounding:
tests/extraction/test_accel.py checks cosine similarity >= 0.999 per feature row against that reference.

CPU  : batch norm folded into the preceding convolution (one conv instead of conv + a full pass
       over the activations), weights and activations in channels_last (oneDNN's native NHWC
       layout, no reorders), optionally torch.compile (inductor, weights frozen) when the job is
       large enough to repay compiling. fp32 unless ``--amp bf16`` asks for bf16 autocast.
CUDA : the same plus autocast (``--amp``: bf16 where the GPU runs it natively, else fp16; ``off``
       is true fp32, TF32 disabled), uint8 batches copied from pinned memory without blocking and
       normalised on the GPU (a quarter of the bytes of a float batch cross the bus), features
       copied back into pinned memory without blocking while the next batch is queued
       (``Runner.stream``).

Reproducibility. The device type and autocast precision are part of the cache fingerprint
(``precision_record``): rows computed on the CPU and on a GPU, or in fp32 and bf16, never mix in
one cache. Within one precision a resumed or torchrun extraction is bit-equal to an uninterrupted
one on the CPU (fixed thread count, device.compute_threads) and on CUDA, where cuDNN runs only
deterministic algorithms chosen without per-process autotuning (``cudnn.benchmark`` stays off),
provided the GPU model and the library versions are the same. ``--compile`` keeps its form across
a resume (decided from the whole job), but inductor's kernels are not promised bit-equal to eager.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featcache.cache.fingerprint import fingerprint
from featcache.pipeline.device import cuda_math
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

AMP_MODES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The precision of a cache that records none: every cache written before featcache recorded the
# precision counts as CPU fp32, so those caches (and a CPU re-run) keep their fingerprint.
CPU_FP32 = {"device_type": "cpu", "amp": "off"}
FP16_MAX = 65504.0  # largest finite float16


def resolve_amp(amp: str, device: torch.device, optimize: bool = True) -> str:
    """``--amp`` on ``device`` -> the autocast precision used: "bf16", "fp16" or "off".

    auto: off on the CPU (features stay fp32) and with --no-optimize (the reference); on CUDA bf16
    where the GPU runs it natively (compute capability 8.0+: Ampere, Hopper, ...), whose fp32 range
    cannot overflow, else fp16.

    Args:
        amp: the ``amp`` option (auto, bf16, fp16 or off); device: where the backbone runs;
        optimize: the ``optimize`` option.
    Returns:
        The resolved mode; FeatcacheError for an unknown mode, or fp16 on the CPU.
    """
    if amp not in AMP_MODES:
        raise FeatcacheError(f"unknown --amp {amp!r}: choose auto, bf16, fp16 or off")
    if amp == "auto":
        if device.type != "cuda" or not optimize:
            return "off"
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise FeatcacheError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off")
    return amp


def precision_record(device: torch.device, amp: str) -> dict:
    """How the features are computed: ``{"device_type": "cpu"|"cuda", "amp": "off"|"bf16"|"fp16"}``
    (``amp`` as resolve_amp resolved it)."""
    return {"device_type": device.type, "amp": amp}


def precision_identity(record: dict) -> dict:
    """What the precision adds to the cache identity (what the fingerprint covers): nothing for
    CPU fp32, so caches made before the record existed keep their fingerprint; else ``{"precision": record}``."""
    return {} if record == CPU_FP32 else {"precision": dict(record)}


def recorded_precision(description: Mapping | None) -> dict:
    """The precision record in a cache's ``description`` attribute (none recorded: CPU fp32)."""
    rec = (description or {}).get("precision")
    return dict(rec) if isinstance(rec, Mapping) else dict(CPU_FP32)


def _precision_words(rec: Mapping) -> tuple[str, str]:
    """(how it reads in a sentence, the flags that reproduce it)."""
    if rec["device_type"] == "cpu":
        return ("on the CPU in fp32", "--device cpu") if rec["amp"] == "off" else \
            (f"on the CPU with {rec['amp']} autocast", f"--device cpu --amp {rec['amp']}")
    how = "in fp32" if rec["amp"] == "off" else f"with {rec['amp']} autocast"
    return f"on {rec['device_type'].upper()} {how}", f"--device {rec['device_type']} --amp {rec['amp']}"


def precision_conflict(old_attrs: Mapping, base_identity: dict, record: dict) -> str | None:
    """Why rows computed as ``record`` may not join the cache whose attributes are ``old_attrs``.

    Answers only for a cache this run would extend but for the precision (its fingerprint is
    that of ``base_identity`` under its own recorded precision); None when the precisions agree
    or something else differs too (the caller's message names that).

    Args:
        old_attrs: the existing cache's attributes; base_identity: this run's identity without the
        precision (extract.cache_identity); record: this run's precision_record.
    """
    old = recorded_precision(old_attrs.get("description"))
    if old == record or fingerprint({**base_identity, **precision_identity(old)}) != old_attrs.get("fingerprint"):
        return None
    was, flags = _precision_words(old)
    if "precision" not in (old_attrs.get("description") or {}):
        was += " (it records no precision: a CPU cache, or a GPU one made before featcache recorded it)"
    return (f"was extracted {was} and this run would add rows computed {_precision_words(record)[0]}; rows of "
            f"two precisions never mix in one cache: re-run with {flags} to update it, or pass --overwrite "
            "to re-extract every image")


@dataclass(frozen=True)
class Accel:
    """How the backbone runs; reported in the extract summary. Of it only the precision is part of
    the fingerprint (precision_record); layout, folding and compiling are not."""

    channels_last: bool  # NHWC activations and weights
    folded_bn: int = 0  # batch norms folded into convolutions
    autocast: torch.dtype | None = None  # autocast dtype (--amp); None = fp32 (TF32 off)
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


class _Pending:
    """One batch's features, on their way to the host (CUDA) or already there (CPU)."""

    def __init__(self, runner: "Runner", u8: torch.Tensor | None, host, done=None):
        self.runner, self.u8, self.host, self.done = runner, u8, host, done

    def result(self) -> np.ndarray:
        """Features (N, D) float32 on the host; waits for the GPU only here."""
        if self.done is not None:
            self.done.synchronize()  # the copy into pinned memory has landed
        out = self.host.numpy() if isinstance(self.host, torch.Tensor) else self.host
        if self.runner.amp == "fp16" and not np.isfinite(out).all():
            self.runner.check_fp16_overflow(self.u8)
        return out


class Runner:
    """The backbone in its fast form: ``runner(u8 batch) -> features (N, D) float32 numpy``.

    Only ``model.trunk`` (of a backbones.FeatureModel) is replaced, in place, so hooks registered
    on ``model`` itself keep firing and ``model`` is what runs.

    Args:
        optimize: BN folding + channels_last; False runs the reference: eager, NCHW.
        compile_model: torch.compile the trunk now (its cost is timed and reported).
        compile_fallback: if compiling fails, run uncompiled (--compile auto) instead of raising.
        batch_size: compiled calls are padded to this many images.
        amp: autocast precision (``--amp``: auto, bf16, fp16 or off; see resolve_amp). Whatever it
            is, TF32 stays off and cuDNN runs deterministic algorithms without autotuning, so the
            same batch gives the same bits in every process (a resume, a torchrun rank).
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, device: torch.device, optimize: bool = True,
                 compile_model: bool = False, batch_size: int = 64, compile_fallback: bool = False,
                 amp: str = "auto"):
        self.model = model.eval().to(device)
        self.device = device
        folded = 0
        if optimize:
            model.trunk, folded = fold_batchnorm(model.trunk)
            model.to(device=device, memory_format=torch.channels_last)
        self.normalize = Normalizer(spec, device, channels_last=optimize)
        self.amp = resolve_amp(amp, device, optimize)
        self.accel = Accel(optimize, folded, AMP_DTYPES.get(self.amp))
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

    def _forward(self, u8: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> features (N, D) float32 on the device (queued, not waited for)."""
        n, pad_to = u8.shape[0], self.accel.pad_to
        if pad_to is not None and n < pad_to:  # compiled: one static shape, no recompiles for short batches
            u8 = torch.cat([u8, u8.new_zeros((pad_to - n, *u8.shape[1:]))])
        x = self.normalize(u8)
        amp = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        # Algorithms are picked when an op is queued, so the settings need only cover the queuing.
        with cuda_math(deterministic=True, benchmark=False, tf32=False), amp:
            feats = self.model(x)
        return feats[:n].float()

    def submit(self, u8: torch.Tensor) -> _Pending:
        """Queue one batch; ``.result()`` of the answer gives its features. Call under inference_mode.

        CUDA: the features are copied into pinned host memory without blocking, so the host can
        queue the next batch before this one finishes. CPU: computed now."""
        feats = self._forward(u8, self.accel.autocast)
        if feats.device.type != "cuda":
            return _Pending(self, u8, feats.numpy())
        host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
        stream = torch.cuda.current_stream(feats.device)  # the device's own, also when it is not the current device
        host.copy_(feats, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)  # after the copy
        return _Pending(self, u8, host, done)

    def __call__(self, u8: torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) -> features (N, D) float32 on the CPU. Call under inference_mode."""
        return self.submit(u8).result()

    def stream(self, batches: Iterable[tuple[Any, torch.Tensor | None]],
               phases: dict | None = None) -> Iterator[tuple[Any, np.ndarray | None]]:
        """``(tag, u8 batch or None)`` -> ``(tag, features or None)``, in order. Call under inference_mode.

        CUDA: batch b+1 is queued on the GPU before batch b's features are waited for, so the GPU
        does not idle while the host checks and stores a batch (one blocking copy per batch did
        that). CPU: each batch is computed (``self(u8)``) when it arrives.

        Args:
            batches: tagged uint8 batches (None: nothing usable in it).
            phases: if given, "decode_s" += seconds spent waiting for ``batches`` and "compute_s"
                += seconds spent queuing the backbone and waiting for its features.
        """
        lag = 1 if self.device.type == "cuda" else 0
        held: collections.deque = collections.deque()
        clock = _PhaseClock(phases)
        it = iter(batches)
        while True:
            with clock("decode_s"):
                item = next(it, None)
            if item is None:
                break
            tag, u8 = item
            with clock("compute_s"):
                held.append((tag, None if u8 is None else self.submit(u8) if lag else _Pending(self, None, self(u8))))
            while len(held) > lag:
                yield self._collect(held.popleft(), clock)
        while held:
            yield self._collect(held.popleft(), clock)

    @staticmethod
    def _collect(entry: tuple, clock: "_PhaseClock") -> tuple[Any, np.ndarray | None]:
        tag, pending = entry
        with clock("compute_s"):
            return tag, None if pending is None else pending.result()

    def check_fp16_overflow(self, u8: torch.Tensor | None) -> None:
        """Raise the ``--amp`` advice if fp32 computes finite features where fp16 autocast did not
        (activations beyond fp16's range); otherwise return and let the caller report the
        non-finite features as the backbone's own (its --weights, its --layer)."""
        if u8 is None:
            return
        with torch.inference_mode():
            ref = self._forward(u8, None).cpu().numpy()
        if np.isfinite(ref).all():
            raise FeatcacheError(
                f"fp16 autocast overflowed: the backbone's activations exceed fp16's range (+-{FP16_MAX:g}) and the "
                "features came out non-finite, while fp32 computes them finite; re-run with --amp bf16 (or --amp off "
                "for fp32); the cache is unchanged")


class _PhaseClock:
    """Adds the seconds spent inside ``with clock(name):`` to ``phases[name]`` (no-op without phases)."""

    def __init__(self, phases: dict | None):
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.phases is not None:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
