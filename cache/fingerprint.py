"""Fingerprints: a stable hash of everything that determines a cache's feature values."""
from __future__ import annotations

import hashlib
import json
import os


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(identity: dict) -> str:
    """sha256 over the canonical JSON of ``identity``.

    ``identity`` holds the backbone description (name, weights identity, layer, pool, init seed),
    the preprocessing spec, the image-decoding policy, the stored dtype and the schema version.
    It deliberately leaves out batch size, workers and device: they change speed, not values
    (CPU features are identical across batch sizes up to float rounding).
    """
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights identity, --verify-content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
