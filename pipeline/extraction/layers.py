"""Named layers of a backbone, read through each family's own feature API, several in one pass.

timm: ``forward_intermediates`` (works on models torch.fx cannot trace, e.g. TF "SAME" padding).
The names are the modules of ``model.feature_info`` (every block for EfficientNet/MobileNet
families: ``stem``, ``blocks.0`` ...), plus ``features`` (``forward_features``: the last map before
pooling) and ``pre_logits`` (the classifier's input, pooled as the model itself pools). ViT blocks
come back as (N, C, h, w) maps of the patch tokens: the class (prefix) tokens are dropped there and
in ``features``; only ``pre_logits`` uses them (as the model's own head does).
torchvision: ``torchvision.models.feature_extraction`` graph nodes.
"""
from __future__ import annotations

import difflib
import inspect

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from featcache.pipeline.errors import FeatcacheError

FINAL = ("features", "pre_logits")  # timm names outside feature_info


def split_layers(layer: str) -> list[str]:
    """``"a, b,c"`` -> ["a", "b", "c"]; a name given twice is an error (its columns would repeat)."""
    names = [n.strip() for n in layer.split(",") if n.strip()]
    if not names:
        raise FeatcacheError(f"--layer {layer!r} names no layer")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FeatcacheError(f"--layer names {', '.join(dup)} more than once")
    return names


def _takes(fn, arg: str) -> bool:
    return arg in inspect.signature(fn).parameters


def timm_layer_names(model: nn.Module) -> list[str]:
    """Every name ``--layer`` accepts for a timm model, input to output."""
    if not hasattr(model, "forward_intermediates"):
        return list(FINAL)
    if _takes(model.forward_intermediates, "extra_blocks") and isinstance(getattr(model, "blocks", None), nn.Sequential):
        # EfficientNet / MobileNet families: index 0 is the stem, k is blocks[k - 1]
        return ["stem", *(f"blocks.{i}" for i in range(len(model.blocks))), *FINAL]
    return [f["module"] for f in model.feature_info] + list(FINAL)


def unknown_layer(layer: str, backbone: str, valid: list[str], listed_all: bool = True) -> FeatcacheError:
    close = difflib.get_close_matches(layer, valid, n=3, cutoff=0.5)
    names = ", ".join(valid) if listed_all else ", ".join(close or valid[-6:])
    more = "" if listed_all else f" (closest of {len(valid)}; `featcache layers {backbone}` lists them all)"
    return FeatcacheError(f"unknown layer {layer!r} for {backbone}; valid: {names}{more}")


class TimmLayers(nn.Module):
    """timm model -> [one tensor per requested layer, in the requested order], one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.inner = model  # "inner": finetune's blocks() looks through it
        self.names = list(names)
        valid = timm_layer_names(model)
        self.extra_blocks = bool(valid and valid[0] == "stem")
        self.index = {n: valid.index(n) for n in names if n not in FINAL}  # forward_intermediates index
        self.final = any(n in FINAL for n in names)
        self.prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)  # ViT class/register tokens

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fi = self.inner.forward_intermediates
        kw = {"extra_blocks": True} if self.extra_blocks else {}
        taken: dict[int, torch.Tensor] = {}
        final = None
        if self.index:
            idx = sorted(set(self.index.values()))
            if self.final:
                final, inter = fi(x, indices=idx, **kw)
            else:
                inter = fi(x, indices=idx, intermediates_only=True, stop_early=True, **kw)
            taken = dict(zip(idx, inter))
        elif self.final:
            final = self.inner.forward_features(x)
        out = []
        for n in self.names:
            if n == "pre_logits":
                out.append(self.inner.forward_head(final, pre_logits=True))
            elif n == "features":  # tokens (N, L, C): keep the patch tokens only
                out.append(final[:, self.prefix:] if final.ndim == 3 else final)
            else:
                out.append(taken[self.index[n]])
        return out


def timm_trunk(model: nn.Module, names: list[str], backbone: str) -> TimmLayers:
    valid = timm_layer_names(model)
    for n in names:
        if n not in valid:
            raise unknown_layer(n, backbone, valid)
    return TimmLayers(model, names)


class NodeList(nn.Module):
    """torchvision feature extractor {node: tensor} -> [tensor per name, in the requested order]."""

    def __init__(self, extractor: nn.Module, nodes: list[str]):
        super().__init__()
        self.inner = extractor  # "inner": finetune's blocks() looks through it
        self.nodes = list(nodes)  # the graph node each requested name resolves to

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.inner(x)
        return [out[n] for n in self.nodes]


def torchvision_nodes(model: nn.Module) -> tuple[list[str], list[str]]:
    """(every graph node, the short list people pick from): modules one and two deep (a module
    gives its last node's output) and top-level function nodes such as ``flatten``, graph order."""
    nodes = [n for n in get_graph_node_names(model.eval())[1] if n != "x"]
    last: dict[str, int] = {}  # a module sits where its last node is (what it returns)
    for i, n in enumerate(nodes):
        parts = n.split(".")
        for k in range(1, min(len(parts), 2) + 1):
            last[".".join(parts[:k])] = i
    return nodes, sorted(last, key=lambda m: (last[m], -m.count(".")))


def torchvision_trunk(model: nn.Module, names: list[str], backbone: str) -> nn.Module:
    nodes, short = torchvision_nodes(model)
    resolved = []
    for n in names:
        inside = [m for m in nodes if m.startswith(n + ".")]
        if n not in nodes and not inside:
            raise unknown_layer(n, backbone, short if len(short) <= 60 else nodes, listed_all=len(short) <= 60)
        resolved.append(n if n in nodes else inside[-1])  # a module gives its last node's output
    if len(names) == 1:  # one layer: the extractor itself, {"feat": tensor}, as before multi-layer existed
        return create_feature_extractor(model, return_nodes={names[0]: "feat"})  # (fine-tuned state_dict keys unchanged)
    unique = list(dict.fromkeys(resolved))
    return NodeList(create_feature_extractor(model, return_nodes={n: n for n in unique}), resolved)


def probe_shapes(trunk: nn.Module, crop_size: int) -> list[tuple[int, ...]]:
    """Per-image output shape of each of ``trunk``'s outputs for one (3, crop, crop) image.

    One real forward of a zero image: 30 ms for ResNet-18 here. The meta device would skip the
    arithmetic, but it needs a deep copy of the model, and its batch-norm decomposition imports
    torch._dynamo (1.3 s of start-up on the development machine): dearer for every backbone whose
    one-image forward takes under about a second.
    """
    x = torch.zeros(1, 3, crop_size, crop_size)
    with torch.inference_mode():
        out = trunk(x)
    outs = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
    # None for an output that is no tensor (torch.fx also names nodes such as ``x.shape``)
    return [tuple(int(s) for s in o.shape[1:]) if isinstance(o, torch.Tensor) else None for o in outs]
