"""The store on a real SQLite file: atomic apply, dedupe, kept callbacks, leases."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from service.jobs import TERMINAL, Observation, Source, State, new_job_id
from service.store import Delivery, Store, StoreError, open_store
from service.store.base import Claim
from service.store.sqlite import store as sqlite_store

from .helpers import download_job, make_job

pytestmark = pytest.mark.anyio


async def test_create_and_read_a_job(store: Store) -> None:
    job, created = await store.create_job(make_job(), detail="received contacts.csv")
    assert created
    fetched = await store.get_job(job.id)
    assert fetched is not None and fetched.state == State.SUBMITTING
    assert [e.detail for e in fetched.events] == ["received contacts.csv"]


async def test_an_idempotency_key_returns_the_first_job(store: Store) -> None:
    first, created = await store.create_job(make_job(), idempotency_key="k1")
    second, again = await store.create_job(make_job(), idempotency_key="k1")
    assert created and not again
    assert second.id == first.id
    assert len(await store.list_jobs()) == 1


async def test_apply_moves_forward_and_records_the_timeline(store: Store) -> None:
    job, _ = await store.create_job(make_job())
    await store.apply(job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="77")
    applied = await store.apply(
        job.id,
        Observation(Source.CALLBACK, status="COMPLETED", records_count=10, records_failed_count=2),
        delivery=Delivery("hook-1", time.time()),
        next_poll_at=time.time() + 60,
    )
    assert applied is not None and applied.decision is not None and applied.decision.changed
    final = applied.job
    assert (final.state, final.upstream_id, final.last_source) == (
        State.COMPLETED,
        "77",
        "callback",
    )
    assert (final.records_count, final.records_failed_count) == (10, 2)
    assert final.next_poll_at is None  # terminal: nothing left to poll
    timeline = await store.get_job(job.id)
    assert timeline is not None
    assert [e.state for e in timeline.events] == ["SUBMITTING", "CREATED", "COMPLETED"]


async def test_a_repeated_delivery_changes_nothing(store: Store) -> None:
    job, _ = await store.create_job(make_job(state=State.RUNNING))
    observation = Observation(Source.CALLBACK, status="COMPLETED")
    first = await store.apply(job.id, observation, delivery=Delivery("hook-1", time.time()))
    again = await store.apply(
        job.id, Observation(Source.CALLBACK, status="ERROR"), delivery=Delivery("hook-1", 0)
    )
    assert first is not None and not first.duplicate
    assert again is not None and again.duplicate
    fetched = await store.get_job(job.id)
    assert fetched is not None and fetched.state == State.COMPLETED
    assert len(fetched.events) == 2


async def test_stale_news_is_recorded_and_ignored(store: Store) -> None:
    job, _ = await store.create_job(make_job(state=State.RUNNING))
    await store.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED"))
    late = await store.apply(job.id, Observation(Source.POLL, status="RUNNING"))
    assert late is not None and late.job.state == State.COMPLETED
    assert late.job.last_source == "callback"
    fetched = await store.get_job(job.id)
    assert fetched is not None and "ignored" in fetched.events[-1].detail


async def test_the_upstream_error_is_recorded_and_never_erased_by_later_news(
    store_url: str, store: Store
) -> None:
    job, _ = await store.create_job(make_job(state=State.RUNNING))
    assert job.upstream_error is None
    why = "All prospects require either 'email' or 'id'"
    aborted = await store.apply(
        job.id, Observation(Source.CALLBACK, status="ABORTED", upstream_error=why)
    )
    assert aborted is not None and (aborted.job.state, aborted.job.upstream_error) == (
        State.ABORTED,
        why,
    )
    # The same status again without a message, and news the state machine ignores.
    await store.apply(job.id, Observation(Source.POLL, status="ABORTED"))
    await store.apply(
        job.id, Observation(Source.CALLBACK, status="COMPLETED", upstream_error="other")
    )
    reopened = open_store(store_url)
    await reopened.open()
    try:
        fetched = await reopened.get_job(job.id)
    finally:
        await reopened.close()
    assert fetched is not None and (fetched.state, fetched.upstream_error) == (State.ABORTED, why)
    assert fetched.to_json()["upstream_error"] == why
    details = [event.detail for event in fetched.events]
    assert f"upstream says ABORTED; error: {why}" in details
    assert any("error: other" in d and "ignored" in d for d in details), details
    [listed] = await store.list_jobs()
    assert listed.upstream_error == why


async def test_apply_to_an_unknown_job_is_none(store: Store) -> None:
    assert await store.apply("nope", Observation(Source.POLL, status="RUNNING")) is None


async def test_concurrent_deliveries_are_each_applied_once(store: Store) -> None:
    jobs = [(await store.create_job(make_job(state=State.RUNNING)))[0] for _ in range(20)]
    observations = [
        store.apply(
            job.id,
            Observation(Source.CALLBACK, status="RUNNING"),
            delivery=Delivery(f"hook-{job.id}-{n}", time.time()),
        )
        for job in jobs
        for n in range(10)
    ]
    duplicates = [
        store.apply(
            jobs[0].id,
            Observation(Source.CALLBACK, status="RUNNING"),
            delivery=Delivery(f"hook-{jobs[0].id}-0", time.time()),
        )
        for _ in range(5)
    ]
    results = await asyncio.gather(*observations, *duplicates)
    assert sum(1 for r in results if r is not None and not r.duplicate) == 200
    for job in jobs:
        fetched = await store.get_job(job.id)
        assert fetched is not None and len(fetched.events) == 11


async def test_state_survives_reopening_the_store(store_url: str) -> None:
    first = open_store(store_url)
    await first.open()
    job, _ = await first.create_job(make_job())
    await first.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED"))
    await first.close()
    second = open_store(store_url)
    await second.open()  # migrations run again and change nothing
    try:
        fetched = await second.get_job(job.id)
        assert fetched is not None and fetched.state == State.COMPLETED
        assert len(await second.list_jobs()) == 1
    finally:
        await second.close()


async def test_sqlite_is_in_wal_mode_with_every_migration(tmp_path: Path) -> None:
    path = tmp_path / "state" / "bulkhook.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert versions == [(version,) for version in range(1, len(sqlite_store.MIGRATIONS) + 1)]


async def test_a_job_changed_outside_the_store_is_decided_on_its_real_row(
    tmp_path: Path,
) -> None:
    """The SQLite store remembers the rows it wrote; another writer's change still wins."""
    path = tmp_path / "bulkhook.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        job, _ = await store.create_job(make_job())
        running = Observation(Source.CALLBACK, status="RUNNING", at=time.time())
        applied = await store.apply(job.id, running, delivery=Delivery("d1", time.time()))
        assert applied is not None and applied.job.state == State.RUNNING
        with sqlite3.connect(path) as conn:  # as another process would
            conn.execute(
                "UPDATE jobs SET state = 'CANCELLED', version = version + 1 WHERE id = ?",
                (job.id,),
            )
        completed = Observation(Source.CALLBACK, status="COMPLETED", at=time.time())
        applied = await store.apply(job.id, completed, delivery=Delivery("d2", time.time()))
        assert applied is not None and applied.job.state == State.CANCELLED
        fetched = await store.get_job(job.id)
        assert fetched is not None and fetched.state == State.CANCELLED
        assert fetched.version == applied.job.version
    finally:
        await store.close()


