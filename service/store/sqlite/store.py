"""The embedded store: one SQLite file in WAL mode, written by one thread (``writer``)."""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.downloads.rules import FetchState
from service.failed_records.rules import CopyState
from service.jobs import Job, Observation, State, TimelineEntry
from service.store.activity import SQLiteActivity, job_list_query
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
    CLAIM_COPIES_SQLITE,
    ENQUEUE,
    INSERT_RECORD,
    LEASE,
    NEXT_DUE,
    READ_COPY,
    READ_RECORDS,
    RELEASE,
    SAVE_COPY,
    copy_state,
    newly_failed,
    save_params,
)
from service.store.fetches import (
    CLAIM_FETCHES_SQLITE,
    ENQUEUE_FETCH,
    LEASE_FETCH,
    NEXT_FETCH_DUE,
    READ_FETCH,
    RELEASE_FETCHES,
    SAVE_FETCH,
    enqueue_params,
    fetch_state,
    newly_completed,
    save_fetch_params,
)
from service.store.plan import (
    APPLY,
    NEW_JOB_COLUMNS,
    NEW_JOB_WIDTH,
    bind,
    new_job_row,
    plan_apply,
    refusal_event,
)
from service.store.retention import KEPT_DROP, KEPT_OVER, KEPT_SIZE, PRUNE_SQL, sqlite_sql
from service.store.schema import (
    DOWNLOADS,
    FAILED_RECORDS,
    INSTANCES,
    JOBS_UPSTREAM_ERROR,
    MIGRATIONS_TABLE,
    REJECTION_REPEATS,
    SQLITE,
    TERMINAL_SQL,
    migrations,
    render,
)
from service.store.sqlite.writer import SQLiteConnections, connect

__all__ = ["SQLiteStore"]

_RECENT_JOBS = 4096

# The shared schema (``schema``) with what only SQLite has; why it differs is said there.
MIGRATIONS: tuple[str, ...] = migrations(
    SQLITE,
    {
        # 3: the kept bodies' sizes are counted and totalled from an index of their own.
        3: """
    CREATE INDEX kept_size ON kept_callbacks (size);
    """,
        # 4: the body's digest moves to the timeline entry it made, and the timeline's
        # index leads with it after the job: the check for a body seen before reads the
        # index every timeline entry writes anyway, instead of a B-tree of its own that
        # cost every callback one more page to write.
        4: """
    DROP INDEX deliveries_body;
    ALTER TABLE events ADD COLUMN digest TEXT;
    DROP INDEX events_job;
    CREATE INDEX events_job ON events (job_id, digest, seq);
    """,
        # 5: the same index, unique: a body's timeline entry is written before anything
        # else it changes, and finding it written already is what makes it a duplicate,
        # so no callback pays for a separate look-up. Digests are kept as the short
        # binary key ``_digest_key`` makes. A body seen twice before this version keeps
        # its first entry's digest.
        5: """
    UPDATE events SET digest = digest_key(digest) WHERE digest IS NOT NULL;
    UPDATE events SET digest = NULL WHERE digest IS NOT NULL AND seq NOT IN
        (SELECT MIN(seq) FROM events WHERE digest IS NOT NULL GROUP BY job_id, digest);
    DROP INDEX events_job;
    CREATE UNIQUE INDEX events_job ON events (job_id, digest);
    """,
        # 6: the upstream's message about a job (as PostgreSQL's 4).
        6: JOBS_UPSTREAM_ERROR,
        # 7: failed records kept after the upstream forgets them (as PostgreSQL's 5).
        7: render(FAILED_RECORDS, SQLITE),
        # 8: download jobs and the fetches of their results (as PostgreSQL's 6).
        8: render(DOWNLOADS, SQLITE),
        # 9: several connector instances (as PostgreSQL's 7).
        9: INSTANCES,
        # 10: a row of refused callbacks may stand for several (as PostgreSQL's 8).
        10: render(REJECTION_REPEATS, SQLITE),
    },
)


