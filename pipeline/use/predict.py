"""``featcache predict``: images -> the same preprocessing and backbone as extraction -> head -> top-k."""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from featcache.pipeline.device import resolve_device
from featcache.pipeline.extraction.discover import walk_images
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.accel import Runner
from featcache.pipeline.extraction.loader import ImageFiles, collate
from featcache.pipeline.use.model import Predictor, load_predictor


@dataclass(frozen=True)
class PredictConfig:
    model: str
    inputs: tuple[str, ...]
    top_k: int = 5
    batch_size: int = 32
    device: str = "auto"
    csv_path: str | None = None


def collect_files(inputs: tuple[str, ...]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); missing paths are an error."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files += walk_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise FeatcacheError(f"no such file or folder: {p}")
    if not files:
        raise FeatcacheError("no images to predict (folders had no image files)")
    return files


def _round_like_cache(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The head was trained on features stored in the cache's dtype; round the same way so predict
    # reproduces the cached-feature predictions exactly.
    return features.to(dtype).float() if dtype != torch.float32 else features


@torch.inference_mode()
def predict_files(pred: Predictor, files: list[Path], top_k: int, batch_size: int,
                  device: torch.device, progress: bool = False) -> list[dict]:
    """One dict per file: {path, label, top: [{class, probability}...]} or {path, error}.

    Images go through extraction's own path (the same decoding, JPEG draft policy, resize/crop
    stage and backbone form), so predictions on cached images equal the cached-feature ones.
    """
    ec = pred.extract_config
    dataset = ImageFiles("", [str(f) for f in files], pred.preprocess, ec.draft)
    runner = Runner(pred.model.backbone, pred.preprocess, device, optimize=ec.optimize)
    head = pred.model.head.to(device).eval()
    k = max(1, min(top_k, len(pred.class_names)))
    out: list[dict] = []
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for s in range(0, len(files), batch_size):
        _, x, reasons = collate([dataset[i] for i in range(s, min(s + batch_size, len(files)))])
        chunk = files[s: s + batch_size]
        out += [{"path": str(f), "error": r} for f, r in zip(chunk, reasons) if r]
        if x is not None:
            feats = _round_like_cache(torch.from_numpy(runner(x)).to(device), pred.feature_dtype)
            top_p, top_i = torch.softmax(head(feats), dim=1).cpu().topk(k, dim=1)
            ok = [f for f, r in zip(chunk, reasons) if not r]
            for f, ps, idx in zip(ok, top_p.tolist(), top_i.tolist()):
                out.append({"path": str(f), "label": pred.class_names[idx[0]],
                            "top": [{"class": pred.class_names[i], "probability": p} for p, i in zip(ps, idx)]})
        bar.update(len(chunk))
    bar.close()
    order = {str(f): n for n, f in enumerate(files)}
    return sorted(out, key=lambda r: order[r["path"]])


def write_csv(rows: list[dict], path: str, k: int) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "error"] + [c for j in range(1, k + 1) for c in (f"class_{j}", f"prob_{j}")])
        for r in rows:
            tops = [c for t in r.get("top", []) for c in (t["class"], f"{t['probability']:.6f}")]
            w.writerow([r["path"], r.get("label", ""), r.get("error", "")] + tops)


def run_predict(cfg: PredictConfig, progress: bool = True) -> dict:
    if cfg.top_k < 1 or cfg.batch_size < 1:
        raise FeatcacheError("--top-k and --batch-size must be at least 1")
    pred = load_predictor(cfg.model)
    files = collect_files(cfg.inputs)
    rows = predict_files(pred, files, cfg.top_k, cfg.batch_size, resolve_device(cfg.device), progress)
    if cfg.csv_path:
        write_csv(rows, cfg.csv_path, min(cfg.top_k, len(pred.class_names)))
    return {"model": cfg.model, "kind": pred.kind, "n_files": len(files),
            "n_errors": sum("error" in r for r in rows), "predictions": rows}


def predict_lines(summary: dict) -> list[str]:
    lines = []
    for r in summary["predictions"]:
        if "error" in r:
            lines.append(f"{r['path']}\tERROR {r['error']}")
        else:
            lines.append(f"{r['path']}\t" + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    lines.append(f"{summary['n_files']} files, {summary['n_errors']} unreadable")
    return lines

