"""``featcache predict``: images -> the same preprocessing and backbone as extraction -> head -> top-k."""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from featcache.cache.atomic import atomic_open, check_writable_parent
from featcache.pipeline.device import resolve_device
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.accel import Runner
from featcache.pipeline.extraction.discover import display_name, walk_images
from featcache.pipeline.extraction.loader import ImageFiles, collate
from featcache.pipeline.extraction.sources import open_source, source_kind
from featcache.pipeline.outputs import check_output_file
from featcache.pipeline.use.model import Predictor, load_predictor


@dataclass(frozen=True)
class PredictConfig:
    model: str
    inputs: tuple[str, ...]
    top_k: int = 5
    batch_size: int = 32
    device: str = "auto"
    csv_path: str | None = None


@dataclass
class Inputs:
    """What ``predict`` reads, from files, folders and manifests (collect_inputs)."""

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder display path + "/", reason)
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)  # ("MANIFEST:LINE", reason)
    labels: dict[int, str] = field(default_factory=dict)  # file index -> a manifest row's label (accuracy)


def _add_manifest(found: Inputs, p: Path) -> None:
    """A .csv/.tsv manifest's listed images (sources.read_manifest), with their labels; its rows'
    splits are ignored (every listed image is predicted)."""
    disc = open_source(p)
    for rec in disc.records:
        if rec.label >= 0:
            found.labels[len(found.files)] = disc.class_names[rec.label]
        found.files.append(disc.root / rec.path)
    found.skipped_rows += [(display_name(p.parent / w), r) for w, r in disc.skipped]  # "dir/labels.csv:LINE"


def collect_inputs(inputs: tuple[str, ...]) -> Inputs:
    """Files as given, folders expanded to their images (sorted), manifests to their listed images
    (in path order); missing paths are an error. A folder that cannot be listed and a malformed
    manifest row are reported, never silently dropped."""
    found = Inputs()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            errors: list[tuple[str, str]] = []
            found.files += walk_images(p, errors=errors)
            found.unreadable += [(display_name(d) + "/", r) for d, r in errors]
        elif source_kind(p) == "manifest":
            _add_manifest(found, p)
        elif p.exists():
            found.files.append(p)
        else:
            raise FeatcacheError(f"no such file or folder: {display_name(p)}")
    if not found.files:
        first = (found.unreadable + found.skipped_rows)[:1]
        why = f" ({first[0][0]}: {first[0][1]})" if first else ""
        raise FeatcacheError(f"no images to predict (folders had no image files){why}")
    return found


def collect_files(inputs: tuple[str, ...]) -> tuple[list[Path], list[tuple[str, str]]]:
    """collect_inputs as (files, unreadable folders and malformed manifest rows as (where, reason))."""
    found = collect_inputs(inputs)
    return found.files, found.unreadable + found.skipped_rows


