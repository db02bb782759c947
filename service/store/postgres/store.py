"""The shared store for several replicas: PostgreSQL through psycopg 3 and a pool.

Delivery dedupe is a primary key, state changes are compare-and-set on a version
column inside a transaction that holds the row, and due jobs are claimed with
``FOR UPDATE SKIP LOCKED`` leases that expire, so a dead replica's jobs are taken over.
Concurrent applies share one transaction and commit (``apply``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from service.config import redact
from service.downloads.rules import FetchState
from service.failed_records.rules import CopyState
from service.jobs import Job, Observation, State, TimelineEntry
from service.store.activity import PostgresActivity, job_list_query
from service.store.base import (
    KEEP,
    KEPT_BYTES,
    KEPT_MAX,
    Applied,
    Claim,
    Delivery,
    KeptCallback,
    Pruned,
    Store,
    StoreError,
    _Keep,
)
from service.store.copies import (
    CLAIM_COPIES_POSTGRES,
    INSERT_RECORD,
    NEXT_DUE,
    READ_COPY,
    READ_RECORDS,
    RELEASE,
    SAVE_COPY,
    copy_state,
    save_params,
)
from service.store.fetches import (
    CLAIM_FETCHES_POSTGRES,
    NEXT_FETCH_DUE,
    READ_FETCH,
    RELEASE_FETCHES,
    SAVE_FETCH,
    fetch_state,
    save_fetch_params,
)
from service.store.group_commit import Outcome, Rounds
from service.store.plan import NEW_JOB_COLUMNS, NEW_JOB_WIDTH, new_job_row
from service.store.postgres.apply import ApplyCall, Conn, apply_one, apply_round
from service.store.retention import KEPT_DROP, KEPT_OVER, KEPT_SIZE, PRUNE_SQL
from service.store.schema import (
    DOWNLOADS,
    FAILED_RECORDS,
    INSTANCES,
    JOBS_UPSTREAM_ERROR,
    MIGRATIONS_TABLE,
    POSTGRES,
    REJECTION_REPEATS,
    TERMINAL_SQL,
    migrations,
    render,
)

__all__ = ["PostgresStore"]

# Any constant serialises concurrent migrations of replicas starting together.
_MIGRATION_LOCK = 0x62756C6B

# The shared schema (``schema``), and the versions PostgreSQL numbers on its own.
MIGRATIONS: tuple[str, ...] = migrations(
    POSTGRES,
    {
        # 4: the upstream's message about a job (as SQLite's 6).
        4: JOBS_UPSTREAM_ERROR,
        # 5: failed records kept after the upstream forgets them (as SQLite's 7).
        5: render(FAILED_RECORDS, POSTGRES),
        # 6: download jobs and the fetches of their results (as SQLite's 8).
        6: render(DOWNLOADS, POSTGRES),
        # 7: several connector instances (as SQLite's 9).
        7: INSTANCES,
        # 8: a row of refused callbacks may stand for several (as SQLite's 10).
        8: render(REJECTION_REPEATS, POSTGRES),
    },
)


async def _events(conn: Conn, job_id: str) -> tuple[TimelineEntry, ...]:
    cursor = await conn.execute(
        "SELECT at, source, state, detail FROM events WHERE job_id = %s ORDER BY seq", (job_id,)
    )
    return tuple(TimelineEntry(**row) for row in await cursor.fetchall())


async def _job(
    conn: Conn, job_id: str, *, with_events: bool = True, lock: bool = False
) -> Job | None:
    sql = "SELECT * FROM jobs WHERE id = %s" + (" FOR UPDATE" if lock else "")
    row = await (await conn.execute(sql, (job_id,))).fetchone()
    if row is None:
        return None
    return Job.from_row(row, await _events(conn, job_id) if with_events else ())


async def _add_event(
    conn: Conn, job_id: str, at: float, source: str, state: str, detail: str
) -> None:
    await conn.execute(
        "INSERT INTO events (job_id, at, source, state, detail) VALUES (%s, %s, %s, %s, %s)",
        (job_id, at, source, state, detail),
    )


# Seconds an unreachable server may take to answer before start-up gives up.
CONNECT_TIMEOUT = 5


def _one_line(exc: BaseException) -> str:
    """psycopg's message on one line, without the password a connection string in it
    may carry."""
    return redact(" ".join(str(exc).split())) or type(exc).__name__


class _Pool(AsyncConnectionPool[Conn]):
    """The connection pool, and the store's boundary with psycopg: every statement runs
    on one of its connections, so an error that says the database cannot be used just
    now (a lost connection, no connection free in time, a deadlock or serialisation
    failure: ``OperationalError``) leaves it as ``StoreError``. Any other is a bug, and
    is raised as it is."""

    @contextlib.asynccontextmanager
    async def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - the pool's own signature
    ) -> AsyncIterator[Conn]:
        try:
            async with super().connection(timeout) as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise StoreError(_one_line(exc)) from exc


class PostgresStore(PostgresActivity, Store):
    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        open_timeout: float = 15.0,
        kept_limits: tuple[int, int] = (KEPT_MAX, KEPT_BYTES),
    ) -> None:
        self.url = url
        # (most kept callbacks, most bytes of their bodies together)
        self.kept_limits = kept_limits
        self._open_timeout = open_timeout
        self._pool = _Pool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": True},
        )
        self._applies: Rounds[ApplyCall] = Rounds(self._apply_round)

    async def open(self) -> None:
        """Raises ``StoreError`` (one line, credentials hidden) when the database cannot
        be reached within ``CONNECT_TIMEOUT`` seconds or refuses the service."""
        try:
            # One plain connection first: an unreachable server fails here, at once
            # and quietly, instead of after the pool's retries and a warning for each.
            probe = await psycopg.AsyncConnection.connect(self.url, connect_timeout=CONNECT_TIMEOUT)
            await probe.close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {_one_line(exc)}") from exc
        try:
            await self._pool.open(wait=True, timeout=self._open_timeout)
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(render(MIGRATIONS_TABLE, POSTGRES))
                cursor = await conn.execute("SELECT version FROM schema_migrations")
                done = {row["version"] for row in await cursor.fetchall()}
                for version, script in enumerate(MIGRATIONS, start=1):
                    if version not in done:
                        await conn.execute(script)
                        await conn.execute(
                            "INSERT INTO schema_migrations VALUES (%s, extract(epoch from now()))",
                            (version,),
                        )
        except (psycopg.Error, TimeoutError, StoreError) as exc:
            await self._pool.close()
            raise StoreError(f"cannot open the PostgreSQL store: {_one_line(exc)}") from exc

    async def close(self) -> None:
        await self._applies.drain()
        await self._pool.close()

    async def ping(self) -> None:
        try:
            async with self._pool.connection(timeout=5) as conn:
                await conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(str(exc)) from exc

    async def create_job(
        self, job: Job, *, idempotency_key: str | None = None, detail: str = ""
    ) -> tuple[Job, bool]:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) VALUES ({', '.join(['%s'] * NEW_JOB_WIDTH)})"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                new_job_row(job, idempotency_key),
            )
            if await cursor.fetchone() is None:
                row = await (
                    await conn.execute(
                        "SELECT id FROM jobs WHERE idempotency_key = %s", (idempotency_key,)
                    )
                ).fetchone()
                assert row is not None
                existing = await _job(conn, row["id"])
                assert existing is not None
                return existing, False
            await _add_event(conn, job.id, job.created_at, job.last_source, str(job.state), detail)
            created = await _job(conn, job.id)
            assert created is not None
            return created, True

    async def get_job(self, job_id: str, *, with_events: bool = True) -> Job | None:
        async with self._pool.connection() as conn:
            return await _job(conn, job_id, with_events=with_events)

    async def job_instance(self, job_id: str) -> str | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute("SELECT instance FROM jobs WHERE id = %s", (job_id,))
            ).fetchone()
            return row["instance"] if row else None

    async def find_by_upstream_id(self, upstream_id: str, instance: str) -> Job | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT * FROM jobs WHERE upstream_id = %s AND instance = %s"
                    " ORDER BY id DESC LIMIT 1",
                    (upstream_id, instance),
                )
            ).fetchone()
            return Job.from_row(row) if row else None

    async def list_jobs(
        self,
        *,
        state: State | None = None,
        limit: int = 50,
        before: str | None = None,
        search: str | None = None,
        direction: str | None = None,
        instance: str | None = None,
    ) -> list[Job]:
        sql, params = job_list_query("%s", state, limit, before, search, direction, instance)
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return [Job.from_row(row) for row in await cursor.fetchall()]

    async def apply(
        self,
        job_id: str,
        observation: Observation,
        *,
        delivery: Delivery | None = None,
        upstream_id: str | None = None,
        next_poll_at: float | _Keep | None = KEEP,
        kept_id: int | None = None,
        claim: Claim | None = None,
    ) -> Applied | None:
        call = ApplyCall(job_id, observation, delivery, upstream_id, next_poll_at, kept_id, claim)
        if kept_id is not None:
            # Rare (a callback that raced its job's submission): in a transaction of
            # its own, which reads what the round's two round trips need not.
            async with self._pool.connection() as conn:
                return await apply_one(conn, call)
        try:
            return await self._applies.submit(call)  # type: ignore[no-any-return]
        except psycopg.OperationalError as exc:
            # A call that failed alone in its round: its error left the pool's connection
            # as the call's outcome, not as an exception, so it is translated here.
            raise StoreError(_one_line(exc)) from exc

    async def _apply_round(self, calls: list[ApplyCall]) -> list[Outcome]:
        async with self._pool.connection() as conn:
            try:
                return await apply_round(conn, calls)
            except Exception:
                if conn.broken:
                    raise  # the database is gone: every call of the round fails alike
            outcomes: list[Outcome] = []
            for call in calls:
                try:
                    outcomes.append((True, await apply_one(conn, call)))
                except Exception as exc:
                    outcomes.append((False, exc))
            return outcomes

    async def keep_callback(
        self, delivery: Delivery, *, reason: str, body: bytes, instance: str = "default"
    ) -> str:
        ref = delivery.job_ref
        most, most_bytes = self.kept_limits
        outcome = "kept"
        async with self._pool.connection() as conn, conn.transaction():
            if reason == "unknown_job" and ref is not None:
                # Serialised with apply() recording an upstream id: by the job's row
                # (a callback at its URL) or by the upstream id (the instance-wide one).
                await conn.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (ref,))
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (ref,))
                known = await (
                    await conn.execute(
                        "SELECT 1 FROM jobs WHERE instance = %s AND"
                        " ((id = %s AND upstream_id IS NOT NULL) OR upstream_id = %s)",
                        (instance, ref, ref),
                    )
                ).fetchone()
                if known is not None:
                    return "known"
            cursor = await conn.execute(
                """INSERT INTO kept_callbacks
                       (webhook_id, job_ref, received_at, reason, body, digest, size,
                        instance)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT DO NOTHING RETURNING id""",
                (
                    delivery.webhook_id,
                    ref,
                    delivery.received_at,
                    reason,
                    body,
                    delivery.digest,
                    len(body),
                    instance,
                ),
            )
            if await cursor.fetchone() is None:
                return "duplicate"
            cursor = await conn.execute(
                "INSERT INTO deliveries (webhook_id, job_id, received_at, digest, outcome)"
                " VALUES (%s, NULL, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING webhook_id",
                (delivery.webhook_id, delivery.received_at, delivery.digest, reason),
            )
            if await cursor.fetchone() is None:
                outcome = "duplicate"
                raise psycopg.Rollback()  # the kept row goes with it
            row = await (await conn.execute(KEPT_SIZE, (instance,))).fetchone()
            if row is not None and (row["n"] > most or row["size"] > most_bytes):
                over = await (
                    await conn.execute(KEPT_OVER, (instance, most_bytes, most))
                ).fetchone()
                if over is not None:
                    await conn.execute(KEPT_DROP, (instance, over["id"]))
        return outcome

    async def kept_for(self, refs: list[str], instance: str = "default") -> list[KeptCallback]:
        refs = [ref for ref in refs if ref]
        if not refs:
            return []
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, webhook_id, job_ref, received_at, reason, body, instance"
                " FROM kept_callbacks WHERE applied_at IS NULL AND instance = %s"
                " AND job_ref = ANY(%s) ORDER BY id",
                (instance, refs),
            )
            return [
                KeptCallback(**{**row, "body": bytes(row["body"])})
                for row in await cursor.fetchall()
            ]

    async def claim_due(self, now: float, limit: int, owner: str, lease: float) -> list[Job]:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                """WITH due AS (
                       SELECT id FROM jobs
                       WHERE next_poll_at <= %s AND (lease_until IS NULL OR lease_until < %s)
                       ORDER BY next_poll_at LIMIT %s
                       FOR UPDATE SKIP LOCKED)
                   UPDATE jobs SET lease_owner = %s, lease_until = %s
                   FROM due WHERE jobs.id = due.id
                   RETURNING jobs.*""",
                (now, now, limit, owner, now + lease),
            )
            rows = await cursor.fetchall()
        jobs = [Job.from_row(row) for row in rows]
        return sorted(jobs, key=lambda job: job.next_poll_at or 0.0)

    async def reschedule(
        self,
        job_id: str,
        next_poll_at: float | None,
        *,
        detail: str | None = None,
        not_found: bool = False,
    ) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"""UPDATE jobs SET next_poll_at = %s, lease_owner = NULL, lease_until = NULL,
                        not_found_count = CASE WHEN %s THEN not_found_count + 1 ELSE 0 END
                    WHERE id = %s AND state NOT IN {TERMINAL_SQL}
                    RETURNING state""",
                (next_poll_at, not_found, job_id),
            )
            row = await cursor.fetchone()
            if detail and row is not None:
                await conn.execute(
                    "INSERT INTO events (job_id, at, source, state, detail) "
                    "VALUES (%s, extract(epoch from clock_timestamp()), 'poll', %s, %s)",
                    (job_id, row["state"], detail),
                )

    async def next_due_at(self) -> float | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT MIN(next_poll_at) AS due FROM jobs WHERE next_poll_at IS NOT NULL"
                )
            ).fetchone()
            return row["due"] if row else None

    async def release_leases(self, owner: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s",
                (owner,),
            )

    async def count_by_state(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            return {row["state"]: row["n"] for row in await cursor.fetchall()}

    async def count_by_instance(self) -> dict[str, dict[str, int]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT instance, state, COUNT(*) AS n FROM jobs GROUP BY instance, state"
            )
            counts: dict[str, dict[str, int]] = {}
            for row in await cursor.fetchall():
                counts.setdefault(row["instance"], {})[row["state"]] = row["n"]
            return counts

    async def prune(self, before: float, *, batch: int = 1000) -> Pruned:
        removed: dict[str, int] = {}
        params = {"before": before, "batch": batch}
        for table, sql in PRUNE_SQL.items():
            removed[table] = 0
            while True:
                # One batch per transaction: no lock is held for long.
                async with self._pool.connection() as conn:
                    cursor = await conn.execute(sql, params)
                    count = cursor.rowcount
                removed[table] += count
                if count < batch:
                    break
        return Pruned(**removed)

    # -- failed records -------------------------------------------------------------

    async def claim_copies(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[CopyState]:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                CLAIM_COPIES_POSTGRES, (now, now, limit, owner, now + lease)
            )
            rows = await cursor.fetchall()
        return sorted((copy_state(row) for row in rows), key=lambda state: state.due_at or 0.0)

    async def save_copy(
        self,
        state: CopyState,
        owner: str,
        records: Sequence[str] = (),
        *,
        lease_until: float | None = None,
    ) -> bool:
        before = state.kept - len(records)
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(SAVE_COPY, save_params(state, owner, lease_until, before))
            if not cursor.rowcount:
                return False
            async with conn.cursor() as many:
                await many.executemany(
                    INSERT_RECORD,
                    [(state.job_id, before + n, record) for n, record in enumerate(records, 1)],
                )
        return True

    async def copy_state(self, job_id: str) -> CopyState | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(READ_COPY, (job_id,))).fetchone()
            return copy_state(row) if row is not None else None

    async def failed_records(self, job_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(READ_RECORDS, (job_id, after, limit))
            return [(row["seq"], row["record"]) for row in await cursor.fetchall()]

    async def next_copy_due(self) -> float | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(NEXT_DUE)).fetchone()
            return row["due"] if row else None

    async def release_copy_leases(self, owner: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(RELEASE, (owner,))

    # -- download results -----------------------------------------------------------

    async def claim_fetches(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[FetchState]:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                CLAIM_FETCHES_POSTGRES, (now, now, limit, owner, now + lease)
            )
            rows = await cursor.fetchall()
        return sorted((fetch_state(row) for row in rows), key=lambda state: state.due_at or 0.0)

    async def save_fetch(
        self, state: FetchState, owner: str, *, lease_until: float | None = None
    ) -> bool:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(SAVE_FETCH, save_fetch_params(state, owner, lease_until))
            return bool(cursor.rowcount)

    async def fetch_state(self, job_id: str) -> FetchState | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(READ_FETCH, (job_id,))).fetchone()
            return fetch_state(row) if row is not None else None

    async def next_fetch_due(self) -> float | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(NEXT_FETCH_DUE)).fetchone()
            return row["due"] if row else None

    async def release_fetch_leases(self, owner: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(RELEASE_FETCHES, (owner,))