# The poller's query each tick: served by the jobs_due index, it reads the due jobs
# only, however many jobs the store holds (bench/run.py prints its plan).
CLAIM_DUE = """SELECT id FROM jobs WHERE next_poll_at <= ?
    AND (lease_until IS NULL OR lease_until < ?)
    ORDER BY next_poll_at LIMIT ?"""


# A job's next poll, its lease given up; a job in a terminal state is polled no more.
_RESCHEDULE = f"""UPDATE jobs SET next_poll_at = ?, lease_owner = NULL, lease_until = NULL,
        not_found_count = CASE WHEN ? THEN not_found_count + 1 ELSE 0 END
    WHERE id = ? AND state NOT IN {TERMINAL_SQL}"""


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(render(MIGRATIONS_TABLE, SQLITE))
    conn.create_function("digest_key", 1, _digest_key, deterministic=True)
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for version, script in enumerate(MIGRATIONS, start=1):
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise


def _release_every_lease(conn: sqlite3.Connection) -> None:
    """Give up the leases a process left behind when it was killed mid-poll (or
    mid-copy, mid-fetch): the SQLite store serves one process, so every lease found as
    it opens is such a one, and its work is due again now, not once the lease ran out."""
    leased = ("jobs", "failed_copies", "result_fetches")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table in tables.intersection(leased):
        conn.execute(
            f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_owner IS NOT NULL"
        )


def _events(conn: sqlite3.Connection, job_id: str) -> tuple[TimelineEntry, ...]:
    rows = conn.execute(
        "SELECT at, source, state, detail FROM events WHERE job_id = ? ORDER BY seq", (job_id,)
    )
    return tuple(TimelineEntry(*row) for row in rows)


def _job(conn: sqlite3.Connection, job_id: str, with_events: bool = True) -> Job | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    return Job.from_row(row, _events(conn, job_id) if with_events else ())


def _digest_key(digest: str | bytes | None) -> str | bytes | bytearray | None:
    """How the timeline keeps a body's SHA-256 (64 hex digits): its first 16 bytes.

    Every callback writes the key twice (its row and the unique index) and syncs it:
    a quarter of the hex text's 64 bytes. 128 bits still tell bodies apart, and only
    the holder of the signature key can make a body the service accepts at all. Any
    other value is kept as it is. The bytes are a ``bytearray``, which the sqlite3
    module binds as the same BLOB without first trying (and failing) to adapt it, as it
    does ``bytes``.
    """
    if isinstance(digest, str) and len(digest) == 64:
        try:
            return bytearray.fromhex(digest[:32])
        except ValueError:
            return digest
    return digest


def _add_event(
    conn: sqlite3.Connection,
    job_id: str,
    at: float,
    source: str,
    state: str,
    detail: str,
    digest: str | None = None,
) -> int | None:
    """Append a timeline entry and return its ``seq``; None, with nothing written, when
    ``digest`` (the SHA-256 of the callback body the entry comes from) made an entry in
    this job's timeline before."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO events (job_id, at, source, state, detail, digest)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, at, source, state, detail, _digest_key(digest)),
    )
    return cursor.lastrowid if cursor.rowcount else None


def _record(
    conn: sqlite3.Connection,
    job_id: str,
    at: float,
    entry: tuple[str, str, str],
    digest: str | None,
    delivery: Delivery | None,
    outcome: str | None,
) -> int | None:
    """The timeline entry, then the delivery by its webhook id: the entry's ``seq``, or
    None with nothing written when either the body or the webhook id came before."""
    seq = _add_event(conn, job_id, at, *entry, digest)
    if seq is None or delivery is None:
        return seq
    inserted = conn.execute(
        # The delivery's row does not repeat the digest: the timeline entry holds it.
        "INSERT OR IGNORE INTO deliveries (webhook_id, job_id, received_at, outcome)"
        " VALUES (?, ?, ?, ?)",
        (delivery.webhook_id, job_id, delivery.received_at, outcome),
    ).rowcount
    if not inserted:
        conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
        return None
    return seq


def _assignments(changes: dict[str, Any]) -> tuple[str, list[Any]]:
    """An UPDATE's ``SET`` list for ``changes`` (each ending in ", ") and its parameters.

    A column set to None is written ``NULL`` in the statement rather than bound: the
    sqlite3 module tries to adapt every bound value that is not exactly an int, float
    or str, and each such try raises and clears two AttributeErrors (a callback's
    update clears the poll lease, two None values, each time).
    """
    parts: list[str] = []
    values: list[Any] = []
    for column, value in changes.items():
        if value is None:
            parts.append(f"{column} = NULL, ")
        else:
            parts.append(f"{column} = ?, ")
            values.append(value)
    return "".join(parts), values


def _seen(conn: sqlite3.Connection, job_id: str, digest: str | None) -> bool:
    """Whether this body already made an entry in the job's timeline."""
    if digest is None:
        return False
    row = conn.execute(
        "SELECT 1 FROM events WHERE job_id = ? AND digest = ? LIMIT 1",
        (job_id, _digest_key(digest)),
    ).fetchone()
    return row is not None


