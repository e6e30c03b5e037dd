"""User-facing errors: the CLI prints the message on one line and exits non-zero.

One hierarchy for the whole package: the base lives in ``featcache.cache.errors`` (storage is the
bottom layer and imports nothing above it); the pipeline raises the base or its subclasses.
"""
from featcache.cache.errors import CacheError, FeatcacheError, FeatcacheWarning

__all__ = ["CacheError", "FeatcacheError", "FeatcacheWarning"]
