"""Applies on PostgreSQL: concurrent ones share one transaction, a failure is its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from service.jobs import Observation, Source, State
from service.store import Delivery
from service.store.base import Claim
from service.store.postgres.store import PostgresStore

from .helpers import make_job

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(postgres_url)
    await opened.open()
    yield opened
    await opened.close()


def running(at: float | None = None) -> Observation:
    return Observation(Source.CALLBACK, status="RUNNING", at=at or time.time())


async def _transactions(url: str, job_ids: list[str]) -> int:
    """How many transactions wrote these jobs' timeline entries (rows share an xmin)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM events WHERE job_id = ANY(%s) AND source = %s",
            (job_ids, "callback"),
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def test_concurrent_deliveries_commit_in_one_transaction(
    store: PostgresStore, postgres_url: str
) -> None:
    jobs = [(await store.create_job(make_job(state=State.CREATED)))[0] for _ in range(30)]
    applied = await asyncio.gather(
        *(
            store.apply(job.id, running(), delivery=Delivery(f"hook-{job.id}", time.time()))
            for job in jobs
        )
    )
    assert all(a is not None and a.job.state == State.RUNNING for a in applied)
    assert await _transactions(postgres_url, [job.id for job in jobs]) == 1
    for job in jobs:
        fetched = await store.get_job(job.id)
        assert fetched is not None and fetched.state == State.RUNNING
        assert fetched.version == job.version + 1


async def test_one_job_twice_in_a_round_is_applied_in_order(store: PostgresStore) -> None:
    job, _ = await store.create_job(make_job(state=State.CREATED))
    now = time.time()
    first, second, repeat = await asyncio.gather(
        store.apply(job.id, running(now), delivery=Delivery("a", now)),
        store.apply(
            job.id,
            Observation(Source.CALLBACK, status="COMPLETED", at=now + 1),
            delivery=Delivery("b", now),
        ),
        store.apply(job.id, running(now + 2), delivery=Delivery("a", now)),
    )
    assert first is not None and first.job.state == State.RUNNING
    assert second is not None and second.job.state == State.COMPLETED
    assert repeat is not None and repeat.duplicate
    fetched = await store.get_job(job.id)
    assert fetched is not None and fetched.state == State.COMPLETED
    assert fetched.version == job.version + 2
    assert [event.state for event in fetched.events] == ["CREATED", "RUNNING", "COMPLETED"]


async def test_a_delivery_for_an_unknown_job_is_not_recorded_by_its_round(
    store: PostgresStore,
) -> None:
    job, _ = await store.create_job(make_job(state=State.CREATED))
    now = time.time()
    known, unknown = await asyncio.gather(
        store.apply(job.id, running(), delivery=Delivery("known", now)),
        store.apply("no-such-job", running(), delivery=Delivery("early", now)),
    )
    assert known is not None and unknown is None
    # Not taken as a repeat: the callback is kept until its job appears.
    kept = await store.keep_callback(
        Delivery("early", now, "no-such-job"), reason="unknown_job", body=b"{}"
    )
    assert kept == "kept"


async def test_a_failing_apply_fails_alone_and_its_round_still_commits(
    store: PostgresStore, postgres_url: str
) -> None:
    """A trigger refuses one job's update: that caller gets the error, the rest apply."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE FUNCTION refuse() RETURNS trigger AS $$
               BEGIN RAISE EXCEPTION 'refused for the test'; END $$ LANGUAGE plpgsql"""
        )
        await conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON jobs FOR EACH ROW "
            "WHEN (OLD.hub = 'refuse') EXECUTE FUNCTION refuse()"
        )
    jobs = [(await store.create_job(make_job(state=State.CREATED)))[0] for _ in range(4)]
    refused, _ = await store.create_job(make_job(state=State.CREATED, hub="refuse"))
    results = await asyncio.gather(
        *(
            store.apply(job.id, running(), delivery=Delivery(f"hook-{job.id}", time.time()))
            for job in [*jobs[:2], refused, *jobs[2:]]
        ),
        return_exceptions=True,
    )
    assert isinstance(results[2], psycopg.errors.RaiseException)
    assert all(not isinstance(result, BaseException) for i, result in enumerate(results) if i != 2)
    for job in jobs:
        fetched = await store.get_job(job.id)
        assert fetched is not None and fetched.state == State.RUNNING
    fetched = await store.get_job(refused.id)
    assert fetched is not None and fetched.state == State.CREATED
    # Its delivery was undone with it: once the trigger is gone, the retry applies.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("DROP TRIGGER refuse ON jobs")
    again = await store.apply(
        refused.id, running(), delivery=Delivery(f"hook-{refused.id}", time.time())
    )
    assert again is not None and not again.duplicate and again.job.state == State.RUNNING


async def test_the_same_body_twice_in_a_round_is_applied_once(store: PostgresStore) -> None:
    job, _ = await store.create_job(make_job(state=State.CREATED))
    now = time.time()
    first, second = await asyncio.gather(
        store.apply(job.id, running(now), delivery=Delivery("w1", now, job.id, "same-body")),
        store.apply(job.id, running(now), delivery=Delivery("w2", now, job.id, "same-body")),
    )
    assert first is not None and second is not None
    assert sorted([first.duplicate, second.duplicate]) == [False, True]
    fetched = await store.get_job(job.id)
    assert fetched is not None and fetched.version == job.version + 1
    assert [event.source for event in fetched.events].count("callback") == 1


async def test_a_round_refuses_and_defers_claims_on_the_locked_row(
    store: PostgresStore, postgres_url: str
) -> None:
    known, _ = await store.create_job(make_job(state=State.CREATED))
    await store.apply(known.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="77")
    submitting, _ = await store.create_job(make_job())
    now = time.time()
    refused, waiting, adopted = await asyncio.gather(
        store.apply(
            known.id,
            running(now),
            delivery=Delivery("other", now, known.id, "d1"),
            claim=Claim(None, "78"),
        ),
        store.apply(
            submitting.id,
            running(now),
            delivery=Delivery("early", now, submitting.id, "d2"),
            claim=Claim(None, "79"),
        ),
        store.apply(
            submitting.id,
            running(now),
            delivery=Delivery("named", now, submitting.id, "d3"),
            claim=Claim(submitting.id, "80"),
        ),
    )
    assert refused is not None and refused.refused and "78" in refused.refused
    assert waiting is not None and waiting.waiting
    assert adopted is not None and adopted.job.upstream_id == "80"
    after = await store.get_job(known.id)
    assert after is not None and (after.state, after.version) == (State.CREATED, 1)
    assert after.events[-1].detail.startswith("refused:")
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cursor = await conn.execute("SELECT webhook_id, outcome FROM deliveries ORDER BY 1")
        assert await cursor.fetchall() == [("named", None), ("other", "wrong_job")]
