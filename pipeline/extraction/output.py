"""Where ``featcache extract`` writes, checked before any work (no torch import: the no-op check uses it too)."""
from __future__ import annotations

from pathlib import Path

from featcache.cache.atomic import check_output_name, real_path
from featcache.pipeline.errors import FeatcacheError


def cache_target(output: str) -> Path:
    """The real path of the cache ``output`` names, after checking that it can be written there.

    A symlinked cache (or a cache in a symlinked folder) is locked and written through where it
    points, so it stays a symlink and no other spelling of the path can write it at the same time.

    Raises:
        FeatcacheError: ``output`` is a folder, or the folder cannot receive the cache (missing,
            read-only, a file, or the name too long once featcache's temporary suffix is added).
    """
    if Path(output).is_dir():
        raise FeatcacheError(f"output {output} is a folder; give a cache file path such as {output}/cache.h5")
    target = real_path(output)
    check_output_name(target, "output")
    return target