async def test_a_failed_write_rolls_back_alone(tmp_path: Path) -> None:
    """One write of a group-commit round fails; the others in the round still commit."""
    store = open_store(f"sqlite:///{tmp_path / 'bulkhook.db'}")
    await store.open()
    try:
        first = make_job()
        results = await asyncio.gather(
            store.create_job(first),
            store.create_job(make_job(id=first.id)),  # the same id: refused
            store.create_job(make_job()),
            return_exceptions=True,
        )
        assert isinstance(results[1], sqlite3.IntegrityError)
        assert not isinstance(results[0], BaseException)
        assert not isinstance(results[2], BaseException)
        assert len(await store.list_jobs()) == 2
        running = Observation(Source.CALLBACK, status="RUNNING", at=time.time())
        applied = await store.apply(first.id, running)
        assert applied is not None and applied.job.state == State.RUNNING
    finally:
        await store.close()


async def test_an_unreachable_store_is_a_store_error() -> None:
    from service.store.postgres.store import PostgresStore

    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", open_timeout=1)
    with pytest.raises(StoreError, match="cannot open the PostgreSQL store"):
        await store.open()


async def test_kept_callbacks_wait_for_their_job(store: Store) -> None:
    kept = await store.keep_callback(
        Delivery("hook-9", time.time(), "upstream-9"), reason="unknown_job", body=b"{}"
    )
    again = await store.keep_callback(
        Delivery("hook-9", time.time(), "upstream-9"), reason="unknown_job", body=b"{}"
    )
    assert (kept, again) == ("kept", "duplicate")
    [item] = await store.kept_for(["upstream-9"])
    job, _ = await store.create_job(make_job())
    await store.apply(
        job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="upstream-9"
    )
    # Now that a job carries that upstream id, a late keep is refused: apply it instead.
    late = await store.keep_callback(
        Delivery("hook-10", time.time(), "upstream-9"), reason="unknown_job", body=b"{}"
    )
    assert late == "known"
    await store.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED"), kept_id=item.id)
    assert await store.kept_for(["upstream-9"]) == []


