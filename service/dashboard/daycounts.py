"""The callbacks panel's 24-hour counts, read from the store a minute at a time.

Counting every delivery of the day on every render costs as much as the day had
deliveries. Instead, a minute of deliveries is counted once it is complete and kept in
memory (one small dict per minute, at most a day of them); each render reads only
the minutes since then. A minute is complete ``SETTLE`` seconds after it ends: a
delivery's ``received_at`` is taken before its commit, and replicas' clocks differ a
little, so a late-committed delivery still lands in a minute not yet kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.store import Store

__all__ = ["SETTLE", "WINDOW", "DayCounts"]

WINDOW = 86400.0
SETTLE = 15.0
# Beyond any delivery's time, for the newest minutes' open-ended read.
_FUTURE = 10 * 365 * 86400.0


class DayCounts:
    """Deliveries of the last ``WINDOW`` seconds, by outcome, for one app (and so one
    store): minutes that started within the window count whole."""

    def __init__(self) -> None:
        self._minutes: dict[int, dict[str, int]] = {}
        # Minutes before this one are counted and kept (None: nothing is kept yet).
        self._kept_until: int | None = None

    async def counts(self, store: Store, now: float) -> dict[str, int]:
        """The counts at ``now``, read from ``store``, the app's own."""
        first = math.ceil((now - WINDOW) / 60)
        settled = math.floor((now - SETTLE) / 60)
        kept_from = first if self._kept_until is None else max(first, self._kept_until)
        if kept_from < settled:
            done = await store.callback_counts_by_minute(kept_from * 60.0, settled * 60.0)
            self._minutes.update(done)
            self._kept_until = max(settled, self._kept_until or settled)
        for minute in [m for m in self._minutes if m < first]:
            del self._minutes[minute]
        recent_from = max(settled, self._kept_until or settled)
        recent = await store.callback_counts_by_minute(recent_from * 60.0, now + _FUTURE)
        totals: dict[str, int] = {}
        for minute, counts in [*self._minutes.items(), *recent.items()]:
            if minute >= first:
                for outcome, n in counts.items():
                    totals[outcome] = totals.get(outcome, 0) + n
        return totals
