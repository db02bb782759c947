"""Concurrent calls on one event loop, grouped into rounds that run one at a time.

This is how both stores group-commit: a call waits in line; when no round is running,
every call waiting (up to ``max_batch``) becomes the next round, which runs them in one
transaction. Calls arriving meanwhile wait for the round after. Under load the rounds
grow by themselves, so one commit (and, for PostgreSQL, one pair of round trips)
serves many callers; with one caller, a round is that call alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Outcome", "Rounds", "settle"]

Item = TypeVar("Item")
# One call's result: (True, value) or (False, the exception to raise in its caller).
Outcome = tuple[bool, Any]


def settle(future: asyncio.Future[Any], outcome: Outcome) -> None:
    """Hand a caller its outcome, unless it gave up waiting (the write stands)."""
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Rounds(Generic[Item]):
    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Outcome]]],
        max_batch: int = 256,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Any]:
        """Run ``item`` in the next round: a future of its outcome, settled once the
        round has committed. A plain function, not a coroutine: every callback comes
        through here, and awaiting the future itself spares a coroutine per call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = loop.create_task(self._run_rounds())
        return future

    async def drain(self) -> None:
        """Wait until every call already made has its outcome."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _run_rounds(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    outcomes = await self._run([item for item, _future in batch])
                except Exception as exc:  # the round's own failure is every caller's
                    outcomes = [(False, exc)] * len(batch)
                for (_item, future), outcome in zip(batch, outcomes, strict=True):
                    settle(future, outcome)
        finally:
            # At once, not in a done callback: a caller woken by this round may call
            # again before such a callback would run, and must then start a round.
            self._task = None
