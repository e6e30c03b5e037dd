"""Journal parts written by one background thread, so the backbone never waits on disk."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from featcache.cache.journal import Journal, Part

MAX_QUEUED = 4  # parts waiting to be written; beyond this the producer waits (bounded memory)


class PartSaver:
    """``save`` returns at once; ``close`` waits until every queued part is committed.

    An error from a write (disk full, ...) is raised by the next ``save`` or by ``close``.
    """

    def __init__(self, journal: Journal):
        self.journal = journal
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="featcache-journal")
        self.queued: list[Future] = []

    def _reap(self, keep: int) -> None:
        while len(self.queued) > keep:
            self.queued.pop(0).result()  # re-raises the write's exception here
        done = [f for f in self.queued if f.done()]
        for f in done:
            self.queued.remove(f)
            f.result()

    def save(self, index: int, part: Part) -> None:
        self._reap(MAX_QUEUED - 1)
        self.queued.append(self.pool.submit(self.journal.save, index, part))

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every queued part; ``raise_errors=False`` when another error is already in flight."""
        try:
            self._reap(0)
        except Exception:
            if raise_errors:
                raise
        finally:
            self.queued.clear()
            self.pool.shutdown(wait=True)
