"""Work that falls due at times kept in the store, claimed with leases.

The poller and the copier of failed records each run one such loop: claim what is
due (as much as there is room for), run each claimed piece as a task, sleep until the
next due time or until woken, and on stopping cancel the tasks and give their leases
back, so that another replica takes them at once instead of when they run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any

__all__ = ["DueWork"]

# How long the loop rests after looking for due work failed (the store was away).
_AFTER_FAILURE = 1.0


class DueWork(ABC):
    """A loop claiming due work; subclasses say how to claim, wait and let go."""

    def __init__(self, name: str, log: logging.Logger, wake: asyncio.Event | None) -> None:
        self._name = name
        self._log = log
        self._wake = wake if wake is not None else asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # When the latest tick began: what was due by then, it could claim.
        self._looked = 0.0

    @abstractmethod
    async def tick(self) -> int:
        """Claim what is due now and start it (``_spawn``); return how much."""

    @abstractmethod
    async def _sleep_time(self, claimed: int) -> float:
        """How long to sleep after a tick that claimed ``claimed``, unless woken."""

    @abstractmethod
    async def _release(self) -> None:
        """Give back the leases this loop holds."""

    def _room_opened(self) -> bool:
        """Whether a piece of work ending should wake the loop to claim more."""
        return True

    def _until(self, due: float | None, most: float) -> float:
        """How long to sleep for work due at ``due``, looking again at least every
        ``most`` seconds.

        Work that was due when the tick claimed, yet not claimed, is leased: by this
        loop's own tasks (their ends wake it) or by another replica's (its lease runs
        out). Work that fell due since is claimed at once: a timer can fire a little
        early (uvloop's have millisecond steps), and the tick it wakes then finds the
        work not quite due.
        """
        if due is None:
            return most
        if due <= self._looked:
            return most
        return min(most, max(0.0, due - time.time()))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._release()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._room_opened():
            self._wake.set()

    async def _run(self) -> None:
        while True:
            # Cleared before the tick: a wake-up while it runs is not lost.
            self._wake.clear()
            try:
                self._looked = time.time()
                delay = await self._sleep_time(await self.tick())
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("%s: looking for due work failed; retrying", self._name)
                delay = _AFTER_FAILURE
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
