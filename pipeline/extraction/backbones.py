"""Frozen backbones: any torchvision classification model, any timm model (``timm:NAME``), and
EfficientNet-Lite0 with bundled weights (a timm model whose weights ship with the package).

``build_backbone`` returns a module mapping a normalised batch (N, 3, H, W) to features (N, D), the
preprocessing that belongs to its weights, and a JSON-able description that the cache fingerprints.
With ``layer="a,b,c"`` the backbone runs once and each layer, reduced by ``pool``, fills its own
column range of the D features (``Backbone.layers``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from featcache.cache.fingerprint import file_sha256
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.layers import probe_shapes, split_layers, timm_trunk, torchvision_trunk
from featcache.pipeline.extraction.preprocess import PreprocessSpec, from_torchvision_weights, imagenet_default
from featcache.pipeline.extraction.timm_zoo import LITE0, LITE0_TIMM_ARCH, OFFLINE_HINT, build_timm, is_timm

__all__ = ["Backbone", "FeatureModel", "build_backbone", "feature_dim", "load_state_dict_file",
           "LITE0", "LITE0_TIMM_ARCH", "OFFLINE_HINT", "POOLS"]

CLASSIFIER_NAMES = ("fc", "classifier", "heads", "head")
POOLS = ("avg", "max", "flatten")


@dataclass
class Backbone:
    model: nn.Module  # (N, 3, H, W) -> (N, D), eval mode, no grad
    preprocess: PreprocessSpec
    description: dict  # name, weights identity, layer, pool, init seed: all fingerprinted
    feature_dim: int
    # one dict per layer, in column order: name, shape (per image, before pooling), pool
    # (avg | max | flatten; none = already flat), start, stop (its columns of the D features)
    layers: list[dict] = field(default_factory=list)


def _reduce(out: torch.Tensor, pool: str) -> torch.Tensor:
    if out.ndim == 4 and pool == "avg":  # (N, C, H, W) -> (N, C)
        return out.mean(dim=(2, 3))
    if out.ndim == 4 and pool == "max":
        return out.amax(dim=(2, 3))
    if out.ndim == 3 and pool in ("avg", "max"):  # tokens (N, L, C) -> (N, C)
        return out.mean(dim=1) if pool == "avg" else out.amax(dim=1)
    return out.flatten(1)


class FeatureModel(nn.Module):
    """Wrap a trunk and reduce whatever it returns to (N, D).

    The trunk returns one tensor, a ``{"feat": tensor}`` dict, or a list of tensors (several
    layers); ``pool`` is one mode for all of them or one per list entry. Lists are concatenated.
    """

    def __init__(self, trunk: nn.Module, pool: str | tuple[str, ...]):
        super().__init__()
        self.trunk = trunk
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(x)
        if isinstance(out, dict):  # create_feature_extractor returns {"feat": tensor}
            out = out["feat"]
        if isinstance(out, torch.Tensor):
            return _reduce(out, self.pool if isinstance(self.pool, str) else self.pool[0])
        pools = [self.pool] * len(out) if isinstance(self.pool, str) else self.pool
        return torch.cat([_reduce(o, p) for o, p in zip(out, pools)], dim=1)


def feature_dim(model: nn.Module, crop_size: int) -> int:
    """Width D of ``model``'s (N, D) output for one (3, crop, crop) image (meta device when possible)."""
    return probe_shapes(model, crop_size)[0][0]


