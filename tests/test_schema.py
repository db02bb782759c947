"""The schema each store builds, version by version, is the one it always built.

``fixtures/schema.json`` holds, for both stores and every migration version, the
schema a database at that version has: SQLite's ``sqlite_master``, PostgreSQL's
columns, constraints, indexes and sequences. A migration once shipped must keep
building exactly that, since databases out there were built by it; a new migration
adds its version's entry (``BULKHOOK_RECORD_SCHEMA=1`` records the versions missing,
never one already there).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from service.jobs import Observation, Source, State, new_job_id
from service.store import Delivery, open_store
from service.store.postgres import store as postgres
from service.store.sqlite import store as sqlite

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema.json"
STORES: dict[str, Any] = {"sqlite": sqlite, "postgresql": postgres}
BODY = b'{"id": "u-1", "status": "RUNNING"}'


def sqlite_schema(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    # The statements as written, their line breaks and indentation aside.
    return [
        f"{kind} {name} on {table}: {' '.join(sql.split()) if sql else sql}"
        for kind, name, table, sql in rows
    ]


def postgres_schema(url: str) -> list[str]:
    import psycopg

    lines: list[str] = []
    with psycopg.connect(url) as conn:
        for table, column, kind, nullable, default in conn.execute(
            """SELECT table_name, column_name, data_type, is_nullable, column_default
               FROM information_schema.columns WHERE table_schema = current_schema()
               ORDER BY table_name, ordinal_position"""
        ):
            null = "NULL" if nullable == "YES" else "NOT NULL"
            lines.append(f"column {table}.{column}: {kind} {null} DEFAULT {default}")
        for table, name, definition in conn.execute(
            """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
               FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
               ORDER BY 1, 2"""
        ):
            lines.append(f"constraint {name} on {table}: {definition}")
        for table, name, definition in conn.execute(
            """SELECT tablename, indexname, indexdef FROM pg_indexes
               WHERE schemaname = current_schema() ORDER BY 1, 2"""
        ):
            schema = conn.execute("SELECT current_schema()").fetchone()
            assert schema is not None
            lines.append(f"index {name} on {table}: {definition.replace(schema[0] + '.', '')}")
        for name, kind, start, increment in conn.execute(
            """SELECT sequence_name, data_type, start_value, increment
               FROM information_schema.sequences WHERE sequence_schema = current_schema()
               ORDER BY 1"""
        ):
            lines.append(f"sequence {name}: {kind} from {start} by {increment}")
    return lines


def schema_of(kind: str, url: str) -> list[str]:
    if kind == "sqlite":
        return sqlite_schema(url.removeprefix("sqlite:///"))
    return postgres_schema(url)


def recorded(kind: str, version: int, schema: list[str]) -> list[str]:
    """The schema recorded for ``version``; recorded now only when asked and missing."""
    fixture = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    versions = fixture.setdefault(kind, {})
    if str(version) not in versions:
        if not os.environ.get("BULKHOOK_RECORD_SCHEMA"):
            pytest.fail(f"no {kind} schema recorded for version {version} in {FIXTURE.name}")
        versions[str(version)] = schema
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    return versions[str(version)]  # type: ignore[no-any-return]


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the kind named by the test's ``kind`` parameter."""
    if request.node.callspec.params["kind"] == "sqlite":
        return f"sqlite:///{tmp_path / 'bulkhook.db'}"
    return request.getfixturevalue("postgres_url")  # type: ignore[no-any-return]


async def migrate(url: str) -> None:
    store = open_store(url)
    await store.open()
    await store.close()


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_a_fresh_database_has_the_schema_it_always_had(kind: str, database: str) -> None:
    await migrate(database)
    schema = schema_of(kind, database)
    assert schema == recorded(kind, len(STORES[kind].MIGRATIONS), schema)


# A body's SHA-256 as version 4 kept it in the timeline: 64 hex digits.
OLD_DIGEST = hashlib.sha256(b'{"id": "1", "status": "RUNNING"}').hexdigest()