async def test_list_pages_newest_first_and_filters_by_state(store: Store) -> None:
    ids = []
    for n in range(5):
        job, _ = await store.create_job(make_job(state=State.RUNNING if n % 2 else State.CREATED))
        ids.append(job.id)
        await asyncio.sleep(0.002)
    page = await store.list_jobs(limit=2)
    assert [j.id for j in page] == ids[::-1][:2]
    rest = await store.list_jobs(limit=10, before=page[-1].id)
    assert [j.id for j in rest] == ids[::-1][2:]
    running = await store.list_jobs(state=State.RUNNING)
    assert {j.id for j in running} == {ids[1], ids[3]}


async def test_sqlite_gives_up_the_leases_of_a_killed_process_when_it_opens(
    tmp_path: Path,
) -> None:
    """One process serves an SQLite store: a lease found as it opens was left by one
    killed mid-poll, and its job is due now, not two minutes later."""
    path = tmp_path / "one.db"
    killed = open_store(f"sqlite:///{path}")
    await killed.open()
    now = time.time()
    due, _ = await killed.create_job(make_job(next_poll_at=now - 1))
    assert [j.id for j in await killed.claim_due(now, 10, "killed", lease=120)] == [due.id]
    await killed.close()  # as after kill -9: the lease is never given up
    restarted = open_store(f"sqlite:///{path}")
    await restarted.open()
    try:
        assert [j.id for j in await restarted.claim_due(now, 10, "restarted", lease=120)] == [
            due.id
        ]
    finally:
        await restarted.close()


async def test_due_jobs_are_leased_once(store: Store) -> None:
    now = time.time()
    due, _ = await store.create_job(make_job(next_poll_at=now - 1))
    await store.create_job(make_job(next_poll_at=now + 3600))
    claimed = await store.claim_due(now, 10, "a", lease=60)
    assert [j.id for j in claimed] == [due.id]
    assert await store.claim_due(now, 10, "b", lease=60) == []
    # An expired lease is taken over.
    assert [j.id for j in await store.claim_due(now + 61, 10, "b", lease=60)] == [due.id]
    await store.release_leases("b")
    assert [j.id for j in await store.claim_due(now, 10, "c", lease=60)] == [due.id]
    await store.reschedule(due.id, now + 30, detail="HTTP 503")
    assert await store.next_due_at() == pytest.approx(now + 30)
    fetched = await store.get_job(due.id)
    assert fetched is not None and fetched.events[-1].detail == "HTTP 503"


async def test_a_job_in_a_terminal_state_is_never_scheduled_for_a_poll_again(
    store: Store,
) -> None:
    later = time.time() + 30
    jobs = {state: (await store.create_job(make_job(state=state)))[0] for state in State}
    for job in jobs.values():
        await store.reschedule(job.id, later)
    for state, job in jobs.items():
        fetched = await store.get_job(job.id)
        assert fetched is not None
        assert fetched.next_poll_at == (None if state in TERMINAL else pytest.approx(later))


async def test_ping_and_counts(store: Store) -> None:
    await store.ping()
    await store.create_job(make_job())
    assert await store.count_by_state() == {"SUBMITTING": 1}


