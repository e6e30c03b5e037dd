"""featcache.cache: the HDF5 feature cache and everything that writes or reads it.

store (schema, atomic writer, validating reader), featwrite (chunk-aligned feature blocks), journal
and saver (crash-safe per-batch parts), lock (one writer per cache), fingerprint (identity hashes),
info (what a cache holds). Imports nothing from ``featcache.pipeline``.
"""
