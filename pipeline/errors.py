"""User-facing errors: the CLI prints the message on one line and exits non-zero.

One hierarchy for the whole package: the base lives in ``featcache.cache.errors`` (storage is the
bottom layer and imports nothing above it); the pipeline raises the base or its subclasses.

Messages name options the way the caller spelt them: ``opt("weight_decay")`` is ``--weight-decay``
by default (the command line) and ``weight_decay`` inside ``python_names()``, which the Python API
enters, so a notebook user is never told about a flag they never typed.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

from featcache.cache.errors import CacheError, FeatcacheError, FeatcacheWarning

__all__ = ["CacheError", "FeatcacheError", "FeatcacheWarning", "opt", "python_names"]

_PYTHON = contextvars.ContextVar("featcache_python_names", default=False)


def opt(name: str) -> str:
    """An option in error messages: ``--flag-name`` for the command line, ``name`` for Python callers."""
    return name if _PYTHON.get() else "--" + name.replace("_", "-")


@contextmanager
def python_names():
    """Within this block, messages name options as Python parameters (``opt``)."""
    token = _PYTHON.set(True)
    try:
        yield
    finally:
        _PYTHON.reset(token)