async def test_a_kept_body_is_applied_once_and_a_kept_stranger_is_refused(store: Store) -> None:
    now = time.time()
    job, _ = await store.create_job(make_job())
    early = Delivery("early", now, job.id, "own-body")
    stranger = Delivery("stranger", now, job.id, "other-body")
    for delivery in (early, stranger):
        assert await store.keep_callback(delivery, reason="unknown_job", body=b"{}") == "kept"
    await store.apply(job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="u1")
    # The same body came again at the job's URL before the kept one was applied.
    direct = await store.apply(
        job.id,
        Observation(Source.CALLBACK, status="RUNNING"),
        delivery=Delivery("again", now, job.id, "own-body"),
        claim=Claim(None, "u1"),
    )
    assert direct is not None and not direct.duplicate and direct.job.state == State.RUNNING
    own, other = await store.kept_for([job.id])
    repeat = await store.apply(
        job.id,
        Observation(Source.CALLBACK, status="RUNNING"),
        kept_id=own.id,
        claim=Claim(None, "u1"),
    )
    assert repeat is not None and repeat.duplicate
    refused = await store.apply(
        job.id,
        Observation(Source.CALLBACK, status="COMPLETED"),
        kept_id=other.id,
        claim=Claim(None, "u2"),
    )
    assert refused is not None and refused.refused and "u2" in refused.refused
    assert await store.kept_for([job.id]) == []
    fetched = await store.get_job(job.id)
    assert fetched is not None and fetched.state == State.RUNNING
    assert [e.source for e in fetched.events] == ["submit", "submit", "callback", "callback"]
    assert fetched.events[-1].detail.startswith("refused:")
    # Now the stranger's body is this job's refused delivery: sent again, no new entry.
    again = await store.apply(
        job.id,
        Observation(Source.CALLBACK, status="COMPLETED"),
        delivery=Delivery("stranger-again", now, job.id, "other-body"),
        claim=Claim(None, "u2"),
    )
    assert again is not None and again.duplicate and again.refused
    fetched = await store.get_job(job.id)
    assert fetched is not None and len(fetched.events) == 4


async def test_a_sqlite_file_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    """SQLite's errors that mean the database cannot be used just now leave the store as
    StoreError; its directory gone, a read cannot open the file."""
    home = tmp_path / "home"
    store = open_store(f"sqlite:///{home / 'bulkhook.db'}")
    await store.open()
    try:
        home.rename(tmp_path / "moved")
        with pytest.raises(StoreError, match="unable to open") as caught:
            await store.get_job(new_job_id())
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        await store.close()


async def test_a_connection_the_server_dropped_is_a_store_error(postgres_url: str) -> None:
    """psycopg's errors that mean the database cannot be used just now leave the store as
    StoreError, and the store recovers once the database answers again."""
    import psycopg

    from service.store.postgres.store import PostgresStore

    name = f"bulkhook-{new_job_id()}"
    store = PostgresStore(f"{postgres_url}&application_name={name}", min_size=1, max_size=1)
    await store.open()
    try:
        job, _ = await store.create_job(make_job())
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
        with pytest.raises(StoreError) as caught:
            await store.get_job(job.id)
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        assert await store.get_job(job.id) is not None
    finally:
        await store.close()


# Copies of failed records -------------------------------------------------------------


async def ended_with_failures(
    store: Store, failed: int | None = 2, status: str = "COMPLETED"
) -> str:
    job, _ = await store.create_job(make_job())
    await store.apply(job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="u-9")
    await store.apply(
        job.id, Observation(Source.CALLBACK, status=status, records_failed_count=failed)
    )
    return job.id


async def test_a_job_ending_with_failed_records_schedules_their_copy_once(store: Store) -> None:
    job_id = await ended_with_failures(store)
    state = await store.copy_state(job_id)
    assert state is not None and (state.status, state.kept, state.next_page) == ("pending", 0, None)
    assert state.due_at is not None and state.due_at <= time.time()
    late = Observation(Source.CALLBACK, status="COMPLETED", records_failed_count=5)
    await store.apply(job_id, late)
    assert await store.copy_state(job_id) == state
    clean = await ended_with_failures(store, failed=0)
    running, _ = await store.create_job(make_job())
    assert await store.copy_state(clean) is None and await store.copy_state(running.id) is None
    assert await store.copy_state(await ended_with_failures(store, None, "ERROR")) is not None
    assert await store.copy_state(await ended_with_failures(store, None, "CANCELLED")) is None


