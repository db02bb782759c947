"""How long callback records are kept, and the task that prunes the older ones.

Every delivery is recorded (for deduplication), every refused callback noted, every
callback kept until its job appears, every change written to a timeline. Without a
limit a steady stream of callbacks, genuine or replayed, grows the store for ever.
Deliveries, refusals, applied kept callbacks and timeline entries older than the
retention (``BULKHOOK_RETENTION``, 30 days by default, at least 5: Open Connectors
redelivers a callback for about four days, and a redelivery must still be recognised)
are removed at start-up and then hourly, a bounded batch per transaction, so that the
callback path never waits long behind the pruning. Jobs themselves are kept, and so
are the failed records copied for them (``failed_records``, ``failed_copies``): the
upstream forgets them, so the store's copy is the only one. So are the fetches of
download results (``result_fetches``), which say where each stored result file stands.
All three tables reference their job with ``ON DELETE CASCADE``, so whatever removes
a job removes them with it.

Kept callbacks are bounded apart from that, by count and bytes (``base.KEPT_MAX``,
``base.KEPT_BYTES``), when one is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.store.base import Store

__all__ = [
    "KEPT_DROP",
    "KEPT_OVER",
    "KEPT_SIZE",
    "MIN_RETENTION",
    "PRUNE_EVERY",
    "PRUNE_SQL",
    "Pruner",
    "sqlite_sql",
]

log = logging.getLogger("bulkhook.store")

# The upstream's redelivery window (nine retries, the n-th about 4^n s after the one
# before: about four days) with a day to spare.
MIN_RETENTION = 5 * 86400.0
PRUNE_EVERY = 3600.0

# The bounds hold per connector instance: one instance's key can fill only its own.
# The kept callbacks of an instance (%s: instance), their count and total size.
KEPT_SIZE = (
    "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS size FROM kept_callbacks WHERE instance = %s"
)
# The newest kept callback of an instance that no longer fits the bounds (%s:
# instance, bytes, count): it and every older one of that instance go.
KEPT_OVER = """SELECT id FROM (
        SELECT id, SUM(size) OVER (ORDER BY id DESC) AS total,
            ROW_NUMBER() OVER (ORDER BY id DESC) AS n
        FROM kept_callbacks WHERE instance = %s) AS newest
    WHERE total > %s OR n > %s ORDER BY id DESC LIMIT 1"""
KEPT_DROP = "DELETE FROM kept_callbacks WHERE instance = %s AND id <= %s"

# One batch per table and statement (named parameters ``before`` and ``batch``). Each
# reads at most ``batch`` rows from the oldest end of an index, so a batch costs the
# same however large the table is; the timeline is walked by its sequence, which
# follows time, instead of paying for an index on every entry written.
PRUNE_SQL: Mapping[str, str] = MappingProxyType(
    {
        "deliveries": """DELETE FROM deliveries WHERE webhook_id IN (
            SELECT webhook_id FROM (
                SELECT webhook_id, received_at FROM deliveries
                ORDER BY received_at LIMIT %(batch)s) AS head
            WHERE received_at < %(before)s)""",
        "rejections": """DELETE FROM rejected_callbacks WHERE id IN (
            SELECT id FROM (
                SELECT id, received_at FROM rejected_callbacks
                ORDER BY received_at LIMIT %(batch)s) AS head
            WHERE received_at < %(before)s)""",
        "kept": """DELETE FROM kept_callbacks WHERE id IN (
            SELECT id FROM kept_callbacks
            WHERE applied_at IS NOT NULL AND received_at < %(before)s
            ORDER BY id LIMIT %(batch)s)""",
        "events": """DELETE FROM events WHERE seq IN (
            SELECT seq FROM (
                SELECT seq, at FROM events ORDER BY seq LIMIT %(batch)s) AS head
            WHERE at < %(before)s)""",
    }
)


def sqlite_sql(sql: str) -> str:
    """The same statement with SQLite's markers (``:name``, ``?``)."""
    return sql.replace("%(before)s", ":before").replace("%(batch)s", ":batch").replace("%s", "?")


class Pruner:
    """Prunes the store at start and every ``every`` seconds; a failure waits a turn."""

    def __init__(self, store: Store, retention: float, every: float = PRUNE_EVERY) -> None:
        self.store = store
        self.retention = retention
        self.every = every
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                pruned = await self.store.prune(time.time() - self.retention)
            except Exception as exc:
                log.warning("pruning old callback records failed: %r", exc)
            else:
                if pruned.total:
                    log.info(
                        "pruned records older than %g s: %d deliveries, %d refusals,"
                        " %d kept callbacks, %d timeline entries",
                        self.retention,
                        pruned.deliveries,
                        pruned.rejections,
                        pruned.kept,
                        pruned.events,
                    )
            await asyncio.sleep(self.every)