class SQLiteStore(SQLiteActivity, Store):
    def __init__(
        self, path: str | Path, *, kept_limits: tuple[int, int] = (KEPT_MAX, KEPT_BYTES)
    ) -> None:
        self.path = str(path)
        # (most kept callbacks, most bytes of their bodies together)
        self.kept_limits = kept_limits
        # The rows of recently written jobs, as this store's writes left them: a callback
        # for a job in flight (written at its submission) needs no read before deciding.
        # Only writes touch it, on the event loop; a rolled-back round clears it, and
        # the compare-and-set on ``version`` catches a writer from outside.
        self._recent: OrderedDict[str, Job] = OrderedDict()
        self._sql = SQLiteConnections(self.path, on_rollback=self._recent.clear)

    async def open(self) -> None:
        """Raises ``StoreError`` (one line, fit to print at start-up) when the file
        cannot be used: a directory, a place that cannot be written, not a database."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            try:
                _migrate(conn)
                _release_every_lease(conn)
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(f"cannot open the SQLite database {self.path}: {reason}") from exc
        self._sql.start()

    async def close(self) -> None:
        await self._sql.stop()

    async def ping(self) -> None:
        try:
            await self._sql.read(lambda conn: conn.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def create_job(
        self, job: Job, *, idempotency_key: str | None = None, detail: str = ""
    ) -> tuple[Job, bool]:
        def op(conn: sqlite3.Connection) -> tuple[Job, bool]:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    existing = _job(conn, row["id"])
                    assert existing is not None
                    return existing, False
            conn.execute(
                f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) VALUES ({', '.join('?' * NEW_JOB_WIDTH)})",
                new_job_row(job, idempotency_key),
            )
            _add_event(conn, job.id, job.created_at, job.last_source, str(job.state), detail)
            created = _job(conn, job.id)
            assert created is not None
            return created, True

        return await self._sql.write(op)

    async def get_job(self, job_id: str, *, with_events: bool = True) -> Job | None:
        return await self._sql.read(lambda conn: _job(conn, job_id, with_events))

    async def job_instance(self, job_id: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT instance FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row[0] if row else None

        return await self._sql.read(op)

    async def find_by_upstream_id(self, upstream_id: str, instance: str) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                "SELECT id FROM jobs WHERE upstream_id = ? AND instance = ?"
                " ORDER BY id DESC LIMIT 1",
                (upstream_id, instance),
            ).fetchone()
            return _job(conn, row["id"], False) if row else None

        return await self._sql.read(op)

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
        sql, params = job_list_query("?", state, limit, before, search, direction, instance)

        def op(conn: sqlite3.Connection) -> list[Job]:
            return [Job.from_row(row) for row in conn.execute(sql, params)]

        return await self._sql.read(op)

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
        def op(conn: sqlite3.Connection) -> Applied | None:
            job = self._recent.get(job_id) or _job(conn, job_id, with_events=False)
            if job is None:
                return None
            binding = bind(job, claim) if claim is not None else APPLY
            if binding.wait:
                return Applied(job, None, waiting=True)
            adopt = claim.upstream_id if claim is not None else upstream_id
            digest = delivery.digest if delivery is not None else None
            if kept_id is not None:
                claimed, digest = _claim_kept(
                    conn, job_id, kept_id, observation.at, binding.refused
                )
                if not claimed:
                    return Applied(job, None, duplicate=True, refused=binding.refused)
            if binding.refused:
                entry = refusal_event(job, binding.refused, observation.detail)
                if _record(conn, job_id, observation.at, entry, digest, delivery, "wrong_job"):
                    return Applied(job, None, refused=binding.refused)
                return Applied(job, None, duplicate=True, refused=binding.refused)
            seq: int | None = None
            for attempt in range(2):
                plan = plan_apply(job, observation, upstream_id=adopt, next_poll_at=next_poll_at)
                if seq is None:
                    # Written first: finding it written already is the duplicate check.
                    seq = _record(conn, job_id, observation.at, plan.event, digest, delivery, None)
                    if seq is None:
                        return Applied(job, None, duplicate=True)
                else:
                    conn.execute(
                        "UPDATE events SET source = ?, state = ?, detail = ? WHERE seq = ?",
                        (*plan.event, seq),
                    )
                assignments, values = _assignments(plan.changes)
                updated = conn.execute(
                    f"UPDATE jobs SET {assignments}version = version + 1 "
                    "WHERE id = ? AND version = ?",
                    (*values, job_id, job.version),
                ).rowcount
                if updated:
                    break
                # Changed by a writer outside this store: decide again on the real row.
                self._recent.pop(job_id, None)
                job = _job(conn, job_id, with_events=False)
                if job is None or attempt:
                    raise StoreError(f"job {job_id} changed underneath (compare-and-set failed)")
            fresh = plan.applied_to(job)
            if newly_failed(job, fresh):
                conn.execute(sqlite_sql(ENQUEUE), (job_id, observation.at, observation.at))
            if newly_completed(job, fresh):
                # The fetch of its result, in the transaction that completes the job.
                conn.execute(sqlite_sql(ENQUEUE_FETCH), enqueue_params(fresh, observation.at))
            self._remember(fresh)
            return Applied(fresh, plan.decision)

        return await self._sql.write(op)

    def _remember(self, job: Job) -> None:
        self._recent[job.id] = job
        self._recent.move_to_end(job.id)
        if len(self._recent) > _RECENT_JOBS:
            self._recent.popitem(last=False)

    async def keep_callback(
        self, delivery: Delivery, *, reason: str, body: bytes, instance: str = "default"
    ) -> str:
        most, most_bytes = self.kept_limits

        def op(conn: sqlite3.Connection) -> str:
            ref = delivery.job_ref
            if reason == "unknown_job" and ref is not None:
                known = conn.execute(
                    "SELECT 1 FROM jobs WHERE instance = ? AND"
                    " ((id = ? AND upstream_id IS NOT NULL) OR upstream_id = ?)",
                    (instance, ref, ref),
                ).fetchone()
                if known is not None:
                    return "known"
            kept = conn.execute(
                """INSERT OR IGNORE INTO kept_callbacks
                       (webhook_id, job_ref, received_at, reason, body, digest, size,
                        instance)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
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
            if not kept.rowcount:
                return "duplicate"
            inserted = conn.execute(
                "INSERT OR IGNORE INTO deliveries (webhook_id, job_id, received_at, digest,"
                " outcome) VALUES (?, NULL, ?, ?, ?)",
                (delivery.webhook_id, delivery.received_at, delivery.digest, reason),
            ).rowcount
            if not inserted:
                conn.execute("DELETE FROM kept_callbacks WHERE id = ?", (kept.lastrowid,))
                return "duplicate"
            count, size = conn.execute(sqlite_sql(KEPT_SIZE), (instance,)).fetchone()
            if count > most or size > most_bytes:
                row = conn.execute(sqlite_sql(KEPT_OVER), (instance, most_bytes, most)).fetchone()
                if row is not None:
                    conn.execute(sqlite_sql(KEPT_DROP), (instance, row[0]))
            return "kept"

        return await self._sql.write(op)

    async def kept_for(self, refs: list[str], instance: str = "default") -> list[KeptCallback]:
        refs = [ref for ref in refs if ref]
        if not refs:
            return []
        marks = ",".join("?" for _ in refs)
        sql = (
            "SELECT id, webhook_id, job_ref, received_at, reason, body, instance"
            " FROM kept_callbacks WHERE applied_at IS NULL AND instance = ?"
            f" AND job_ref IN ({marks}) ORDER BY id"
        )

        def op(conn: sqlite3.Connection) -> list[KeptCallback]:
            return [KeptCallback(*row) for row in conn.execute(sql, (instance, *refs))]

        return await self._sql.read(op)

    async def claim_due(self, now: float, limit: int, owner: str, lease: float) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(CLAIM_DUE, (now, now, limit)).fetchall()
            ids = [row["id"] for row in rows]
            conn.executemany(
                "UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ?",
                [(owner, now + lease, job_id) for job_id in ids],
            )
            return [job for job_id in ids if (job := _job(conn, job_id, False)) is not None]

        return await self._sql.write(op)

    async def reschedule(
        self,
        job_id: str,
        next_poll_at: float | None,
        *,
        detail: str | None = None,
        not_found: bool = False,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._recent.pop(job_id, None)
            conn.execute(_RESCHEDULE, (next_poll_at, not_found, job_id))
            if detail:
                row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None:
                    _add_event(conn, job_id, time.time(), "poll", row["state"], detail)

        await self._sql.write(op)

    async def next_due_at(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_poll_at) FROM jobs WHERE next_poll_at IS NOT NULL"
            ).fetchone()
            due: float | None = row[0]
            return due

        return await self._sql.read(op)

    async def release_leases(self, owner: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (owner,),
            )

        await self._sql.write(op)

    async def count_by_state(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            return {row[0]: row[1] for row in rows}

        return await self._sql.read(op)

    async def count_by_instance(self) -> dict[str, dict[str, int]]:
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            rows = conn.execute(
                "SELECT instance, state, COUNT(*) FROM jobs GROUP BY instance, state"
            )
            counts: dict[str, dict[str, int]] = {}
            for instance, state, n in rows:
                counts.setdefault(instance, {})[state] = n
            return counts

        return await self._sql.read(op)

    async def prune(self, before: float, *, batch: int = 1000) -> Pruned:
        removed: dict[str, int] = {}
        params = {"before": before, "batch": batch}
        for table, sql in PRUNE_SQL.items():
            removed[table] = 0
            statement = sqlite_sql(sql)

            def delete_batch(conn: sqlite3.Connection, statement: str = statement) -> int:
                return conn.execute(statement, params).rowcount

            while True:
                # One batch per write: other writes take their turn in between.
                count = await self._sql.write(delete_batch)
                removed[table] += count
                if count < batch:
                    break
        return Pruned(**removed)

    # -- failed records -------------------------------------------------------------

    async def claim_copies(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[CopyState]:
        def op(conn: sqlite3.Connection) -> list[CopyState]:
            ids = [
                row[0] for row in conn.execute(sqlite_sql(CLAIM_COPIES_SQLITE), (now, now, limit))
            ]
            conn.executemany(sqlite_sql(LEASE), [(owner, now + lease, job_id) for job_id in ids])
            rows = [conn.execute(sqlite_sql(READ_COPY), (job_id,)).fetchone() for job_id in ids]
            return [copy_state(row) for row in rows if row is not None]

        return await self._sql.write(op)

    async def save_copy(
        self,
        state: CopyState,
        owner: str,
        records: Sequence[str] = (),
        *,
        lease_until: float | None = None,
    ) -> bool:
        before = state.kept - len(records)
        params = save_params(state, owner, lease_until, before)

        def op(conn: sqlite3.Connection) -> bool:
            if not conn.execute(sqlite_sql(SAVE_COPY), params).rowcount:
                return False
            conn.executemany(
                sqlite_sql(INSERT_RECORD),
                [(state.job_id, before + n, record) for n, record in enumerate(records, 1)],
            )
            return True

        return await self._sql.write(op)

    async def copy_state(self, job_id: str) -> CopyState | None:
        def op(conn: sqlite3.Connection) -> CopyState | None:
            row = conn.execute(sqlite_sql(READ_COPY), (job_id,)).fetchone()
            return copy_state(row) if row is not None else None

        return await self._sql.read(op)

    async def failed_records(self, job_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        def op(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = conn.execute(sqlite_sql(READ_RECORDS), (job_id, after, limit))
            return [(row[0], row[1]) for row in rows]

        return await self._sql.read(op)

    async def next_copy_due(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            due: float | None = conn.execute(NEXT_DUE).fetchone()[0]
            return due

        return await self._sql.read(op)

    async def release_copy_leases(self, owner: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(sqlite_sql(RELEASE), (owner,))

        await self._sql.write(op)

    # -- download results -----------------------------------------------------------

    async def claim_fetches(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[FetchState]:
        def op(conn: sqlite3.Connection) -> list[FetchState]:
            claim = sqlite_sql(CLAIM_FETCHES_SQLITE)
            ids = [row[0] for row in conn.execute(claim, (now, now, limit))]
            conn.executemany(
                sqlite_sql(LEASE_FETCH), [(owner, now + lease, job_id) for job_id in ids]
            )
            rows = [conn.execute(sqlite_sql(READ_FETCH), (job_id,)).fetchone() for job_id in ids]
            return [fetch_state(row) for row in rows if row is not None]

        return await self._sql.write(op)

    async def save_fetch(
        self, state: FetchState, owner: str, *, lease_until: float | None = None
    ) -> bool:
        params = save_fetch_params(state, owner, lease_until)

        def op(conn: sqlite3.Connection) -> bool:
            return bool(conn.execute(sqlite_sql(SAVE_FETCH), params).rowcount)

        return await self._sql.write(op)

    async def fetch_state(self, job_id: str) -> FetchState | None:
        def op(conn: sqlite3.Connection) -> FetchState | None:
            row = conn.execute(sqlite_sql(READ_FETCH), (job_id,)).fetchone()
            return fetch_state(row) if row is not None else None

        return await self._sql.read(op)

    async def next_fetch_due(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            due: float | None = conn.execute(NEXT_FETCH_DUE).fetchone()[0]
            return due

        return await self._sql.read(op)

    async def release_fetch_leases(self, owner: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(sqlite_sql(RELEASE_FETCHES), (owner,))

        await self._sql.write(op)


def _claim_kept(
    conn: sqlite3.Connection, job_id: str, kept_id: int, at: float, refused: str | None
) -> tuple[bool, str | None]:
    """Mark a kept callback as handled and its delivery as this job's: (False, …) when
    the same body was applied to this job already (it came again before it was
    applied), and the body's digest for the timeline entry it makes."""
    row = conn.execute(
        "SELECT webhook_id, digest FROM kept_callbacks WHERE id = ?", (kept_id,)
    ).fetchone()
    conn.execute("UPDATE kept_callbacks SET applied_at = ? WHERE id = ?", (at, kept_id))
    if row is None:
        return True, None
    if _seen(conn, job_id, row["digest"]):
        return False, row["digest"]
    conn.execute(
        "UPDATE OR IGNORE deliveries SET job_id = ?, outcome = COALESCE(?, outcome)"
        " WHERE webhook_id = ?",
        (job_id, "wrong_job" if refused else None, row["webhook_id"]),
    )
    return True, row["digest"]
