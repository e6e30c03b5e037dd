"""The error base of featcache, defined at the bottom of the stack so storage needs nothing above it.

``FeatcacheError`` is bad input or an impossible request: the CLI prints its message on one line
and exits non-zero, and Python callers catch it as ``featcache.FeatcacheError``. ``CacheError`` is
the storage layer's own kind of it (a missing, foreign, truncated or corrupt cache).
"""


class FeatcacheError(Exception):
    """Bad input or an impossible request; the message is shown to the user as-is."""


class CacheError(FeatcacheError):
    """A cache file that cannot be used as asked (missing, not a cache, incomplete, corrupt)."""


class FeatcacheWarning(UserWarning):
    """Something a user should know that does not stop the run (a class too small to stratify, ...);
    the CLI prints each as one ``featcache: warning: ...`` line on stderr."""
