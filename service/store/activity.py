"""What the dashboard reads besides jobs: the change feed for live views and the
callbacks log (accepted, kept and refused deliveries; never a body), one mixin per
database. The SQL is written once with ``%s`` markers; SQLite gets them as ``?``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from service.jobs import Job, State
from service.store.base import REJECTIONS_KEPT, CallbackRecord, Rejection

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from service.store.sqlite.writer import SQLiteConnections

__all__ = [
    "DELIVERIES_BY_MINUTE",
    "REJECTIONS_BY_MINUTE",
    "PostgresActivity",
    "SQLiteActivity",
    "job_list_query",
    "like_prefix",
]

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

_RECENT_REJECTIONS = """SELECT received_at, reason, detail, job_ref, webhook_id, repeats
    FROM rejected_callbacks ORDER BY received_at DESC LIMIT %s"""

_REJECTIONS_FOR = """SELECT received_at, reason, detail, job_ref, webhook_id, repeats
    FROM rejected_callbacks WHERE job_ref = %s ORDER BY received_at DESC LIMIT %s"""

_COUNT_DELIVERIES = f"""SELECT {_OUTCOME} AS outcome, COUNT(*) AS n
    FROM deliveries d LEFT JOIN kept_callbacks k ON k.webhook_id = d.webhook_id
    WHERE d.received_at >= %s GROUP BY 1"""

# A row of refusals may stand for several (``repeats``): counts sum them.
_COUNT_REJECTIONS = """SELECT reason AS outcome, SUM(repeats) AS n FROM rejected_callbacks
    WHERE received_at >= %s GROUP BY reason"""

# Counts per minute of receipt over a window of ``received_at``, served by the
# deliveries_at and rejected_at indexes: the dashboard counts a window once it is
# complete and keeps it, so it reads only the recent minutes again. ``{minute}`` is
# the store's way of flooring a number.
DELIVERIES_BY_MINUTE = f"""SELECT {{minute}} AS minute, {_OUTCOME} AS outcome, COUNT(*) AS n
    FROM deliveries d LEFT JOIN kept_callbacks k ON k.webhook_id = d.webhook_id
    WHERE d.received_at >= %s AND d.received_at < %s GROUP BY 1, 2"""

REJECTIONS_BY_MINUTE = """SELECT {minute} AS minute, reason AS outcome, SUM(repeats) AS n
    FROM rejected_callbacks WHERE received_at >= %s AND received_at < %s GROUP BY 1, 2"""

_SQLITE_MINUTE = "CAST({column} / 60 AS INTEGER)"
_POSTGRES_MINUTE = "CAST(FLOOR({column} / 60) AS BIGINT)"

# Where the timelines are: the newest event and refusal, and what came after a point.
# Entries are added without a change to their job's row, so the live views follow
# these too. Both are read by primary key.
_TIMELINE_MARKS = """SELECT (SELECT COALESCE(MAX(seq), 0) FROM events) AS seq,
    (SELECT COALESCE(MAX(id), 0) FROM rejected_callbacks) AS rejection"""

_EVENTS_AFTER = "SELECT seq AS n, job_id AS ref FROM events WHERE seq > %s ORDER BY seq LIMIT %s"

_REJECTIONS_AFTER = """SELECT id AS n, job_ref AS ref FROM rejected_callbacks
    WHERE id > %s ORDER BY id LIMIT %s"""

_INSERT_REJECTION = """INSERT INTO rejected_callbacks
    (received_at, reason, detail, job_ref, webhook_id, repeats) VALUES (%s, %s, %s, %s, %s, %s)"""

_PRUNE_REJECTIONS = "DELETE FROM rejected_callbacks WHERE id <= %s"


def like_prefix(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching values that start with ``text``."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}%"


def job_list_query(
    mark: str,
    state: State | None,
    limit: int,
    before: str | None,
    search: str | None,
    direction: str | None = None,
    instance: str | None = None,
) -> tuple[str, tuple[str | int, ...]]:
    """``Store.list_jobs`` as SQL and its parameters; ``mark`` is the driver's
    placeholder (``?`` or ``%s``). Newest first, served by the id and state indexes."""
    clauses: list[str] = []
    params: list[str | int] = []
    if state is not None:
        clauses.append(f"state = {mark}")
        params.append(str(state))
    if direction is not None:
        clauses.append(f"direction = {mark}")
        params.append(direction)
    if instance is not None:
        clauses.append(f"instance = {mark}")
        params.append(instance)
    if before is not None:
        clauses.append(f"id < {mark}")
        params.append(before)
    if search:
        clauses.append(f"(id LIKE {mark} ESCAPE '\\' OR upstream_id = {mark})")
        params.extend((like_prefix(search.lower()), search))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT {mark}", (*params, limit)


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
        row["received_at"],
        row["reason"],
        row["webhook_id"],
        row["job_ref"],
        row["detail"],
        int(row["repeats"]),
    )


def _values(rejection: Rejection) -> tuple[Any, ...]:
    return (
        rejection.received_at,
        rejection.reason,
        rejection.detail,
        rejection.job_ref,
        rejection.webhook_id,
        rejection.repeats,
    )


def _newest_first(records: list[CallbackRecord], limit: int) -> list[CallbackRecord]:
    return sorted(records, key=lambda record: record.received_at, reverse=True)[:limit]


def _add_counts(counts: dict[str, int], rows: Any) -> None:
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + int(row["n"])


def _add_minutes(minutes: dict[int, dict[str, int]], rows: Any) -> None:
    for row in rows:
        counts = minutes.setdefault(int(row["minute"]), {})
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + int(row["n"])


def _entries(rows: Any) -> list[tuple[int, str | None]]:
    return [(int(row["n"]), row["ref"]) for row in rows]


def _by_minute(sql: str, floor: str, column: str) -> str:
    return sql.format(minute=floor.format(column=column))


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

    async def callback_counts_by_minute(
        self, since: float, until: float
    ) -> dict[int, dict[str, int]]:
        deliveries = _q(_by_minute(DELIVERIES_BY_MINUTE, _SQLITE_MINUTE, "d.received_at"))
        rejections = _q(_by_minute(REJECTIONS_BY_MINUTE, _SQLITE_MINUTE, "received_at"))

        def op(conn: sqlite3.Connection) -> dict[int, dict[str, int]]:
            minutes: dict[int, dict[str, int]] = {}
            _add_minutes(minutes, conn.execute(deliveries, (since, until)))
            _add_minutes(minutes, conn.execute(rejections, (since, until)))
            return minutes

        return await self._sql.read(op)

    async def timeline_marks(self) -> tuple[int, int]:
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(_TIMELINE_MARKS).fetchone()
            return int(row["seq"]), int(row["rejection"])

        return await self._sql.read(op)

    async def timeline_changes(
        self, after_seq: int, after_rejection: int, limit: int
    ) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
        def op(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
            events = _entries(conn.execute(_q(_EVENTS_AFTER), (after_seq, limit)))
            refused = _entries(conn.execute(_q(_REJECTIONS_AFTER), (after_rejection, limit)))
            return events, refused

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

    async def callback_counts_by_minute(
        self, since: float, until: float
    ) -> dict[int, dict[str, int]]:
        deliveries = _by_minute(DELIVERIES_BY_MINUTE, _POSTGRES_MINUTE, "d.received_at")
        rejections = _by_minute(REJECTIONS_BY_MINUTE, _POSTGRES_MINUTE, "received_at")
        minutes: dict[int, dict[str, int]] = {}
        _add_minutes(minutes, await self._rows(deliveries, (since, until)))
        _add_minutes(minutes, await self._rows(rejections, (since, until)))
        return minutes

    async def timeline_marks(self) -> tuple[int, int]:
        [row] = await self._rows(_TIMELINE_MARKS, ())
        return int(row["seq"]), int(row["rejection"])

    async def timeline_changes(
        self, after_seq: int, after_rejection: int, limit: int
    ) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
        events = _entries(await self._rows(_EVENTS_AFTER, (after_seq, limit)))
        refused = _entries(await self._rows(_REJECTIONS_AFTER, (after_rejection, limit)))
        return events, refused
