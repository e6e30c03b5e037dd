"""``featcache export``: backbone + head as one self-contained file that loads without featcache.

``.pt2`` uses torch.export (load with ``torch.export.load(path).module()``); ``.pt`` uses TorchScript
(``torch.jit.load(path)``). Input: images preprocessed as recorded in the file's ``featcache.json``
(resize, center crop, scale to [0, 1], normalise), shape (N, 3, S, S); output: class probabilities
(N, C), equal to what ``featcache predict`` reports.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from featcache.cache.atomic import check_output_name, check_writable_parent, real_path, write_buffered
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.outputs import check_output_file
from featcache.pipeline.use.model import load_predictor

META_NAME = "featcache.json"


class Probabilities(nn.Module):
    """Classifier -> softmax, with the cache-dtype rounding that predict applies to features."""

    def __init__(self, classifier: nn.Module, feature_dtype: torch.dtype):
        super().__init__()
        self.classifier = classifier
        self.feature_dtype = feature_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.classifier.backbone(x).float()
        if self.feature_dtype != torch.float32:
            feats = feats.to(self.feature_dtype).float()
        return torch.softmax(self.classifier.head(feats), dim=1)


def run_export(model_path: str, output: str) -> dict:
    """Write MODEL as ``output`` (.pt2 or .pt); returns a summary with the recorded metadata."""
    out = Path(output)
    if out.suffix not in (".pt2", ".pt"):
        raise FeatcacheError("export output must end in .pt2 (torch.export) or .pt (TorchScript)")
    check_writable_parent(out, "export output")  # before the ~15 s of loading and tracing
    check_output_name(real_path(out), "export output")  # name too long / read-only: now, not after tracing
    check_output_file(out, [("model", model_path)], "export output")
    pred = load_predictor(model_path)
    module = Probabilities(pred.model, pred.feature_dtype).eval()
    size = pred.preprocess.crop_size
    example = torch.randn(2, 3, size, size)
    meta = {"format": "featcache-export", "class_names": pred.class_names, "preprocess": pred.preprocess.to_dict(),
            "input": f"float32 (N, 3, {size}, {size}), preprocessed as in 'preprocess'", "output": "probabilities (N, C)",
            "source": str(model_path), "backbone": pred.meta.get("backbone")}
    extra = {META_NAME: json.dumps(meta)}
    # torch.jit's deprecation notices speak to torch developers, not to someone exporting a model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        if out.suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})

            def save(fh):
                torch.export.save(program, fh, extra_files=extra)
        else:
            scripted = torch.jit.trace(module, example, check_trace=False)

            def save(fh):
                torch.jit.save(scripted, fh, _extra_files=extra)
    # serialised in memory, free space checked, then written whole: a full disk is one line, never a
    # C++ terminate (rc 134) inside torch's file writer that leaves a temporary behind
    write_buffered(out, save)
    return {"model": str(model_path), "output": str(out), "format": out.suffix[1:], "classes": pred.class_names,
            "input_size": size, "bytes": out.stat().st_size}
