"""What the dashboard reads besides jobs: the change feed for live views and the
callbacks log (accepted, kept and refused deliveries; never a body), one mixin per
database. The SQL is written once with ``%s`` markers; SQLite gets them as ``?``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..jobs import Job
from .base import REJECTIONS_KEPT, CallbackRecord, Rejection

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from .writer import SQLiteConnections

__all__ = ["PostgresActivity", "SQLiteActivity", "like_prefix"]

# Keyset paging over (updated_at, id): a burst of changes sharing one timestamp still
# pages forward instead of re-reading its first page forever.
_CHANGED_SINCE = """SELECT * FROM jobs
    WHERE updated_at > %s OR (updated_at = %s AND id > %s)
    ORDER BY updated_at, id LIMIT %s"""

# A delivery row says its outcome when it was not simply applied: kept (why; whether
# it was applied once its job appeared is in kept_callbacks) or refused (wrong_job).
# Older rows have none: with a job id they were applied, without one kept.
_OUTCOME = """COALESCE(d.outcome,
    CASE WHEN d.job_id IS NOT NULL THEN 'accepted' ELSE COALESCE(k.reason, 'kept') END)"""

_RECENT_DELIVERIES = f"""SELECT d.received_at, {_OUTCOME} AS outcome, d.webhook_id,
        COALESCE(d.job_id, k.job_ref) AS job_ref, k.applied_at
    FROM deliveries d LEFT JOIN kept_callbacks k ON k.webhook_id = d.webhook_id
    ORDER BY d.received_at DESC LIMIT %s"""

_RECENT_REJECTIONS = """SELECT received_at, reason, detail, job_ref, webhook_id
    FROM rejected_callbacks ORDER BY received_at DESC LIMIT %s"""

_REJECTIONS_FOR = """SELECT received_at, reason, detail, job_ref, webhook_id
    FROM rejected_callbacks WHERE job_ref = %s ORDER BY received_at DESC LIMIT %s"""

_COUNT_DELIVERIES = f"""SELECT {_OUTCOME} AS outcome, COUNT(*) AS n
    FROM deliveries d LEFT JOIN kept_callbacks k ON k.webhook_id = d.webhook_id
    WHERE d.received_at >= %s GROUP BY 1"""

_COUNT_REJECTIONS = """SELECT reason AS outcome, COUNT(*) AS n FROM rejected_callbacks
    WHERE received_at >= %s GROUP BY reason"""

_INSERT_REJECTION = """INSERT INTO rejected_callbacks
    (received_at, reason, detail, job_ref, webhook_id) VALUES (%s, %s, %s, %s, %s)"""

_PRUNE_REJECTIONS = "DELETE FROM rejected_callbacks WHERE id <= %s"


def like_prefix(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching values that start with ``text``."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}%"


def _delivery(row: Mapping[str, Any]) -> CallbackRecord:
    if row["outcome"] == "accepted":
        detail = "signature verified; applied"
    elif row["outcome"] == "wrong_job":
        detail = "signature verified; refused: the body is about another job"
    elif row["applied_at"] is not None:
        detail = "signature verified; kept, applied once its job appeared"
    else:
        detail = "signature verified; kept"
    return CallbackRecord(
        row["received_at"], row["outcome"], row["webhook_id"], row["job_ref"], detail
    )


def _rejection(row: Mapping[str, Any]) -> CallbackRecord:
    return CallbackRecord(
        row["received_at"], row["reason"], row["webhook_id"], row["job_ref"], row["detail"]
    )


def _values(rejection: Rejection) -> tuple[Any, ...]:
    return (
        rejection.received_at,
        rejection.reason,
        rejection.detail,
        rejection.job_ref,
        rejection.webhook_id,
    )


def _newest_first(records: list[CallbackRecord], limit: int) -> list[CallbackRecord]:
    return sorted(records, key=lambda record: record.received_at, reverse=True)[:limit]


def _add_counts(counts: dict[str, int], rows: Any) -> None:
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + row["n"]


def _q(sql: str) -> str:
    return sql.replace("%s", "?")


class SQLiteActivity:
    _sql: SQLiteConnections

    async def jobs_changed_since(self, after: float, after_id: str, limit: int) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(_q(_CHANGED_SINCE), (after, after, after_id, limit))
            return [Job.from_row(row) for row in rows]

        return await self._sql.read(op)

    async def record_rejection(self, rejection: Rejection) -> None:
        def op(conn: sqlite3.Connection) -> None:
            newest = conn.execute(_q(_INSERT_REJECTION), _values(rejection)).lastrowid or 0
            if newest > REJECTIONS_KEPT:
                conn.execute(_q(_PRUNE_REJECTIONS), (newest - REJECTIONS_KEPT,))

        await self._sql.write(op)

    async def recent_callbacks(self, limit: int = 50) -> list[CallbackRecord]:
        def op(conn: sqlite3.Connection) -> list[CallbackRecord]:
            records = [_delivery(r) for r in conn.execute(_q(_RECENT_DELIVERIES), (limit,))]
            records += [_rejection(r) for r in conn.execute(_q(_RECENT_REJECTIONS), (limit,))]
            return _newest_first(records, limit)

        return await self._sql.read(op)

    async def rejections_for(self, job_ref: str, limit: int = 100) -> list[CallbackRecord]:
        def op(conn: sqlite3.Connection) -> list[CallbackRecord]:
            rows = conn.execute(_q(_REJECTIONS_FOR), (job_ref, limit))
            return [_rejection(row) for row in rows][::-1]

        return await self._sql.read(op)

    async def callback_counts(self, since: float) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            counts: dict[str, int] = {}
            _add_counts(counts, conn.execute(_q(_COUNT_DELIVERIES), (since,)))
            _add_counts(counts, conn.execute(_q(_COUNT_REJECTIONS), (since,)))
            return counts

        return await self._sql.read(op)


class PostgresActivity:
    _pool: AsyncConnectionPool[Any]

    async def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall())

    async def jobs_changed_since(self, after: float, after_id: str, limit: int) -> list[Job]:
        rows = await self._rows(_CHANGED_SINCE, (after, after, after_id, limit))
        return [Job.from_row(row) for row in rows]

    async def record_rejection(self, rejection: Rejection) -> None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(f"{_INSERT_REJECTION} RETURNING id", _values(rejection))
            row = await cursor.fetchone()
            newest = row["id"] if row else 0
            if newest > REJECTIONS_KEPT:
                await conn.execute(_PRUNE_REJECTIONS, (newest - REJECTIONS_KEPT,))

    async def recent_callbacks(self, limit: int = 50) -> list[CallbackRecord]:
        records = [_delivery(row) for row in await self._rows(_RECENT_DELIVERIES, (limit,))]
        records += [_rejection(row) for row in await self._rows(_RECENT_REJECTIONS, (limit,))]
        return _newest_first(records, limit)

    async def rejections_for(self, job_ref: str, limit: int = 100) -> list[CallbackRecord]:
        rows = await self._rows(_REJECTIONS_FOR, (job_ref, limit))
        return [_rejection(row) for row in rows][::-1]

    async def callback_counts(self, since: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        _add_counts(counts, await self._rows(_COUNT_DELIVERIES, (since,)))
        _add_counts(counts, await self._rows(_COUNT_REJECTIONS, (since,)))
        return counts