async def test_a_copy_is_claimed_once_and_stored_only_by_its_lease_holder(store: Store) -> None:
    job_id = await ended_with_failures(store)
    now = time.time()
    [claimed] = await store.claim_copies(now, 10, "a", 60)
    assert await store.claim_copies(now, 10, "b", 60) == []  # leased to "a"
    page = dataclasses.replace(claimed, status="copying", kept=2, next_page="t2", due_at=now)
    assert not await store.save_copy(page, "b", ['{"n":1}', '{"n":2}'], lease_until=now + 60)
    assert await store.save_copy(page, "a", ['{"n":1}', '{"n":2}'], lease_until=now + 60)
    # The same page again (a retry from stale progress) is refused, and writes nothing.
    assert not await store.save_copy(page, "a", ['{"n":1}', '{"n":2}'], lease_until=now + 60)
    done = dataclasses.replace(page, status="copied", kept=3, complete=True, due_at=None)
    assert await store.save_copy(done, "a", ['"three"'])
    assert await store.copy_state(job_id) == dataclasses.replace(done, next_page="t2")
    assert await store.failed_records(job_id, 0, 10) == [
        (1, '{"n":1}'),
        (2, '{"n":2}'),
        (3, '"three"'),
    ]
    assert await store.failed_records(job_id, 1, 1) == [(2, '{"n":2}')]
    assert await store.next_copy_due() is None
    assert await store.claim_copies(time.time() + 3600, 10, "b", 60) == []


async def test_a_dead_owners_copy_is_taken_over_when_its_lease_runs_out(store: Store) -> None:
    job_id = await ended_with_failures(store)
    now = time.time()
    [claimed] = await store.claim_copies(now, 10, "dead", 5)
    assert await store.claim_copies(now + 1, 10, "alive", 5) == []
    [taken] = await store.claim_copies(now + 6, 10, "alive", 5)
    assert taken.job_id == job_id == claimed.job_id
    assert not await store.save_copy(dataclasses.replace(taken, kept=1), "dead", ['"x"'])
    await store.release_copy_leases("alive")
    assert [state.job_id for state in await store.claim_copies(now + 6, 10, "x", 5)] == [job_id]


async def test_completing_a_download_schedules_its_fetch_in_the_same_apply(store: Store) -> None:
    job, _ = await store.create_job(download_job(), idempotency_key="export")
    again, created = await store.create_job(download_job(), idempotency_key="export")
    assert not created and again.id == job.id
    assert (again.direction, again.query, again.format) == (
        "download",
        "select * from contact",
        "jsonl",
    )
    upload, _ = await store.create_job(make_job(state=State.RUNNING))
    await store.apply(job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="9")
    assert await store.fetch_state(job.id) is None  # not completed: nothing to fetch
    await store.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED", at=100.0))
    await store.apply(upload.id, Observation(Source.CALLBACK, status="COMPLETED"))
    fetch = await store.fetch_state(job.id)
    assert fetch is not None
    assert (fetch.status, fetch.format, fetch.since, fetch.due_at) == ("pending", "jsonl", 100, 100)
    assert await store.fetch_state(upload.id) is None
    assert await store.next_fetch_due() == 100
    assert [j.id for j in await store.list_jobs(direction="download")] == [job.id]
    assert [j.id for j in await store.list_jobs(direction="upload")] == [upload.id]


async def test_a_fetch_is_written_only_by_its_lease_holder(store: Store) -> None:
    job, _ = await store.create_job(download_job(state=State.RUNNING, upstream_id="9"))
    await store.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED"))
    now = time.time()
    [claimed] = await store.claim_fetches(now, 10, "a", 60)
    assert claimed.status == "fetching"
    assert await store.claim_fetches(now, 10, "b", 60) == []  # leased to "a"
    assert not await store.save_fetch(claimed, "b", lease_until=now + 60)
    assert await store.save_fetch(claimed, "a", lease_until=now + 120)  # renewed
    assert await store.claim_fetches(now + 90, 10, "b", 60) == []  # still a's
    done = dataclasses.replace(
        claimed, status="stored", bytes=5, records=1, sha256="ab" * 32, attempts=1, due_at=None
    )
    assert await store.save_fetch(done, "a")
    assert await store.fetch_state(job.id) == done
    assert not await store.save_fetch(done, "a")  # the lease went with the outcome
    assert await store.claim_fetches(now + 3600, 10, "b", 60) == []  # stored: never due


async def test_a_dead_fetchers_lease_runs_out_or_is_given_back(store: Store) -> None:
    job, _ = await store.create_job(download_job(state=State.RUNNING, upstream_id="9"))
    await store.apply(job.id, Observation(Source.CALLBACK, status="COMPLETED"))
    now = time.time()
    [claimed] = await store.claim_fetches(now, 10, "dead", 5)
    assert claimed.job_id == job.id
    assert await store.claim_fetches(now + 1, 10, "alive", 5) == []
    [taken] = await store.claim_fetches(now + 6, 10, "alive", 5)
    assert taken.job_id == job.id
    await store.release_fetch_leases("alive")
    [again] = await store.claim_fetches(now + 7, 10, "other", 5)
    assert again.job_id == job.id
