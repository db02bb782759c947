"""Noting refused callbacks for the dashboard, at a bounded number of rows a second.

Every refused callback that the store keeps (``rejected_callbacks``) is noted here. The
first ``ROWS_PER_SECOND`` of each second of the clock are written one row each, with
what identifies them (the job URL's id, the webhook id, why); the rest of that second
are only counted, per reason, and written once the second is over as one summary row
per reason whose ``repeats`` says how many it stands for. A flood of forged callbacks
at any rate therefore writes at most ``ROWS_PER_SECOND`` rows plus one per reason a
second, while every count the dashboard shows (it sums ``repeats``) stays exact.

Seconds are whole seconds of ``time.time()``, so a summary never straddles the minute
the dashboard's counts are kept by. A summary is written when its second ends even if
no refusal follows (a timer), and on ``aclose`` at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.logs import Repeats
from service.store.base import Rejection

__all__ = ["ROWS_PER_SECOND", "RejectionLog"]

log = logging.getLogger("bulkhook.callbacks")

# Refusals written one row each per second of the clock; the rest of the second are
# counted into one row per reason.
ROWS_PER_SECOND = 20


@dataclass
class _Summary:
    """The refusals of one reason past the second's rows, counted."""

    first: Rejection
    count: int = 1
    # The job URL's id when every one of them came to that one job's URL, else None.
    job_ref: str | None = None


class RejectionLog:
    """Writes refused callbacks through ``record`` (the store's ``record_rejection``),
    at most ``per_second`` one by one each second and the rest as summaries."""

    def __init__(
        self,
        record: Callable[[Rejection], Awaitable[None]],
        per_second: int = ROWS_PER_SECOND,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_second = per_second
        self._record = record
        self._clock = clock
        self._second: int | None = None
        self._written = 0
        self._pending: dict[str, _Summary] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._warnings = Repeats(log)

    def note(self, rejection: Rejection) -> Callable[[], Awaitable[None]] | None:
        """Count ``rejection``; the write of its own row, to run once it has been
        answered, or None when it is only counted (its second's summary writes it)."""
        second = math.floor(rejection.received_at)
        if self._second is None or second > self._second:
            self._flush()
            self._second, self._written = second, 0
        if self._written < self.per_second or self._closed:
            self._written += 1
            return lambda: self._write(rejection)
        summary = self._pending.get(rejection.reason)
        if summary is None:
            self._pending[rejection.reason] = _Summary(rejection, job_ref=rejection.job_ref)
        else:
            summary.count += 1
            if summary.job_ref != rejection.job_ref:
                summary.job_ref = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._left(), self._end)
        return None

    async def aclose(self) -> None:
        """Write what is pending and wait for every write begun; later refusals are
        written one by one (the app is stopping: there are few)."""
        self._closed = True
        self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self._warnings.flush()

    def _left(self) -> float:
        """Seconds until the current second is over (by the clock rejections carry)."""
        assert self._second is not None
        return max(0.0, self._second + 1 - self._clock())

    def _end(self) -> None:
        """The timer: the second is over (or, the loop's clock running ahead of the
        wall clock, nearly: then wait the rest)."""
        self._timer = None
        if self._left() > 0:
            self._timer = asyncio.get_running_loop().call_later(self._left(), self._end)
            return
        self._flush()

    def _flush(self) -> None:
        """Start writing the pending summaries, one row per reason."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for reason, summary in pending.items():
            first = summary.first
            more = "callback" if summary.count == 1 else "callbacks"
            detail = (
                f"and {summary.count} more {more} refused ({reason.replace('_', ' ')})"
                f" in the same second, counted but not noted one by one (at most"
                f" {self.per_second} a second are); the first of them: {first.detail}"
            )
            row = Rejection(
                first.received_at, reason, detail[:500], summary.job_ref, None, summary.count
            )
            with contextlib.suppress(RuntimeError):  # no running loop: nothing can write
                task = asyncio.get_running_loop().create_task(self._write(row))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)

    async def _write(self, rejection: Rejection) -> None:
        try:
            await self._record(rejection)
        except Exception as exc:
            self._warnings.warning(
                "note_failed",
                "could not note %d refused callback(s): %r",
                rejection.repeats,
                exc,
                extra={"outcome": rejection.reason},
            )
