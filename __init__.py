"""featcache: run a frozen CNN once, cache its features in HDF5, train many heads in seconds.

The public Python API (names resolve on first use, so ``import featcache`` costs no torch import)::

    import featcache
    featcache.extract("images/", "feats.h5", backbone="efficientnet_lite0")   # -> ExtractResult
    cache = featcache.open_cache("feats.h5"); X, y = cache.arrays("train")
    sweep = featcache.fit_heads(cache, head="mlp", dropout=[0.2, 0.5])         # -> SweepResult
    model = featcache.load("runs/a"); model.predict(["cat.jpg"])
    featcache.HeadClassifier(hidden=(512,)).fit(X, y)                           # scikit-learn estimator
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.2.0"

# public name -> module that defines it (imported lazily: see module docstring)
_EXPORTS = {
    "extract": "featcache.pipeline.api",
    "open_cache": "featcache.pipeline.api",
    "fit_heads": "featcache.pipeline.api",
    "load": "featcache.pipeline.api",
    "ExtractResult": "featcache.pipeline.api",
    "Cache": "featcache.pipeline.api",
    "SweepResult": "featcache.pipeline.api",
    "Model": "featcache.pipeline.api",
    "HeadClassifier": "featcache.pipeline.heads.estimator",
    "ExtractConfig": "featcache.pipeline.config",
    "HeadConfig": "featcache.pipeline.config",
    "FeatcacheError": "featcache.cache.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
