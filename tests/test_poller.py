"""The polling fallback: backoff, Retry-After, 404s, the timeout, the rate budget."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import datetime
from pathlib import Path

from service.poller import RateLimiter
from service.upstream.client import RetryPolicy

from .helpers import StartSandbox, StartService, assert_failure_shown

DONE = {"COMPLETED", "ERROR", "ABORTED", "CANCELLED", "TIMED_OUT", "SUBMIT_FAILED"}
ONE_TRY = RetryPolicy(attempts=1)


def poll_times(job: dict) -> list[float]:
    return [
        datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()
        for e in job["events"]
        if e["source"] == "poll"
    ]


def test_intervals_double_up_to_the_maximum(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=4.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.25, poll_max_interval=1.0)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=15)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    times = poll_times(final)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 3
    assert gaps[0] < 0.45  # about 0.25 (jittered down, never up)
    assert gaps[1] >= 0.3  # about 0.5
    assert gaps[2] >= 0.6  # about 1.0
    assert max(gaps) <= 1.0 + 0.3  # capped at the maximum


def test_upstream_failures_never_fail_a_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2, upstream_retry=ONE_TRY)
    upstream.sandbox.inject_fault("status", 503, times=4)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=15)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    assert upstream.sandbox.calls["status"] >= 5
    assert sum("HTTP 503" in e["detail"] for e in final["events"]) == 4


def test_polling_and_its_retries_leave_the_random_modules_shared_state_alone(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    """Jitter comes from the operating system: a test framework that seeds ``random``
    (hypothesis does) sees the same draws whatever the service in its process does."""
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=1.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2, upstream_retry=ONE_TRY)
    upstream.sandbox.inject_fault("status", 503, times=2)
    before = random.getstate()
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=15)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    assert sum("HTTP 503" in e["detail"] for e in final["events"]) == 2
    untouched = random.getstate() == before
    assert untouched, "the service drew from the random module's shared generator"


def test_a_status_answer_about_another_upstream_job_changes_nothing(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=1.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2, upstream_retry=ONE_TRY)
    job = service.submit(contacts_csv).json()
    other = {"id": "9999", "status": "ERROR", "recordsCount": 1, "recordsFailedCount": 1}
    upstream.sandbox.inject_fault("status", 200, body=other, times=3)
    refreshed = service.http.post(f"/jobs/{job['id']}/refresh")
    assert refreshed.status_code == 502
    assert "about upstream job 9999" in refreshed.json()["error"]["message"]
    final = service.wait_for(job["id"], DONE, within=15)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    assert final["records_failed_count"] == 0
    assert any("about upstream job 9999" in e["detail"] for e in final["events"])
    assert all(e["state"] != "ERROR" for e in final["events"])


def test_retry_after_is_honoured_by_the_poller(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2, upstream_retry=ONE_TRY)
    upstream.sandbox.inject_fault("status", 429, retry_after=1.5)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=15)
    assert final["state"] == "COMPLETED"
    refused, answered = poll_times(final)[:2]
    assert "HTTP 429" in next(e["detail"] for e in final["events"] if e["source"] == "poll")
    assert answered - refused >= 1.4  # the timeline's times are rounded to the millisecond


def test_repeated_404_fails_the_job_with_the_reason(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=30)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2, upstream_retry=ONE_TRY)
    upstream.sandbox.inject_fault("status", 404, times=10)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=15)
    assert final["state"] == "ABORTED"
    assert "no longer knows" in final["events"][-1]["detail"]
    assert final["upstream_error"] is None  # the service's own conclusion, not the upstream's
    assert upstream.sandbox.calls["status"] == 3


def test_a_job_the_upstream_fails_whole_shows_its_message_from_a_poll(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    message = "All prospects require either 'email' or 'id'"
    upstream = start_sandbox(drop_callbacks=1.0, fail_whole=1.0, fail_whole_message=message)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2)
    job = service.submit(contacts_csv).json()
    service.wait_for(job["id"], DONE)
    assert upstream.sandbox.callbacks["dropped"] == 1
    assert_failure_shown(service, job["id"], message, "poll")


def test_a_job_that_never_ends_times_out(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    service = start_service(
        upstream, callback_grace=0.2, poll_interval=0.2, poll_max_interval=0.4, job_timeout=1.5
    )
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=10)
    assert final["state"] == "TIMED_OUT"
    assert final["last_source"] == "timeout"


def test_polls_stay_within_the_rate_budget(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=0.1)
    service = start_service(upstream, callback_grace=0.5, poll_interval=0.2, poll_rate=5)
    ids = [service.submit(contacts_csv).json()["id"] for _ in range(15)]
    for job_id in ids:
        assert service.wait_for(job_id, DONE, within=20)["state"] == "COMPLETED"
    times = sorted(t for t, _ in upstream.sandbox.status_log)
    # Evenly spaced at 5 per second: any 11 consecutive polls span at least ~2 s.
    spans = [b - a for a, b in zip(times, times[10:], strict=False)]
    assert len(times) >= 15
    assert min(spans) >= 1.8
    # As the upstream counts them (give or take one call's network jitter at a second's edge).
    assert upstream.sandbox.stats()["status_calls_busiest_second"] <= 6


def test_a_late_wakeup_never_lets_held_back_polls_burst_past_the_budget() -> None:
    async def run() -> list[float]:
        limiter = RateLimiter(20)
        times: list[float] = []

        async def caller() -> None:
            for _ in range(10):
                await limiter.acquire()
                times.append(time.monotonic())

        async def stall() -> None:
            await asyncio.sleep(0.3)
            time.sleep(0.25)  # noqa: ASYNC251 - the loop is busy elsewhere: sleeps wake late

        await asyncio.gather(stall(), *(caller() for _ in range(4)))
        return sorted(times)

    times = asyncio.run(run())
    assert len(times) == 40
    # At most 20 in any second: any 21 consecutive acquisitions span a second or more.
    assert min(b - a for a, b in zip(times, times[20:], strict=False)) >= 1.0


def test_a_callback_within_the_grace_period_costs_no_polls(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=0.5)
    service = start_service(upstream, callback_grace=2.0, poll_interval=0.2)
    ids = [service.submit(contacts_csv).json()["id"] for _ in range(5)]
    for job_id in ids:
        assert service.wait_for(job_id, DONE)["last_source"] == "callback"
    time.sleep(2.5)  # past the grace period: still nothing to poll
    assert upstream.sandbox.calls["status"] == 0