def load_state_dict_file(path: str) -> dict:
    """Load a state_dict safely (``weights_only=True``: a pickle that would run code is refused)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeatcacheError(f"weights file not found: {path}") from None
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError for non-torch files
        text = str(e).strip()  # PyTorch's weights_only text is a paragraph; keep only what went wrong
        if "WeightsUnpickler error:" in text:
            why = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        else:
            why = text.split("\n")[0]
        first = " ".join(why.split())[:200] if why.strip() else type(e).__name__
        raise FeatcacheError(f"refusing to load {path}: not a plain state_dict ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatcacheError(f"{path} does not hold a state_dict of tensors")
    return obj


def _mismatch(own: dict, state: dict) -> list[str]:
    """What keeps ``state`` from loading into a model whose state_dict is ``own``, tensor by tensor."""
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    out = []
    if wrong:
        k = wrong[0]
        out.append(f"{len(wrong)} tensor(s) of another shape (first {k}: file {tuple(state[k].shape)}, "
                   f"model {tuple(own[k].shape)})")
    if missing:
        out.append(f"{len(missing)} missing from the file (first {missing[0]})")
    if extra:
        out.append(f"{len(extra)} the model does not have (first {extra[0]})")
    return out


def load_into(model: nn.Module, state: dict, path: str, name: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch is one line naming the tensors
    (PyTorch's own message starts with "Error(s) in loading state_dict for ResNet:" and names them
    only on the lines after it).

    Args:
        path: the weights file (for the message); name: the backbone as the user gave it.
    Raises:
        FeatcacheError: a tensor is missing, extra or of another shape.
    """
    problems = _mismatch(model.state_dict(), state)
    if problems:
        raise FeatcacheError(f"{path} does not fit {name}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the key and shape comparison did not foresee
        why = " ".join(" ".join(str(e).split("\n")[:3]).split())[:300]
        raise FeatcacheError(f"{path} does not fit {name}: {why}") from None


def _torchvision(name: str, weights: str, seed: int) -> tuple[nn.Module, PreprocessSpec, str]:
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise FeatcacheError(
            f"unknown backbone {name!r}: use a torchvision classification model "
            f"(e.g. resnet18, resnet50, alexnet, vgg16, mobilenet_v3_large), timm:NAME or {LITE0}"
        )
    if weights.lower() == "none":
        torch.manual_seed(seed)  # random init is reproducible: same seed, same features
        model = torchvision.models.get_model(name, weights=None)
        return model, imagenet_default("imagenet default (random init)"), f"random(seed={seed})"
    if os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.exists(weights):
        from featcache.pipeline.extraction.timm_zoo import load_weights_file

        model = torchvision.models.get_model(name, weights=None)
        load_into(model, load_weights_file(weights), weights, name)
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


def _default_spatial(name: str, model: nn.Module, timm_model: bool, pool: str) -> tuple[nn.Module, str]:
    """``--pool avg|max`` without ``--layer``: pool the last spatial map, the one the model's own
    pooling reads (timm: ``forward_features``; torchvision: the input of ``avgpool``)."""
    if timm_model:
        return timm_trunk(model, ["features"], name), "features"
    if isinstance(getattr(model, "avgpool", None), nn.Module):
        model.avgpool = nn.Identity()  # the "avgpool" node now yields its input, e.g. resnet18 (512, 7, 7)
        return create_feature_extractor(model, return_nodes={"avgpool": "feat"}), "input of avgpool"
    raise FeatcacheError(f"--pool {pool} needs a spatial layer for {name}: pass --layer NODE "
                         f"(`featcache layers {name}` lists them)")


def _pools(names: list[str], shapes: list[tuple[int, ...]], pool: str | None) -> list[str]:
    """Each layer's reduction: ``pool`` (avg by default) for maps and tokens, none for flat layers;
    avg/max asked of a layer with no spatial extent left is an error, not silently ignored."""
    out = []
    for n, s in zip(names, shapes):
        if len(s) >= 2:
            out.append(pool or "avg")
        elif pool in ("avg", "max"):
            raise FeatcacheError(f"--pool {pool}: layer {n} has no spatial extent left (output {s}); "
                                 "leave --pool unset or choose spatial layers")
        else:
            out.append("none")
    return out


def build_backbone(name: str, weights: str = "DEFAULT", layer: str | None = None,
                   pool: str | None = None, seed: int = 0) -> Backbone:
    """Build a frozen feature extractor.

    Args:
        name: torchvision model name, ``timm:NAME[.TAG][@SIZE]`` or ``efficientnet_lite0``.
        weights: ``DEFAULT``, a torchvision weights enum name, ``none`` (random, seeded) or a
            ``.safetensors`` / state_dict path.
        layer: one layer name or a comma list (``featcache layers NAME`` lists them); None =
            the classifier's input.
        pool: avg | max | flatten for spatial outputs; None = flatten (default layer) or avg.
        seed: seed for random init.
    Returns:
        A Backbone in eval mode with gradients off; ``layers`` gives each layer's columns.
    """
    if pool is not None and pool not in POOLS:
        raise FeatcacheError(f"unknown pool {pool!r}: choose from {', '.join(POOLS)}")
    timm_model = is_timm(name)
    model, spec, identity = build_timm(name, weights, seed) if timm_model else _torchvision(name, weights, seed)
    model.eval()
    if layer is None and pool in ("avg", "max"):
        trunk, layer_desc = _default_spatial(name, model, timm_model, pool)
        names = [layer_desc]
    elif layer is None and timm_model and name != LITE0:
        model.reset_classifier(0)  # timm's own way: forward() now ends at the pooled pre-logits
        layer_desc, names = "pre_logits", None
        trunk, pool = model, pool or "flatten"
    elif layer is None:  # (EfficientNet-Lite0 keeps its pre-timm:NAME description and fingerprint)
        layer_desc, names = _strip_classifier(model), None
        trunk, pool = model, pool or "flatten"
    else:
        names = split_layers(layer)
        trunk = (timm_trunk if timm_model else torchvision_trunk)(model, names, name)
        layer_desc = ",".join(names)
    shapes = probe_shapes(trunk, spec.crop_size)
    if None in shapes:
        raise FeatcacheError(f"layer {(names or [layer_desc])[shapes.index(None)]} of {name} outputs no tensor; "
                             f"`featcache layers {name}` lists the layers")
    if names is None:  # the classifier's input, flattened as it always was
        pools = ["flatten" if len(shapes[0]) >= 2 else "none"]
    else:
        pools = _pools(names, shapes, pool)
        pool = pool or "avg"
    fm = FeatureModel(trunk, pools[0] if names is None else tuple(pools)).eval()
    for p in fm.parameters():
        p.requires_grad_(False)
    layers, start = [], 0
    for n, s, p in zip(names or [layer_desc], shapes, pools):
        width = s[0] if p in ("avg", "max") and len(s) == 3 else s[-1] if p in ("avg", "max") else math.prod(s)
        layers.append({"name": n, "shape": list(s), "pool": p, "start": start, "stop": start + width})
        start += width
    desc = {"backbone": name, "weights": identity, "layer": layer_desc, "pool": pool, "init_seed": seed}
    if name == LITE0:
        desc["architecture"] = f"timm:{LITE0_TIMM_ARCH}"
    return Backbone(fm, spec, desc, start, layers)


def list_layers(name: str, seed: int = 0) -> dict:
    """Every name ``--layer`` accepts for ``name``, with its output shape at the backbone's input
    size and its width once pooled (random init: no weights are needed or downloaded).

    Returns:
        {"backbone", "input_size", "layers": [{"name", "shape", "features"}]} in input-to-output order.
    """
    from featcache.pipeline.extraction.layers import timm_layer_names, torchvision_nodes

    timm_model = is_timm(name)
    model, spec, _ = build_timm(name, "none", seed) if timm_model else _torchvision(name, "none", seed)
    model.eval()
    names = timm_layer_names(model) if timm_model else torchvision_nodes(model)[1]
    trunk = (timm_trunk if timm_model else torchvision_trunk)(model, names, name)
    shapes = probe_shapes(trunk, spec.crop_size)
    rows = [{"name": n, "shape": list(s), "features": s[0] if len(s) == 3 else s[-1]}
            for n, s in zip(names, shapes) if s is not None]
    return {"backbone": name, "input_size": spec.crop_size, "layers": rows}