def write_old_rows(kind: str, url: str, version: int, job_id: str) -> None:
    """A job with its timeline, a delivery and a kept callback, written with the first
    schema's columns (every later version still has them). A version-4 SQLite
    timeline also holds one body's digest (as hex text) twice, which version 5 no
    longer allows."""
    marker = "?" if kind == "sqlite" else "%s"
    statements: list[tuple[str, tuple[Any, ...]]] = [
        (
            "INSERT INTO jobs (id, hub, object, path, state, created_at, updated_at,"
            " last_source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (job_id, "marketing", "contact", "/c.csv", "CREATED", 1.0, 1.0, "submit"),
        ),
        (
            "INSERT INTO events (job_id, at, source, state, detail) VALUES (%s, %s, %s, %s, %s)",
            (job_id, 1.0, "submit", "SUBMITTING", ""),
        ),
        (
            "INSERT INTO events (job_id, at, source, state, detail) VALUES (%s, %s, %s, %s, %s)",
            (job_id, 2.0, "submit", "CREATED", ""),
        ),
        (
            "INSERT INTO deliveries (webhook_id, job_id, received_at) VALUES (%s, %s, %s)",
            ("w-old", job_id, 2.0),
        ),
        (
            "INSERT INTO kept_callbacks (webhook_id, job_ref, received_at, reason, body)"
            " VALUES (%s, %s, %s, %s, %s)",
            ("w-kept", "u-elsewhere", 2.0, "unknown_job", BODY),
        ),
    ]
    if kind == "sqlite" and version == 4:
        statements.append(("UPDATE events SET digest = %s WHERE job_id = %s", (OLD_DIGEST, job_id)))
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for sql, params in statements:
                conn.execute(sql.replace("%s", marker), params)
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            for sql, params in statements:
                conn.execute(sql, params)  # type: ignore[arg-type]


def kept_sizes(kind: str, url: str) -> list[int]:
    sql = "SELECT size FROM kept_callbacks ORDER BY id"
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [row[0] for row in conn.execute(sql)]
    import psycopg

    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(sql)]


def earlier_versions() -> list[tuple[str, int]]:
    return [
        (kind, version)
        for kind, module in sorted(STORES.items())
        for version in range(1, len(module.MIGRATIONS))
    ]


@pytest.mark.parametrize(("kind", "version"), earlier_versions())
async def test_a_database_at_every_earlier_version_upgrades(
    kind: str, version: int, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built by the first ``version`` migrations, it has that version's recorded schema;
    opened by today's store, it gains the rest, keeps its rows, and takes writes."""
    module = STORES[kind]
    monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:version])
    await migrate(database)
    schema = schema_of(kind, database)
    assert schema == recorded(kind, version, schema)
    job_id = new_job_id()
    write_old_rows(kind, database, version, job_id)
    monkeypatch.undo()

    store = open_store(database)
    await store.open()
    try:
        job = await store.get_job(job_id)
        assert job is not None and job.state == State.CREATED
        assert [event.state for event in job.events] == ["SUBMITTING", "CREATED"]
        running = Observation(Source.CALLBACK, status="RUNNING", at=time.time())
        applied = await store.apply(job_id, running, delivery=Delivery("w-new", time.time()))
        assert applied is not None and applied.job.state == State.RUNNING
        again = await store.apply(job_id, running, delivery=Delivery("w-old", time.time()))
        assert again is not None and again.duplicate
        assert [kept.webhook_id for kept in await store.kept_for(["u-elsewhere"])] == ["w-kept"]
    finally:
        await store.close()
    schema = schema_of(kind, database)
    assert schema == recorded(kind, len(module.MIGRATIONS), schema)
    if version < 3:  # kept bodies from before their size was recorded: their length
        assert kept_sizes(kind, database) == [len(BODY)]
    if kind == "sqlite" and version == 4:
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            digests = conn.execute(
                "SELECT digest FROM events WHERE job_id = ? ORDER BY seq LIMIT 2", (job_id,)
            ).fetchall()
        # The first entry keeps it, in the timeline's binary form, and it still tells a
        # repeat of that body, whatever its webhook id.
        assert digests == [(bytes.fromhex(OLD_DIGEST[:32]),), (None,)]
        store = open_store(database)
        await store.open()
        try:
            repeat = Observation(Source.CALLBACK, status="COMPLETED", at=time.time())
            delivery = Delivery("w-repeat", time.time(), job_id, OLD_DIGEST)
            applied = await store.apply(job_id, repeat, delivery=delivery)
            assert applied is not None and applied.duplicate
        finally:
            await store.close()