def _round_like_cache(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The head was trained on features stored in the cache's dtype; round the same way so predict
    # reproduces the cached-feature predictions exactly.
    return features.to(dtype).float() if dtype != torch.float32 else features


@torch.inference_mode()
def predict_files(pred: Predictor, files: list[Path], top_k: int, batch_size: int,
                  device: torch.device, progress: bool = False) -> list[dict]:
    """One dict per file, in input order: {path, label, top: [{class, probability}...]} or {path, error}.

    ``path`` is the file's ``display_name`` (valid UTF-8 whatever bytes the name holds). Images go
    through extraction's own path (the same decoding, JPEG draft policy, resize/crop stage and
    backbone form), so predictions on cached images equal the cached-feature ones.
    """
    ec = pred.extract_config
    dataset = ImageFiles("", [str(f) for f in files], pred.preprocess, ec.draft)
    runner = Runner(pred.model.backbone, pred.preprocess, device, optimize=ec.optimize)
    head = pred.model.head.to(device).eval()
    k = max(1, min(top_k, len(pred.class_names)))
    out: list[dict | None] = [None] * len(files)
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for s in range(0, len(files), batch_size):
        idx, x, reasons = collate([dataset[i] for i in range(s, min(s + batch_size, len(files)))])
        for i, r in zip(idx, reasons):
            if r:
                out[i] = {"path": display_name(files[i]), "error": r}
        if x is not None:
            feats = _round_like_cache(torch.from_numpy(runner(x)).to(device), pred.feature_dtype)
            top_p, top_i = torch.softmax(head(feats), dim=1).cpu().topk(k, dim=1)
            ok = [i for i, r in zip(idx, reasons) if not r]
            for i, ps, cls in zip(ok, top_p.tolist(), top_i.tolist()):
                out[i] = {"path": display_name(files[i]), "label": pred.class_names[cls[0]],
                          "top": [{"class": pred.class_names[c], "probability": p} for p, c in zip(ps, cls)]}
        bar.update(len(idx))
    bar.close()
    return out


def write_csv(rows: list[dict], path: str, k: int) -> None:
    """Predictions as CSV (LF line endings, RFC 4180 quoting), written atomically: a failure leaves
    any previous file at ``path`` as it was. No ``label`` column: it would repeat ``class_1``."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "error"] + [c for j in range(1, k + 1) for c in (f"class_{j}", f"prob_{j}")])
        for r in rows:
            tops = [c for t in r.get("top", []) for c in (t["class"], f"{t['probability']:.6f}")]
            w.writerow([r["path"], r.get("error", "")] + tops)


def run_predict(cfg: PredictConfig, progress: bool = True) -> dict:
    if cfg.top_k < 1 or cfg.batch_size < 1:
        raise FeatcacheError("--top-k and --batch-size must be at least 1")
    if cfg.csv_path:
        check_writable_parent(cfg.csv_path, "--csv")  # before any work, not after computing everything
        check_output_file(cfg.csv_path, [("model", cfg.model), *(("input", i) for i in cfg.inputs)], "--csv")
    pred = load_predictor(cfg.model)
    found = collect_inputs(cfg.inputs)
    files, unreadable = found.files, found.unreadable
    rows = predict_files(pred, files, cfg.top_k, cfg.batch_size, resolve_device(cfg.device), progress)
    errors = [r for r in rows if "error" in r]
    if len(errors) == len(rows):
        raise FeatcacheError(f"none of the {len(rows)} files could be read as an image "
                             f"(first: {errors[0]['path']}: {errors[0]['error']})")
    if cfg.csv_path:
        write_csv(rows, cfg.csv_path, min(cfg.top_k, len(pred.class_names)))
    return {"model": cfg.model, "kind": pred.kind, "n_files": len(files),
            "n_errors": len(errors), "predictions": rows,
            **({"unreadable_folders": [{"path": p, "reason": r} for p, r in unreadable]} if unreadable else {}),
            **({"skipped_rows": [{"path": p, "reason": r} for p, r in found.skipped_rows]} if found.skipped_rows else {}),
            **({"manifest_accuracy": manifest_accuracy(rows, found.labels, pred.class_names)} if found.labels else {})}


def manifest_accuracy(rows: list[dict], labels: dict[int, str], class_names: list[str]) -> dict:
    """Top-1 accuracy over the predicted files whose manifest row has a label among the model's classes.

    Args:
        rows: predict_files' output; labels: file index -> manifest label; class_names: the model's.
    Returns:
        {"n": scored rows, "correct", "accuracy" (None when n is 0), "not_scored": labeled rows
        whose label is not a class of the model or whose image could not be read}.
    """
    known = set(class_names)
    scored = [i for i, lab in labels.items() if lab in known and "error" not in rows[i]]
    correct = sum(rows[i]["label"] == labels[i] for i in scored)
    return {"n": len(scored), "correct": correct, "accuracy": correct / len(scored) if scored else None,
            "not_scored": len(labels) - len(scored)}


def tsv_field(text: str) -> str:
    """One TSV field: backslash, tab, newline and carriage return escaped (``\\t``, ``\\n``...),
    so a file name holding them cannot split a line or shift columns."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def predict_lines(summary: dict) -> list[str]:
    """Human output: one TSV line per file (path, then the top classes or ERROR reason), then a count."""
    lines = []
    for r in summary["predictions"]:
        if "error" in r:
            lines.append(f"{tsv_field(r['path'])}\tERROR {tsv_field(r['error'])}")
        else:
            lines.append(f"{tsv_field(r['path'])}\t" + "  ".join(f"{tsv_field(t['class'])} {t['probability']:.3f}"
                                                             for t in r["top"]))
    for f in summary.get("unreadable_folders", []):
        lines.append(f"{tsv_field(f['path'])}\tERROR {tsv_field(f['reason'])}")
    for f in summary.get("skipped_rows", []):
        lines.append(f"{tsv_field(f['path'])}\tERROR {tsv_field(f['reason'])}")
    lines.append(f"{summary['n_files']} files, {summary['n_errors']} unreadable"
                 + (f", {len(summary['unreadable_folders'])} folder(s) unreadable" if summary.get("unreadable_folders") else "")
                 + (f", {len(summary['skipped_rows'])} manifest row(s) skipped" if summary.get("skipped_rows") else ""))
    acc = summary.get("manifest_accuracy")
    if acc and acc["n"]:
        lines.append(f"accuracy {acc['accuracy']:.3f} ({acc['correct']}/{acc['n']} labeled manifest rows"
                     + (f"; {acc['not_scored']} not scored: label not a model class or image unreadable)"
                        if acc["not_scored"] else ")"))
    return lines
