"""Which connector instance each job belongs to, as far as callbacks lately asked. Pure.

A callback at a job's own URL is verified with its job's instance's keys only, so the
instance is needed before the body is even looked at. A job's instance never changes,
so once read from the store it is remembered: every later callback for that job costs
one dictionary lookup, not a store round trip. The map is bounded (a flood of callbacks
for many jobs cannot grow it without end); past the bound the entry remembered first
goes, which for callbacks (a job's come close together) is as good as least recently
used at a fraction of its bookkeeping.

Only jobs that exist are remembered: an id that names no job is read again next time
(it may be a forger's, and remembering those would push out the genuine ones).
"""

from __future__ import annotations

__all__ = ["REMEMBERED", "JobInstances"]

# How many jobs' instances are remembered at most.
REMEMBERED = 10_000


class JobInstances(dict[str, str]):
    """Job id → instance name, for at most ``most`` jobs.

    A dictionary itself, so that the hot path's lookup (``get``) is the dictionary's
    own, with no Python call around it; ``remember`` is the only way in.
    """

    __slots__ = ("_most",)

    def __init__(self, most: int = REMEMBERED) -> None:
        super().__init__()
        if most < 1:
            raise ValueError("at least one job's instance must be remembered")
        self._most = most

    def remember(self, job_id: str, instance: str) -> None:
        if job_id not in self and len(self) >= self._most:
            # Dictionaries keep insertion order: the first key is the oldest entry.
            del self[next(iter(self))]
        self[job_id] = instance
