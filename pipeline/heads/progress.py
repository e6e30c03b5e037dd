"""Progress of a fit-head run: a tqdm bar on stderr, fed by the solvers without passing it around.

``fit_sweep(progress=True)`` opens the bar (``reporting``); the solvers call ``tick`` where work is
done — the exact probe once per pass over X, the epoch trainer once per epoch of a stack — and the
bar shows passes or epochs and their rate. Without an open bar ``tick`` does nothing, so library
callers and tests pay one context-variable read.
"""
from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager

from featcache.pipeline.signals import raise_if_terminated

_BAR = contextvars.ContextVar("featcache_fit_progress", default=None)


@contextmanager
def reporting(enabled: bool, desc: str):
    """A tqdm bar for the block when ``enabled`` (counts ticks; total unknown in advance)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)  # leaves its last line, as extract's
    token = _BAR.set(bar)
    try:
        yield bar
    finally:
        _BAR.reset(token)
        bar.close()


def tick(n: int = 1, unit: str | None = None) -> None:
    """Count ``n`` steps of work (``unit``: "pass" over X, "epoch") on the open bar, if any; and
    the place where a SIGTERM whose exception Python dropped is raised again (signals.py)."""
    raise_if_terminated()
    bar = _BAR.get()
    if bar is not None:
        if unit and bar.unit != unit:
            bar.unit = unit
        bar.update(n)
