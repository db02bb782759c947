"""Bounded storage: kept callbacks stay within a count and a byte bound, oldest out
first; deliveries, refusals, applied kept callbacks and timeline entries older than
the retention are pruned in batches, on both stores."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import ConfigError, Settings
from service.jobs import Job, Observation, Source, State, new_job_id
from service.store import Delivery, Store
from service.store.base import KEPT_BYTES, KEPT_MAX, Claim, Rejection

from .helpers import RunningSandbox, RunningService, deliver, eventually, genuine, job_url

pytestmark = pytest.mark.anyio
DAY = 86400.0


def new_job(at: float) -> Job:
    return Job(
        id=new_job_id(),
        hub="marketing",
        object="contact",
        path="/contacts.csv",
        state=State.SUBMITTING,
        created_at=at,
        updated_at=at,
        last_source="submit",
    )


async def test_the_stated_bounds() -> None:
    assert (KEPT_MAX, KEPT_BYTES) == (10_000, 64 * 1024 * 1024)
    assert Settings().retention == 30 * DAY


async def test_kept_callbacks_past_the_count_bound_go_oldest_first(store: Any) -> None:
    store.kept_limits = (5, 10**9)
    answers = [
        await store.keep_callback(
            Delivery(f"w{n}", time.time(), f"up-{n}", f"d{n}"), reason="unknown_job", body=b"{}"
        )
        for n in range(12)
    ]
    assert answers == ["kept"] * 12
    kept = await store.kept_for([f"up-{n}" for n in range(12)])
    assert [item.job_ref for item in kept] == [f"up-{n}" for n in range(7, 12)]


async def test_kept_callbacks_past_the_byte_bound_go_oldest_first(store: Any) -> None:
    store.kept_limits = (100, 1000)
    for n in range(6):
        body = b"x" * 300
        delivery = Delivery(f"w{n}", time.time(), f"up-{n}", f"d{n}")
        assert await store.keep_callback(delivery, reason="malformed", body=body) == "kept"
    kept = await store.kept_for([f"up-{n}" for n in range(6)])
    assert [item.job_ref for item in kept] == ["up-3", "up-4", "up-5"]  # 900 of 1000 bytes


async def test_the_same_body_is_kept_once_for_a_reference(store: Store) -> None:
    first = Delivery("w1", time.time(), "up-1", "same")
    again = Delivery("w2", time.time(), "up-1", "same")
    elsewhere = Delivery("w3", time.time(), "up-2", "same")
    assert await store.keep_callback(first, reason="unknown_job", body=b"{}") == "kept"
    assert await store.keep_callback(again, reason="unknown_job", body=b"{}") == "duplicate"
    assert await store.keep_callback(elsewhere, reason="unknown_job", body=b"{}") == "kept"
    assert len(await store.kept_for(["up-1", "up-2"])) == 2


async def test_prune_removes_what_is_older_than_the_cut_off_in_batches(store: Store) -> None:
    now = time.time()
    old, new = now - 40 * DAY, now - DAY
    job, _ = await store.create_job(new_job(old), detail="received")
    await store.apply(
        job.id, Observation(Source.SUBMIT, status="CREATED", at=old), upstream_id="77"
    )
    for n, at in enumerate([old, old, old, new, new]):
        await store.apply(
            job.id,
            Observation(Source.CALLBACK, status="RUNNING", at=at),
            delivery=Delivery(f"w{n}", at, job.id, f"d{n}"),
            claim=Claim(job.id, "77"),
        )
    for n, at in enumerate([old, old, new]):
        await store.record_rejection(Rejection(at, "bad_signature", "forged", job.id, f"r{n}"))
    for n, at in enumerate([old, old, new]):
        kept = Delivery(f"k{n}", at, "77", f"k{n}")
        assert await store.keep_callback(kept, reason="malformed", body=b"[") == "kept"
    [applied_old, *_] = await store.kept_for(["77"])
    await store.apply(job.id, Observation(Source.CALLBACK, at=new), kept_id=applied_old.id)
    before = await store.get_job(job.id)
    assert before is not None and len(before.events) == 8

    pruned = await store.prune(now - 30 * DAY, batch=2)

    # The two old kept callbacks count among the deliveries; only the applied one goes.
    assert (pruned.deliveries, pruned.rejections, pruned.kept, pruned.events) == (5, 2, 1, 5)
    after = await store.get_job(job.id)
    assert after is not None and after.state == State.RUNNING and after.upstream_id == "77"
    assert [event.at for event in after.events] == [new, new, new]
    assert [r.webhook_id for r in await store.rejections_for(job.id)] == ["r2"]
    assert [item.webhook_id for item in await store.kept_for(["77"])] == ["k1", "k2"]
    assert (await store.prune(now - 30 * DAY, batch=2)).total == 0


def test_a_retention_under_five_days_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"BULKHOOK_RETENTION must be .* at least 432000"):
        Settings.from_env({"BULKHOOK_RETENTION": "345600"}, env_file=None)
    assert Settings.from_env({"BULKHOOK_RETENTION": "432000"}, env_file=None).retention == 432000
    with pytest.raises(ConfigError, match="BULKHOOK_RETENTION"):
        Settings(retention=float("inf"))


def test_the_service_prunes_at_start(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    first = start_service(upstream, callback_grace=60)
    job = first.submit(contacts_csv).json()
    assert deliver(first, job_url(job), genuine(job), "w-old").status_code == 200
    first.server.stop()
    long_ago = time.time() - 40 * DAY
    first.query(f"UPDATE deliveries SET received_at = {long_ago}")
    first.query(f"UPDATE events SET at = {long_ago}")
    second = start_service(upstream, callback_grace=60)  # the same database
    # The pruner empties one table after another, the timeline last.
    eventually(
        lambda: (
            second.query("SELECT COUNT(*) FROM deliveries") == [(0,)]
            and second.query("SELECT COUNT(*) FROM events") == [(0,)]
        ),
        within=10,
    )
    assert second.http.get(f"/jobs/{job['id']}").json()["state"] == "COMPLETED"
