"""Backbone + head as one image classifier, rebuilt from a fit-head RUN_DIR or a finetune FT_DIR.

A RUN_DIR holds head.pt, whose metadata records the extract configuration and the cache
fingerprint; the backbone is rebuilt from that configuration and its fingerprint re-computed, so a
head is never silently paired with a backbone that would produce different features. An FT_DIR
holds model.pt (a plain state_dict of the whole classifier) and model.json (its metadata).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featcache.cache.atomic import atomic_path, write_json
from featcache.cache.fingerprint import fingerprint
from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.backbones import build_backbone, load_state_dict_file
from featcache.pipeline.extraction.preprocess import PreprocessSpec
from featcache.pipeline.heads.headio import StandardizedHead, build_head, input_dim, load_head

FT_WEIGHTS = "model.pt"
FT_META = "model.json"


class Classifier(nn.Module):
    """Normalised images (N, 3, S, S) -> logits (N, C)."""

    def __init__(self, backbone: nn.Module, head: StandardizedHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class Predictor:
    model: Classifier  # eval mode
    preprocess: PreprocessSpec
    class_names: list[str]
    meta: dict  # head metadata (plus extract config); JSON-serialisable
    kind: str  # "run" (fit-head) | "finetune"

    @property
    def extract_config(self) -> ExtractConfig:
        """How the head's training features were extracted (the cache's recorded config)."""
        return ExtractConfig.from_dict(self.meta["extract_config"])

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype the head's training features were stored in (predict and export round to it)."""
        return getattr(torch, self.extract_config.dtype)


def _backbone_from_extract_config(ec: ExtractConfig, expected_fp: str | None):
    from featcache.pipeline.extraction.extract import cache_identity  # deferred: extract imports heavy I/O modules

    bb = build_backbone(ec.backbone, ec.weights, ec.layer, ec.pool, ec.seed)
    if expected_fp is not None and fingerprint(cache_identity(bb, ec.dtype, ec.draft)) != expected_fp:
        raise FeatcacheError(
            "the backbone rebuilt from the run's extract settings does not match the cache the head was "
            "trained on (weights file changed?); re-extract and re-fit"
        )
    return bb


def classifier_from_head(head: nn.Sequential, meta: dict, backbone: nn.Module) -> Classifier:
    return Classifier(backbone, StandardizedHead.from_metadata(head, meta)).eval()


def load_run(run_dir: str | Path) -> Predictor:
    """Rebuild backbone + head from a fit-head RUN_DIR (or a head.pt path)."""
    head, meta = load_head(run_dir)
    if not meta.get("extract_config"):  # a head trained on arrays through the Python API
        raise FeatcacheError(f"{run_dir}: the head was not trained on a featcache cache, so there is no backbone "
                             "to rebuild; predict from features instead (featcache.load(...).predict_features)")
    bb = _backbone_from_extract_config(ExtractConfig.from_dict(meta["extract_config"]), meta["cache_fingerprint"])
    if bb.feature_dim != input_dim(meta):
        raise FeatcacheError(f"backbone gives {bb.feature_dim} features, head expects {input_dim(meta)}")
    return Predictor(classifier_from_head(head, meta, bb.model), bb.preprocess, meta["class_names"], meta, "run")


def save_finetuned(ft_dir: Path, model: Classifier, meta: dict) -> None:
    ft_dir.mkdir(parents=True, exist_ok=True)
    # each file whole or not at all (a killed or full-disk save leaves no torn model.pt / model.json)
    with atomic_path(ft_dir / FT_WEIGHTS) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_json(ft_dir / FT_META, meta)


def load_finetuned(ft_dir: str | Path) -> Predictor:
    """Rebuild a fine-tuned classifier: architecture from model.json, every weight from model.pt."""
    ft_dir = Path(ft_dir)
    meta = json.loads((ft_dir / FT_META).read_text())
    ec = ExtractConfig.from_dict(meta["extract_config"])
    bb = build_backbone(ec.backbone, "none", ec.layer, ec.pool, ec.seed)  # every weight comes from model.pt
    model = classifier_from_head(build_head(meta), meta, bb.model)
    try:
        model.load_state_dict(load_state_dict_file(str(ft_dir / FT_WEIGHTS)))
    except RuntimeError as e:
        raise FeatcacheError(f"{ft_dir}: weights do not fit the recorded model ({str(e).splitlines()[0]})") from None
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    return Predictor(model.eval(), spec, meta["class_names"], meta, "finetune")


def load_predictor(path: str | Path) -> Predictor:
    """MODEL argument of predict/export/finetune: an FT_DIR, a RUN_DIR, or a head.pt file."""
    path = Path(path)
    if (path / FT_META).exists():
        return load_finetuned(path)
    if path.is_file() or (path / "head.pt").exists():
        return load_run(path)
    raise FeatcacheError(f"{path} is neither a fit-head run folder (head.pt) nor a finetune folder ({FT_META})")
