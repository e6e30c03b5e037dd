"""The Python API: the CLI's own code paths, with typed results, and no files unless asked for.

    import featcache
    r = featcache.extract("digits/", "digits.h5", backbone="efficientnet_lite0")
    cache = featcache.open_cache("digits.h5")
    X, y = cache.arrays("train")
    sweep = featcache.fit_heads(cache, head="mlp", dropout=[0.2, 0.5])   # in memory
    sweep.leaderboard.to_pandas(); sweep.plot_curves(); sweep.save("runs/mlp")
    model = featcache.load("runs/mlp")
    model.predict(["photo.jpg"]); model.predict_features(X)

Every option of a sweep takes a scalar or a list (a list sweeps); ``hidden`` takes a width, a tuple
of widths (one MLP) or a list of those (a sweep of architectures).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.info import cache_info
from featcache.cache.store import FeatureCache, read_cache
from featcache.pipeline.config import ExtractConfig, HeadConfig
from featcache.pipeline.errors import FeatcacheError, python_names
from featcache.pipeline.heads.result import Leaderboard, SweepResult

__all__ = ["Cache", "ExtractResult", "Model", "SweepResult", "Leaderboard", "extract", "fit_heads", "load",
           "open_cache"]

PathLike = str | os.PathLike
SWEPT = ("dropout", "weight_decay", "l1", "optimizer", "lr", "momentum", "C", "k", "knn_temperature",
         "knn_voting")  # HeadConfig's tuple fields


def _options(cls, given: dict, fixed: tuple[str, ...], call: str) -> None:
    """TypeError for keyword arguments the config does not have (as for any Python function)."""
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{call}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(known))}")


# ---------------------------------------------------------------------------------------- extract
@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did (``featcache extract --json`` prints ``summary``)."""

    cache: Path
    n_images: int
    feature_dim: int
    extracted: int  # rows computed by the backbone in this run
    reused: int  # rows copied from the previous cache
    removed: int  # rows of the previous cache whose image is gone
    skipped: int  # unusable files (see skipped_files)
    skipped_files: list  # [(relative path, reason)], the first 20
    seconds: float
    summary: dict

    def open(self) -> "Cache":
        return Cache(self.cache)

    def __repr__(self) -> str:
        """One short line (the summary dict and skipped files are attributes, not the repr)."""
        return (f"ExtractResult({str(self.cache)!r}: {self.n_images} images x {self.feature_dim}, extracted "
                f"{self.extracted}, reused {self.reused}, removed {self.removed}, skipped {self.skipped}, "
                f"{self.seconds:.1f}s)")


def extract(image_dir: PathLike, cache: PathLike, *, progress: bool = False, **options: Any) -> ExtractResult | None:
    """Run the frozen backbone over ``image_dir`` once and store its features in ``cache``.

    Args:
        image_dir: an ImageFolder tree (``<class>/<image>`` or ``{train,val,test}/<class>/<image>``)
            or a .csv/.tsv manifest with columns path,label[,split] (pipeline/extraction/sources.py).
        cache: the .h5 file to create or update incrementally.
        progress: a tqdm bar on stderr.
        **options: any ``featcache extract`` option by its ExtractConfig name (``backbone``,
            ``weights``, ``layer``, ``pool``, ``batch_size``, ``dtype``, ``augment``, ...).
    Returns:
        An ExtractResult; None on a torchrun rank other than 0.
    """
    from featcache.pipeline.extraction.extract import run_extract

    _options(ExtractConfig, options, ("image_dir", "output"), "extract")
    with python_names():  # bad values are FeatcacheErrors naming these keywords, not CLI flags
        options = _coerce(options, ExtractConfig)
    if "augment_scale" in options:
        options["augment_scale"] = tuple(options["augment_scale"])
    with python_names():
        s = run_extract(ExtractConfig(image_dir=str(image_dir), output=str(cache), **options), progress=progress)
    if s is None:
        return None
    return ExtractResult(Path(s["cache"]), s["n_images"], s["feature_dim"], s["extracted"], s["reused"], s["removed"],
                         s["skipped"], [tuple(x) for x in s["skipped_files"]], s["seconds"], s)


