"""Pacing the answers to callbacks refused before their signature verified.

A forged callback costs the event loop about what a bare HTTP request costs, half what
a genuine one does; answered at once, a sender that waits for each answer (as ``wrk``
does, or any client keeping a few connections busy) sends the next at once and takes
a share of the loop proportional to its connections. Its answer (401
``bad_signature``, 404 ``unknown_instance`` or ``job_not_found``, 413 ``too_large``)
is therefore sent ``delay`` seconds late (``BULKHOOK_REFUSAL_DELAY``), which holds such
a sender to about ``connections / delay`` requests a second. Nothing but the answer
waits: the body was dropped, and the refusal was counted and noted before.

A genuine sender never waits: a verified callback is answered as soon as the store
committed it, and so is the refusal of a verified one (409 ``wrong_job``, 400
``malformed_callback``). Nor does the upstream: its callbacks are signed, and one it
sends with a key the service does not know yet costs it a second per retry.

At most ``most`` answers wait at once (``MOST_WAITING``), each a future and a timer:
past that, a refusal is answered at once with ``Connection: close``, so a sender
opening connection after connection reconnects for each request, and memory stays
bounded. When the app stops, every waiting answer is sent at once (``stop``), so a
graceful shutdown does not wait out the delay.
"""

from __future__ import annotations

import asyncio

__all__ = ["DEFAULT_DELAY", "MOST_WAITING", "PACED", "Pacing"]

# Seconds a refusal of an unverified callback waits before it is sent (the default of
# BULKHOOK_REFUSAL_DELAY).
DEFAULT_DELAY = 1.0
# The refusals given before a signature verified, whose answers wait: no genuine
# sender gets them.
PACED = frozenset({"bad_signature", "unknown_instance", "job_not_found", "too_large"})
# Answers waiting at once, at most; past it, refusals are answered at once and close
# their connection.
MOST_WAITING = 1000


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Pacing:
    """Holds answers ``delay`` seconds each (0: none), at most ``most`` at once."""

    def __init__(self, delay: float = DEFAULT_DELAY, most: int = MOST_WAITING) -> None:
        self.delay = delay
        self.most = most
        self._waiting: set[asyncio.Future[None]] = set()
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Answers waiting now."""
        return len(self._waiting)

    async def hold(self) -> bool:
        """Wait the delay before an answer is sent: True once it passed (or at once with
        no delay, or once the app is stopping); False at once when ``most`` answers
        already wait, for an answer that is to close its connection."""
        if self.delay <= 0 or self._stopping:
            return True
        if len(self._waiting) >= self.most:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.delay, _release, waiter)
        self._waiting.add(waiter)
        try:
            await waiter
        finally:
            self._waiting.discard(waiter)
            timer.cancel()
        return True

    def stop(self) -> None:
        """The app is stopping: every waiting answer goes now, and later ones at once."""
        self._stopping = True
        for waiter in list(self._waiting):
            _release(waiter)