def version_of(module: Any, table: str) -> int:
    """The index in ``module.MIGRATIONS`` of the version that creates ``table``."""
    return next(
        n for n, script in enumerate(module.MIGRATIONS) if f"CREATE TABLE {table} " in script
    )


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_jobs_that_ended_with_failed_records_before_the_copies_have_theirs_scheduled(
    kind: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version that keeps failed records schedules a copy for every job that had
    ended with some (or ERROR/ABORTED without a count) and none for any other."""
    module = STORES[kind]
    monkeypatch.setattr(
        module, "MIGRATIONS", module.MIGRATIONS[: version_of(module, "failed_copies")]
    )
    await migrate(database)
    monkeypatch.undo()
    jobs = {
        "failed": ("COMPLETED", "u-1", 3),
        "clean": ("COMPLETED", "u-2", 0),
        "unknown": ("ABORTED", "u-3", None),
        "running": ("RUNNING", "u-4", 2),
        "never": ("SUBMIT_FAILED", None, None),
        "cancelled": ("CANCELLED", "u-5", None),
    }
    insert = (
        "INSERT INTO jobs (id, upstream_id, hub, object, path, state, records_failed_count,"
        " created_at, updated_at, last_source)"
        " VALUES (%s, %s, 'h', 'o', '/p', %s, %s, 1, 2, 'poll')"
    )
    rows = [(name, upstream, state, failed) for name, (state, upstream, failed) in jobs.items()]
    if kind == "sqlite":
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            conn.executemany(insert.replace("%s", "?"), rows)
    else:
        import psycopg

        with psycopg.connect(database) as conn, conn.cursor() as cursor:
            cursor.executemany(insert, rows)  # type: ignore[arg-type]
    store = open_store(database)
    await store.open()
    try:
        scheduled = {name for name in jobs if await store.copy_state(name) is not None}
        state = await store.copy_state("failed")
    finally:
        await store.close()
    assert scheduled == {"failed", "unknown"}
    assert state is not None and (state.status, state.kept, state.due_at) == ("pending", 0, 0)


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_jobs_from_before_downloads_are_uploads_with_nothing_to_fetch(
    kind: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = STORES[kind]
    monkeypatch.setattr(
        module, "MIGRATIONS", module.MIGRATIONS[: version_of(module, "result_fetches")]
    )
    await migrate(database)
    monkeypatch.undo()
    insert = (
        "INSERT INTO jobs (id, upstream_id, hub, object, path, state, created_at, updated_at,"
        " last_source) VALUES ('old', 'u-1', 'h', 'o', '/p', 'COMPLETED', 1, 2, 'poll')"
    )
    if kind == "sqlite":
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            conn.execute(insert)
    else:
        import psycopg

        with psycopg.connect(database) as conn:
            conn.execute(insert)
    store = open_store(database)
    await store.open()
    try:
        job = await store.get_job("old")
        fetch = await store.fetch_state("old")
        downloads = await store.list_jobs(direction="download")
    finally:
        await store.close()
    assert job is not None and (job.direction, job.query, job.format) == ("upload", None, None)
    assert fetch is None and downloads == []
