"""The polling fallback: ask the upstream only about jobs no callback settled.

Due times live in the store, so a restart resumes where it left off. The loop sleeps
until the next due time (or until woken by a callback that carried no status), claims
due jobs with a lease, and polls them with bounded concurrency under a rate per
connector instance: each instance is its own upstream account, which counts its own
calls, so each has its own budget of ``BULKHOOK_POLL_RATE`` status polls a second. A
job whose instance is no longer configured is not polled (logged once per job).

It claims no more than about two seconds of the rate's worth of jobs at a time: a
backlog of 10,000 due jobs is worked through in slices, each polled long before its
lease runs out (so no job is claimed twice), and between slices the loop sleeps until
its own polls drain rather than asking the store again and again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque

from service.background import DueWork
from service.jobs import Job
from service.metrics import Metrics
from service.store import Store
from service.tracker import Tracker

__all__ = ["Poller", "RateLimiter"]

log = logging.getLogger("bulkhook.poller")

_BATCH = 100
# Another replica may have made a job due sooner: look again at least this often.
_MAX_SLEEP = 5.0
# The rate limiter's "second": longer, as headroom for calls held up on the way. At
# 1.05 s the sandbox once counted 204 calls in one of its seconds against 200.
_WINDOW = 1.1
# Jobs of an unconfigured instance already logged, at most (then the oldest go).
_UNKNOWN_LOGGED = 10_000


class RateLimiter:
    """At most ``rate`` acquisitions in any one second, spaced evenly (no bursts).

    Spacing alone is not enough: a sleep that wakes late (the loop was busy) would let
    the calls it held back go out together, and a second could hold more than ``rate``.
    So the times of the last ``rate`` acquisitions are kept, and a call goes out only
    once the one ``rate`` calls before it is ``_WINDOW`` old: a little over a second,
    so calls held up on their way (in either event loop) cannot crowd into one second
    at the upstream.
    """

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._recent: deque[float] = deque(maxlen=max(1, math.floor(rate)))
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        # A slot on an even grid, reserved at once, so a late wake-up does not push
        # every later call back; then the one-second window, on the actual times.
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
        async with self._lock:
            while len(self._recent) == self._recent.maxlen:
                wait = self._recent[0] + _WINDOW - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self._recent.append(time.monotonic())


class Poller(DueWork):
    def __init__(
        self,
        store: Store,
        tracker: Tracker,
        metrics: Metrics,
        rate: float,
        lease: float = 120.0,
        *,
        wake: asyncio.Event | None = None,
    ) -> None:
        """``wake``, when given, is set by whoever learns that a job is due sooner (the
        tracker, built before the poller, is handed its ``set``)."""
        super().__init__("poller", log, wake)
        self.store = store
        self.tracker = tracker
        self.metrics = metrics
        self.owner = f"poller-{secrets.token_hex(4)}"
        self.lease = lease
        # One budget and one bound on polls at once per configured instance, so that
        # polls waiting for one instance's budget never hold up another's; the
        # backlog grows with their number, so that each can use its whole budget.
        instances = tuple(tracker.upstreams)
        self._limiters = {name: RateLimiter(rate) for name in instances}
        self._concurrency = {
            name: asyncio.Semaphore(max(1, min(32, int(rate * 2)))) for name in instances
        }
        # Jobs claimed but not yet polled, at most: about two seconds of the rates.
        self._backlog = max(1, min(_BATCH, math.ceil(rate * 2)) * len(instances))
        self._unknown_logged: dict[str, None] = {}

    async def tick(self) -> int:
        """Claim the jobs due now (as many as the backlog has room for) and start polling
        them; returns how many."""
        room = self._backlog - len(self._inflight)
        if room <= 0:
            return 0
        now = time.time()
        jobs = await self.store.claim_due(now, room, self.owner, self.lease)
        for job in jobs:
            if job.next_poll_at is not None:
                self.metrics.poll_lag.observe(max(0.0, now - job.next_poll_at))
            self._spawn(self._poll(job))
        return len(jobs)

    def _room_opened(self) -> bool:
        return len(self._inflight) <= self._backlog // 2  # room for the next slice

    async def _release(self) -> None:
        await self.store.release_leases(self.owner)

    async def _sleep_time(self, claimed: int) -> float:
        """How long to sleep before the next tick, unless woken sooner."""
        if len(self._inflight) >= self._backlog:
            return _MAX_SLEEP  # full: woken as our polls drain
        if claimed and len(self._inflight) > self._backlog // 2:
            return _MAX_SLEEP  # plenty queued: woken as they drain
        if claimed:
            return 0.0  # there may be more due right now
        return self._until(await self.store.next_due_at(), _MAX_SLEEP)

    async def _poll(self, job: Job) -> None:
        limiter = self._limiters.get(job.instance)
        if limiter is None:
            await self._not_configured(job)
            return
        async with self._concurrency[job.instance]:
            if job.upstream_id is not None:
                await limiter.acquire()
            try:
                await self.tracker.poll(job)
            except Exception:
                log.exception(
                    "poll of job %s failed",
                    job.id,
                    extra={"job_id": job.id, "instance": job.instance},
                )
                await self.store.reschedule(
                    job.id, time.time() + self.tracker.settings.poll_interval
                )

    async def _not_configured(self, job: Job) -> None:
        """A job of an instance no longer configured: nothing to ask, and no one to ask.
        Looked at again after the longest poll interval (the instance may come back
        with a restart), logged the first time only."""
        if job.id not in self._unknown_logged:
            self._unknown_logged[job.id] = None
            if len(self._unknown_logged) > _UNKNOWN_LOGGED:
                del self._unknown_logged[next(iter(self._unknown_logged))]
            log.warning(
                "job %s is not polled: its connector instance %r is not configured",
                job.id,
                job.instance,
                extra={"job_id": job.id, "instance": job.instance},
            )
        await self.store.reschedule(job.id, time.time() + self.tracker.settings.poll_max_interval)
