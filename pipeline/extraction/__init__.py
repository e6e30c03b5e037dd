"""Stage 1: image folder -> HDF5 feature cache.

discover (which files, labels, splits) -> plan (reuse or compute each) -> loader (decode, resize,
crop: uint8 batches) -> accel/backbones (the frozen network) -> views (augmented rows) -> extract
(the runner that commits journal parts and assembles the cache through ``featcache.cache``).
"""