# ---------------------------------------------------------------------------------------- caches
class Cache:
    """A feature cache opened for reading: arrays per split, paths, classes, recorded attributes.

    Features are read from disk on the first ``arrays`` call and kept.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._meta = read_cache(self.path, features=False)  # validates the file: one-line errors
        self._full: FeatureCache | None = None

    @property
    def features(self) -> FeatureCache:
        """The whole cache in memory (features included)."""
        if self._full is None:
            self._full = read_cache(self.path)
        return self._full

    @property
    def class_names(self) -> list[str]:
        return self._meta.class_names

    @property
    def attrs(self) -> dict:
        """Every recorded attribute (backbone, weights, layer, pool, preprocess, config, ...)."""
        return self._meta.attrs

    @property
    def fingerprint(self) -> str:
        return self._meta.fingerprint

    @property
    def n_views(self) -> int:
        return self._meta.n_views

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split (labeled or not)."""
        names, counts = np.unique(self._meta.split.astype(str), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Files extraction could not use, with the reason."""
        return list(self._meta.skipped)

    def _rows(self, split: str, labeled: bool | None) -> np.ndarray:
        if split not in ("train", "val", "test", "all"):
            raise FeatcacheError(f"unknown split {split!r}: choose train, val, test or all")
        m = self._meta
        mask = np.ones(m.n_rows, bool) if split == "all" else (m.split == split)
        if labeled is None:  # an unlabeled cache (images outside class folders) still has rows to give
            labeled = bool((m.labels >= 0).any())
        if labeled:
            mask &= m.labels >= 0
        return np.flatnonzero(mask)

    def arrays(self, split: str = "train", *, labeled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(X (n, D) float32, y (n,) int64 indices into ``class_names``) of one split (or "all").

        Args:
            labeled: True = labeled rows only; False = unlabeled rows too (y = -1); None (default) =
                labeled rows, or every row of a cache that has no labels at all.
        """
        rows = self._rows(split, labeled)
        return self.features.features[rows].astype(np.float32), self._meta.labels[rows].copy()

    def to_pandas(self):
        """One row per image: path (relative to the image folder or manifest), label (class name,
        None when unlabeled), label_index (-1 when unlabeled), split. pandas is optional."""
        try:
            import pandas as pd
        except ImportError:
            raise FeatcacheError("Cache.to_pandas() needs pandas: pip install pandas") from None
        m = self._meta
        names = [self.class_names[i] if i >= 0 else None for i in m.labels]
        return pd.DataFrame({"path": m.paths, "label": names, "label_index": m.labels, "split": m.split.astype(str)})

    def paths(self, split: str = "train", *, labeled: bool | None = None) -> list[str]:
        """Image paths (relative to the image folder) of the rows ``arrays`` returns, in order."""
        return [self._meta.paths[i] for i in self._rows(split, labeled)]

    def info(self) -> dict:
        """What ``featcache info --json`` prints."""
        return cache_info(str(self.path))

    def __repr__(self) -> str:
        a = self.attrs
        classes = f"{len(self.class_names)} classes" if self.class_names else "unlabeled"
        return (f"Cache({str(self.path)!r}: {self._meta.n_rows} x {a.get('feature_dim')} {a.get('dtype')}, "
                f"{classes}, splits {self.splits}, backbone {a.get('backbone')})")


def open_cache(path: PathLike) -> Cache:
    """Open a cache file for reading (one-line FeatcacheError if it is missing or not a whole cache)."""
    return Cache(path)


def _arrays_cache(data) -> FeatureCache:
    """(X, y) or {"train": (X, y), "val": ..., "test": ...} -> an in-memory FeatureCache."""
    splits = {"train": data} if isinstance(data, tuple) else dict(data)
    if "train" not in splits or set(splits) - {"train", "val", "test"}:
        raise FeatcacheError("fit_heads arrays: give (X, y) or a dict with 'train' and optionally 'val', 'test'")
    Xs, ys = [], []
    for split in ("train", "val", "test"):
        if split in splits:
            X, y = splits[split]
            X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
            if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
                raise FeatcacheError(f"fit_heads arrays: {split} needs X (n, D) and y (n,), got {X.shape} and {y.shape}")
            Xs.append((split, X))
            ys.append(y)
    if len({X.shape[1] for _, X in Xs}) != 1:
        raise FeatcacheError("fit_heads arrays: every split needs the same number of features")
    classes, labels = np.unique(np.concatenate(ys), return_inverse=True)
    n = sum(len(X) for _, X in Xs)
    split = np.array([s for s, X in Xs for _ in range(len(X))], dtype=object)
    # label_values: the labels as given (ints, strings, bools), so predictions come back in their type
    attrs = {"class_names": [str(c) for c in classes], "label_values": classes.tolist(), "fingerprint": "",
             "feature_dim": int(Xs[0][1].shape[1]), "n_views": 0, "backbone": None}
    return FeatureCache(path=Path("<arrays>"), attrs=attrs, labels=labels.astype(np.int64),
                        paths=[f"{s}/{i}" for i, s in enumerate(split)], split=split,
                        features=np.concatenate([X for _, X in Xs]), file_size=np.zeros(n, np.int64),
                        file_mtime_ns=np.zeros(n, np.int64))


# ---------------------------------------------------------------------------------------- heads
def _hidden(value) -> tuple[tuple[int, ...], ...]:
    """512 -> ((512,),); (512, 256) -> one MLP; [512, (256, 128), 0] -> a sweep (0 / () = linear)."""
    def arch(v) -> tuple[int, ...]:
        if isinstance(v, (int, np.integer)):
            return () if v == 0 else (int(v),)
        return tuple(int(w) for w in v)

    if isinstance(value, list):
        return tuple(dict.fromkeys(arch(v) for v in value))
    return (arch(value),)


def _train_size(s: Any) -> int:
    """One train_sizes item: images per class (a whole number) or "all" (0)."""
    if str(s).lower() == "all":
        return 0
    try:
        n = int(s)
    except (TypeError, ValueError):
        n = None
    if n is None or isinstance(s, bool) or (isinstance(s, float) and s != n):
        raise FeatcacheError(f"train_sizes takes images per class (whole numbers) or 'all', got {s!r}")
    return n


_SCALARS = {"float": float, "int": int, "str": str}


def _typed(name: str, value: Any, kind: str) -> Any:
    """``value`` as the ``kind`` (float, int, str, bool) a HeadConfig field holds; FeatcacheError
    naming the parameter for anything else (a string such as "1e-3,1e-2" is not a list)."""
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif not isinstance(value, (str, bool, np.bool_)):
        try:
            out = _SCALARS[kind](value)
            if kind == "int" and out != value:
                raise ValueError
            return out
        except (TypeError, ValueError):
            pass
    plural = " or a list of them" if name in SWEPT else ""
    raise FeatcacheError(f"{name} takes a{'n' if kind == 'int' else ''} {kind}{plural}, got {value!r}")


def _coerce(values: dict, cls=HeadConfig) -> dict:
    """Scalar fields of a config checked and converted by their declared type; swept fields
    (tuples) from a scalar or a list, each item converted."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    if "class_weight" in values:
        out["class_weight"] = _class_weight(values.pop("class_weight"))
    for name, v in values.items():
        text = str(hints[name])
        kind = next((k for k in ("bool", "float", "int", "str") if k in text), None)
        if v is None and "None" in text:  # an optional field left to its default (C: the head's own path)
            continue
        if name in SWEPT:
            items = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
            out[name] = tuple(_typed(name, x, kind) for x in items)
        elif kind and name not in ("hidden", "layers", "train_sizes") and not text.startswith("tuple"):
            out[name] = _typed(name, v, kind)
    return out


def _class_weight(value: Any):
    """None, "balanced", or {class: weight} -> HeadConfig's (class name, weight) pairs."""
    if value is None or value == "balanced":
        return value
    if isinstance(value, dict):
        try:
            return tuple(sorted((str(k), float(w)) for k, w in value.items()))
        except (TypeError, ValueError):
            pass
    raise FeatcacheError(f"class_weight takes 'balanced' or a dict {{class: weight}}, got {value!r}")


def head_config(*, cache: str | None = None, output: str | None = None, **options: Any) -> HeadConfig:
    """A HeadConfig from scalar-or-list keyword options (what ``fit_heads`` and HeadClassifier take)."""
    _options(HeadConfig, options, ("cache", "output"), "fit_heads")
    values = _coerce(options)
    if "hidden" in values:
        values["hidden"] = _hidden(values["hidden"])
    if "layers" in values:  # "b,c", ["c", "b,c"] or [["c"], ["b", "c"]], as fit-head --layers
        from featcache.pipeline.heads.layersets import parse_layer_sets

        values["layers"] = parse_layer_sets(values["layers"])
    if "train_sizes" in values:  # 10, [10, 50, "all"]: images per class, "all" (or 0) = every train row
        v = values["train_sizes"]
        v = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
        values["train_sizes"] = tuple(_train_size(s) for s in v)
    return HeadConfig(cache=cache, output=output, **values)


def fit_heads(data, *, output: PathLike | None = None, progress: bool = False, **options: Any) -> SweepResult:
    """Train every configuration in one stacked pass and rank them on the validation split.

    Args:
        data: a cache path, a ``Cache``, or arrays: ``(X, y)`` (a validation split is held out as
            ``val_fraction`` says) or ``{"train": (X, y), "val": (X, y), "test": (X, y)}``.
        output: a run folder to write (exactly what ``featcache fit-head -o`` writes); None = write nothing.
        **options: any fit-head option by its HeadConfig name, each a scalar or a list to sweep
            (``head``, ``hidden``, ``dropout``, ``weight_decay``, ``l1``, ``lr``, ``epochs``, ``C``, ...).
    Returns:
        The SweepResult: ``leaderboard`` (``.to_pandas()``), ``best``, ``history``, ``metrics``,
        ``predict(X)``, ``plot_*()`` Figures, ``save(run_dir)``.
    """
    with python_names():  # errors name the parameters of this call, not the command line's flags
        return _fit_heads(data, output, progress, options)


def _fit_heads(data, output, progress: bool, options: dict) -> SweepResult:
    from featcache.pipeline.heads.fit import fit_sweep, resolve_solver

    if isinstance(data, Cache):  # its metadata: fit-head's prepare reads the features once, itself
        fc, path = data._meta, str(data.path)
    elif isinstance(data, FeatureCache):
        fc, path = data, str(data.path)
    elif isinstance(data, (str, os.PathLike)):
        fc, path = read_cache(data, features=False), str(data)
    else:
        fc, path = _arrays_cache(data), None
    # as fit-head: solver auto (the exact probe for a plain L2 linear head) unless an epoch option is given
    solver, C, note = resolve_solver(options.get("head", HeadConfig.head), options.get("solver", "auto"),
                                     options.get("C"), options)  # the keywords given are the options set
    cfg = head_config(cache=path, **{**options, "solver": solver, "C": C})
    result = fit_sweep(cfg, fc, progress=progress, note=note)
    if output is not None:
        result.save(output)
    return result


# ---------------------------------------------------------------------------------------- models
class Model:
    """A saved model: a fit-head RUN_DIR (or head.pt), or a finetune FT_DIR.

    ``predict_features`` uses only the head (no backbone is built); ``predict`` on image files
    builds the backbone once, from what the run recorded, and runs extraction's own image path.
    """

    def __init__(self, path: PathLike):
        from featcache.pipeline.heads.headio import StandardizedHead, load_head
        from featcache.pipeline.use.model import FT_META

        self.path = Path(path)
        self.kind = "finetune" if (self.path / FT_META).exists() else "run"
        self._predictor = None
        if self.kind == "run":
            head, self.meta = load_head(self.path)
            self._head = StandardizedHead.from_metadata(head, self.meta).eval()
        else:
            self._head, self.meta = None, None
            self._predictor = self._load_predictor()
            self.meta = self._predictor.meta

    def _load_predictor(self):
        from featcache.pipeline.use.model import load_predictor

        if self._predictor is None:
            self._predictor = load_predictor(self.path)
        return self._predictor

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def predict_proba_features(self, X) -> np.ndarray:
        """Class probabilities (N, C) for raw cached features X (N, D) of the run's cache."""
        import torch

        from featcache.pipeline.heads.metrics import predict_proba

        if self._head is None:
            raise FeatcacheError(f"{self.path} is a fine-tuned model: its backbone changed, so cached features "
                                 "do not apply; use predict(images)")
        X = np.asarray(X, dtype=np.float32)
        from featcache.pipeline.heads.headio import input_dim

        if X.ndim != 2 or X.shape[1] != input_dim(self.meta):
            raise FeatcacheError(f"expected features of shape (N, {input_dim(self.meta)}), got {X.shape}")
        return predict_proba(self._head, torch.from_numpy(X)).numpy()

    def predict_features(self, X) -> np.ndarray:
        """Predicted labels (N,) for raw cached features X (N, D), in the label space the head was
        trained in: class indices for a head trained on a cache (as ``Cache.arrays`` returns them),
        the labels as given (ints, strings, bools) for one trained on arrays."""
        from featcache.pipeline.heads.headio import label_values

        return label_values(self.meta)[self.predict_proba_features(X).argmax(1)]

    def predict(self, images, *, top_k: int = 5, batch_size: int = 32, device: str = "auto") -> list[dict]:
        """Classify image files or folders, exactly as ``featcache predict`` does.

        Returns:
            One dict per file: {"path", "label", "top": [{"class", "probability"}, ...]}, or
            {"path", "error"} for a file that could not be read.
        """
        from featcache.pipeline.device import resolve_device
        from featcache.pipeline.use.predict import collect_inputs, predict_files

        inputs = (images,) if isinstance(images, (str, os.PathLike)) else tuple(images)
        found = collect_inputs(tuple(str(p) for p in inputs))
        if found.unreadable:
            raise FeatcacheError(f"cannot list folder {found.unreadable[0][0]}: {found.unreadable[0][1]}")
        if found.skipped_rows:
            raise FeatcacheError(f"manifest row {found.skipped_rows[0][0]}: {found.skipped_rows[0][1]}")
        return predict_files(self._load_predictor(), found.files, top_k, batch_size, resolve_device(device))

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}: {self.kind}, {len(self.class_names)} classes)"


def load(path: PathLike) -> Model:
    """Load a fit-head RUN_DIR (or head.pt) or a finetune FT_DIR."""
    return Model(path)
