"""Applies on PostgreSQL: concurrent ones share one transaction, a failure is its own."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from service.jobs import Job, Observation, Source, State
from service.store import Delivery
from service.store.base import Applied, Claim, StoreError
from service.store.postgres.store import PostgresStore

from .helpers import download_job, make_job

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


async def _submitted(store: PostgresStore, upstream_id: str, job: Job | None = None) -> Job:
    """``job`` (by default a new upload) once the upstream has accepted it as ``upstream_id``."""
    job, _ = await store.create_job(job or make_job())
    applied = await store.apply(
        job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id=upstream_id
    )
    assert applied is not None
    return applied.job


async def _deliveries(url: str) -> dict[str, str | None]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute("SELECT webhook_id, outcome FROM deliveries")
        return dict(await cursor.fetchall())


async def test_callbacks_for_one_job_in_a_round_are_applied_in_turn_and_written_once(
    store: PostgresStore, postgres_url: str
) -> None:
    job = await _submitted(store, "u-1")
    other = await _submitted(store, "u-2")
    now = time.time() + 0.123456789  # not a round number: times are kept exactly
    first, second, third, beside = await asyncio.gather(
        store.apply(
            job.id,
            Observation(Source.CALLBACK, status="RUNNING", records_count=5, at=now),
            delivery=Delivery("w1", now, job.id, "d1"),
            next_poll_at=now + 5,
        ),
        store.apply(
            job.id,
            Observation(Source.CALLBACK, status="STARTED", detail="late", at=now + 1),
            delivery=Delivery("w2", now, job.id, "d2"),
        ),
        store.apply(
            job.id,
            Observation(
                Source.CALLBACK,
                status="COMPLETED",
                records_count=10,
                records_failed_count=2,
                upstream_error="2 rows failed",
                at=now + 2,
            ),
            delivery=Delivery("w3", now, job.id, "d3"),
        ),
        store.apply(other.id, running(now), delivery=Delivery("w4", now, other.id, "d4")),
    )
    assert await _transactions(postgres_url, [job.id, other.id]) == 1
    assert first is not None and first.job.state == State.RUNNING
    assert first.job.version == job.version + 1
    assert second is not None and second.job.state == State.RUNNING  # STARTED is behind
    assert second.decision is not None and not second.decision.accepted
    assert third is not None and third.job.state == State.COMPLETED
    assert beside is not None and beside.job.state == State.RUNNING
    fetched = await store.get_job(job.id)
    assert fetched is not None
    assert fetched == dataclasses.replace(third.job, events=fetched.events)
    assert (fetched.version, fetched.records_count, fetched.records_failed_count) == (
        job.version + 3,
        10,
        2,
    )
    assert (fetched.updated_at, fetched.next_poll_at) == (now + 2, None)
    assert fetched.upstream_error == "2 rows failed"
    assert [(e.source, e.state, e.at) for e in fetched.events[-3:]] == [
        ("callback", "RUNNING", now),
        ("callback", "RUNNING", now + 1),
        ("callback", "COMPLETED", now + 2),
    ]
    assert "late" in fetched.events[-2].detail
    # An upload ending with failed records: their copy is scheduled, once.
    copy = await store.copy_state(job.id)
    assert copy is not None and (copy.status, copy.since) == ("pending", now + 2)
    assert await store.copy_state(other.id) is None
    assert await _deliveries(postgres_url) == {"w1": None, "w2": None, "w3": None, "w4": None}


async def test_a_round_of_applies_duplicates_refusals_and_waits_answers_each(
    store: PostgresStore, postgres_url: str
) -> None:
    plain = await _submitted(store, "u-1")
    repeated = await _submitted(store, "u-2")
    claimed = await _submitted(store, "u-3")
    early, _ = await store.create_job(make_job())  # no upstream id yet
    now = time.time()
    before = await store.apply(
        repeated.id, running(now), delivery=Delivery("seen", now, repeated.id, "d0")
    )
    assert before is not None
    results = await asyncio.gather(
        store.apply(plain.id, running(now), delivery=Delivery("a", now, plain.id, "d1")),
        store.apply(repeated.id, running(now), delivery=Delivery("seen", now, repeated.id, "dx")),
        store.apply(
            claimed.id,
            running(now),
            delivery=Delivery("wrong", now, claimed.id, "d2"),
            claim=Claim(None, "u-999"),
        ),
        store.apply(
            early.id,
            running(now),
            delivery=Delivery("wait", now, early.id, "d3"),
            claim=Claim(None, "u-4"),
        ),
        store.apply(
            claimed.id,
            Observation(Source.CALLBACK, status="COMPLETED", at=now + 1),
            delivery=Delivery("right", now, claimed.id, "d4"),
            claim=Claim(claimed.id, "u-3"),
        ),
        store.apply("no-such-job", running(now), delivery=Delivery("lost", now)),
        store.apply(plain.id, running(now + 1), delivery=Delivery("a", now, plain.id, "d1")),
    )
    applied, duplicate, refused, waiting, completed, unknown, again = results
    assert await _transactions(postgres_url, [plain.id, claimed.id]) == 1
    assert applied is not None and applied.job.state == State.RUNNING and not applied.duplicate
    assert duplicate is not None and duplicate.duplicate and duplicate.job == before.job
    assert refused is not None and refused.refused and "u-999" in refused.refused
    assert refused.job.version == claimed.version
    assert waiting is not None and waiting.waiting
    assert completed is not None and completed.job.state == State.COMPLETED
    assert completed.job.version == claimed.version + 1
    assert unknown is None
    assert again is not None and again.duplicate
    # What each left: one entry per change or refusal, in call order; no row moved
    # but by an apply.
    assert await store.get_job(repeated.id, with_events=False) == before.job
    after = await store.get_job(claimed.id)
    assert after is not None and after.version == claimed.version + 1
    assert [(e.state, e.detail.startswith("refused:")) for e in after.events[-2:]] == [
        ("CREATED", True),
        ("COMPLETED", False),
    ]
    assert await store.get_job(early.id) == early
    plain_after = await store.get_job(plain.id)
    assert plain_after is not None and plain_after.version == plain.version + 1
    assert await _deliveries(postgres_url) == {
        "seen": None,
        "a": None,
        "wrong": "wrong_job",
        "right": None,
    }


async def test_a_round_gives_up_a_lease_only_where_a_plan_does(
    store: PostgresStore, postgres_url: str
) -> None:
    kept = await _submitted(store, "u-1")
    given_up = await _submitted(store, "u-2")
    now = time.time()
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("UPDATE jobs SET lease_owner = 'poller', lease_until = %s", (now + 60,))
    await asyncio.gather(
        store.apply(kept.id, running(now)),  # the next poll stays as it was: so does the lease
        store.apply(given_up.id, running(now), next_poll_at=now + 5),
        store.apply(given_up.id, running(now + 1)),  # after the one that gave it up
    )
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cursor = await conn.execute("SELECT id, lease_owner, lease_until FROM jobs")
        leases = {row[0]: row[1:] for row in await cursor.fetchall()}
    assert leases == {kept.id: ("poller", now + 60), given_up.id: (None, None)}


async def test_a_round_whose_compare_and_set_misses_runs_its_calls_apart(
    store: PostgresStore, postgres_url: str
) -> None:
    """A trigger quietly skips one job's update: the round's write finds one row fewer
    than it applied to, so the round is undone and each call runs on its own; that
    job's caller alone is told, every other call applies once."""
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE FUNCTION skip() RETURNS trigger AS $$
               BEGIN RETURN NULL; END $$ LANGUAGE plpgsql"""
        )
        await conn.execute(
            "CREATE TRIGGER skip BEFORE UPDATE ON jobs FOR EACH ROW "
            "WHEN (OLD.hub = 'skip') EXECUTE FUNCTION skip()"
        )
    jobs = [(await store.create_job(make_job(state=State.CREATED)))[0] for _ in range(3)]
    skipped, _ = await store.create_job(make_job(state=State.CREATED, hub="skip"))
    now = time.time()
    results = await asyncio.gather(
        *(
            store.apply(job.id, running(now), delivery=Delivery(f"hook-{job.id}", now))
            for job in [jobs[0], skipped, *jobs[1:]]
        ),
        store.apply(jobs[0].id, running(now + 1), delivery=Delivery("again", now)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreError) and "compare-and-set" in str(results[1])
    first, _, second, third, again = results
    for result, job in [(first, jobs[0]), (second, jobs[1]), (third, jobs[2])]:
        assert isinstance(result, Applied) and result.job.version == job.version + 1
        assert result.job.state == State.RUNNING
    assert isinstance(again, Applied) and again.job.version == jobs[0].version + 2
    for job, applies in [(jobs[0], 2), (jobs[1], 1), (jobs[2], 1)]:
        fetched = await store.get_job(job.id)
        assert fetched is not None and fetched.version == job.version + applies
        assert [e.source for e in fetched.events].count("callback") == applies
    fetched = await store.get_job(skipped.id)
    assert fetched is not None and (fetched.version, len(fetched.events)) == (skipped.version, 1)
    assert f"hook-{skipped.id}" not in await _deliveries(postgres_url)


async def test_a_round_completing_a_download_schedules_its_fetch(store: PostgresStore) -> None:
    download = await _submitted(store, "u-1", download_job())
    upload = await _submitted(store, "u-2")
    now = time.time()
    started, completed, late, uploaded = await asyncio.gather(
        store.apply(download.id, running(now), delivery=Delivery("r", now, download.id, "d1")),
        store.apply(
            download.id,
            Observation(Source.CALLBACK, status="COMPLETED", at=now + 1),
            delivery=Delivery("c", now, download.id, "d2"),
        ),
        store.apply(
            download.id,
            Observation(Source.CALLBACK, status="COMPLETED", at=now + 2),
            delivery=Delivery("c2", now, download.id, "d3"),
        ),
        store.apply(
            upload.id,
            Observation(Source.CALLBACK, status="COMPLETED", records_failed_count=0, at=now),
            delivery=Delivery("u", now, upload.id, "d4"),
        ),
    )
    assert started is not None and started.job.state == State.RUNNING
    assert completed is not None and completed.job.state == State.COMPLETED
    assert late is not None and late.job.version == download.version + 3
    fetch = await store.fetch_state(download.id)
    assert fetch is not None and (fetch.status, fetch.format, fetch.since) == (
        "pending",
        "jsonl",
        now + 1,
    )
    assert uploaded is not None and uploaded.job.state == State.COMPLETED
    assert await store.fetch_state(upload.id) is None
    assert await store.copy_state(upload.id) is None  # no failed records: nothing to copy
