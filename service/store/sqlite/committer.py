"""The thread that commits the SQLite writer's rounds, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

from service.store.group_commit import settle

__all__ = ["Committer"]


class Committer:
    """The thread that runs each round's COMMIT (its fsync) off the event loop.

    A thread of its own fed by a queue, rather than an executor: the hop there and
    back is paid once per round, and the thread settles the loop's future directly
    instead of chaining an executor's future to it, which costs more than the hop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._asked: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._serve, name="sqlite-commit", daemon=True)
        self._thread.start()

    def run(self, commit: Callable[[], None]) -> asyncio.Future[None]:
        """Run ``commit`` on the thread; the future is settled on the loop."""
        future = self._loop.create_future()
        self._asked.put((commit, future))
        return future

    def _serve(self) -> None:
        while (asked := self._asked.get()) is not None:
            commit, future = asked
            error: BaseException | None = None
            try:
                commit()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self._loop.call_soon_threadsafe(settle, future, (error is None, error))

    def stop(self) -> None:
        self._asked.put(None)
        self._thread.join()
