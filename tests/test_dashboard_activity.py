"""What the dashboard reads to stay current, on SQLite and PostgreSQL: the callbacks
panel's 24-hour counts read only the recent minutes on each render, and every open
live stream is served by one shared change feed."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard import live
from service.store import activity, open_store

from .helpers import SSE, RunningSandbox, RunningService, events, forged

HOUR = 3600.0


class CountingStore:
    """The app's own store, with the dashboard's reads counted on the way through."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.windows: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def callback_counts_by_minute(self, since: float, until: float) -> Any:
        self.windows.append((since, until))
        return await self._store.callback_counts_by_minute(since, until)


INSERT_DELIVERY = "INSERT INTO deliveries (webhook_id, job_id, received_at)"


def add_deliveries(service: RunningService, at: float, outcome: str, n: int = 1) -> None:
    """Deliveries as the service records them, straight into its database: accepted
    ones name their job; kept ones have a kept callback saying why; refused ones are
    rejections."""
    for _ in range(n):
        hook = f"hook-{time.monotonic_ns()}"
        if outcome == "accepted":
            service.query(f"{INSERT_DELIVERY} VALUES ('{hook}', 'job-1', {at})")
        elif outcome in {"unknown_job", "malformed"}:
            service.query(f"{INSERT_DELIVERY} VALUES ('{hook}', NULL, {at})")
            service.query(
                "INSERT INTO kept_callbacks (webhook_id, job_ref, received_at, reason, body) "
                f"VALUES ('{hook}', 'someone', {at}, '{outcome}', {blob(service)})"
            )
        else:
            service.query(
                "INSERT INTO rejected_callbacks (received_at, reason, detail, job_ref, "
                f"webhook_id) VALUES ({at}, '{outcome}', 'refused', 'job-1', '{hook}')"
            )


def blob(service: RunningService) -> str:
    return "X'7b7d'" if service.settings.sqlite_path is not None else "'\\x7b7d'::bytea"


def day_counts(service: RunningService) -> dict[str, int]:
    answer = service.http.get("/ui/callbacks")
    assert answer.status_code == 200
    return answer.json()["counts_24h"]  # type: ignore[no-any-return]


def test_the_24_hour_counts_are_right_as_deliveries_arrive(
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service(None)
    now = time.time()
    add_deliveries(service, now - 25 * HOUR, "accepted", 2)  # older than a day
    add_deliveries(service, now - 25 * HOUR, "bad_signature")
    add_deliveries(service, now - 23 * HOUR, "accepted", 3)
    add_deliveries(service, now - 23 * HOUR, "unknown_job")
    add_deliveries(service, now - 23 * HOUR, "bad_signature")
    add_deliveries(service, now - 1 * HOUR, "accepted", 2)
    add_deliveries(service, now - 1 * HOUR, "malformed")
    add_deliveries(service, now - 1 * HOUR, "too_large", 2)
    add_deliveries(service, now - 2, "accepted")
    add_deliveries(service, now - 1, "bad_signature")
    expected = {
        "accepted": 6,
        "unknown_job": 1,
        "malformed": 1,
        "bad_signature": 2,
        "too_large": 2,
        "wrong_job": 0,
    }
    assert day_counts(service) == expected
    assert day_counts(service) == expected  # the kept minutes are not counted twice
    # New deliveries count at once, and the minutes already kept stay right.
    add_deliveries(service, time.time(), "accepted", 2)
    add_deliveries(service, time.time(), "too_large")
    expected["accepted"] += 2
    expected["too_large"] += 1
    assert day_counts(service) == expected


def test_a_render_after_100000_deliveries_reads_only_the_recent_ones(
    start_service: Callable[..., RunningService], store_url: str
) -> None:
    store = CountingStore(open_store(store_url))
    service = start_service(None, store=store)
    now = time.time()
    total, start, end = 100_000, now - 23 * HOUR, now - HOUR
    step = (end - start) / total
    if service.settings.sqlite_path is not None:
        service.query(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {total - 1}) {INSERT_DELIVERY} "
            f"SELECT 'bulk-' || i, 'job-1', {start} + i * {step} FROM n"
        )
    else:
        service.query(
            f"{INSERT_DELIVERY} SELECT 'bulk-' || i, 'job-1', "
            f"{start} + i * {step} FROM generate_series(0, {total - 1}) AS i"
        )
        service.query("ANALYZE deliveries")
    add_deliveries(service, time.time(), "accepted", 3)
    assert day_counts(service)["accepted"] == total + 3  # the first render counts the day
    first = len(store.windows)
    add_deliveries(service, time.time(), "accepted", 2)
    assert day_counts(service)["accepted"] == total + 5
    later = store.windows[first:]
    assert later, "the second render read nothing"
    read = 0
    for since, until in later:
        assert since >= time.time() - 150  # the last minute or two, never the day
        rows = service.query(
            f"SELECT COUNT(*) FROM deliveries WHERE received_at >= {since} "
            f"AND received_at < {until}"
        )
        read += rows[0][0]
    assert read <= 5
    # Each such window is found through the received_at index, not by a scan.
    sql = activity.DELIVERIES_BY_MINUTE.format(minute="d.received_at")
    sql = sql.replace("%s", str(later[-1][0]), 1).replace("%s", str(later[-1][1]), 1)
    if service.settings.sqlite_path is not None:
        plan = " ".join(str(row[-1]) for row in service.query(f"EXPLAIN QUERY PLAN {sql}"))
        assert "USING INDEX deliveries_at (received_at>? AND received_at<?)" in plan, plan
    else:
        plan = " ".join(str(row[0]) for row in service.query(f"EXPLAIN {sql}"))
        assert "deliveries_at" in plan and "Seq Scan on deliveries" not in plan, plan


DASHBOARD_READS = {
    "get_job",
    "jobs_changed_since",
    "timeline_changes",
    "timeline_marks",
    "recent_callbacks",
    "rejections_for",
    "callback_counts",
    "callback_counts_by_minute",
}


class ReadCounter:
    """The app's own store, with every read the dashboard makes counted."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.reads: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if name not in DASHBOARD_READS:
            return method

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.reads[name] += 1
            return await method(*args, **kwargs)

        return counted


class Watcher:
    """One open dashboard stream, read on its own thread: every event it is sent."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._client = httpx.Client(base_url=url, timeout=30)
        self._params = params
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            self._client.stream("GET", "/ui/stream", params=self._params, headers=SSE) as s,
        ):
            for name, data in events(s):
                self.events.append((name, data))

    def saw(self, check: Callable[[str, dict[str, Any]], bool]) -> bool:
        return any(check(name, data) for name, data in list(self.events))

    def close(self) -> None:
        self._client.close()


def wait_until(condition: Callable[[], bool], within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_fifty_open_streams_share_one_feed_and_all_see_a_callback_change(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_url: str,
) -> None:
    monkeypatch.setattr(live, "MAX_STREAM", 60.0)
    store = ReadCounter(open_store(store_url))
    service = start_service(start_sandbox(job_seconds=6.0), callback_grace=60, store=store)
    job = service.submit(contacts_csv).json()
    store.reads.clear()  # the submission's own
    time.sleep(3 * live.TICK)
    assert not store.reads, "the feed runs with no stream open"
    since = time.time()
    everyone = [Watcher(service.url, {"since": since}) for _ in range(25)]
    one = [Watcher(service.url, {"job": job["id"]}) for _ in range(25)]
    watchers = everyone + one
    try:
        assert wait_until(lambda: all(w.events for w in watchers)), "a stream sent nothing"
        store.reads.clear()
        window = 2.0
        time.sleep(window)
        reads = sum(store.reads.values())
        ticks = window / live.TICK + 1
        # A tick reads the changed jobs, the timelines and the newest delivery, and a
        # changed job's detail once: not once per stream (that would be 50 a tick).
        assert reads <= 8 * ticks, store.reads

        def completed(name: str, data: dict[str, Any]) -> bool:
            changed = data.get("job", {})
            return (
                name == "job"
                and changed.get("id") == job["id"]
                and (
                    changed.get("state") == "COMPLETED" and changed.get("last_source") == "callback"
                )
            )

        assert wait_until(lambda: all(w.saw(completed) for w in watchers)), [
            [data.get("job", {}).get("state") for _, data in w.events] for w in watchers
        ]
        # A refusal adds to the job's timeline without changing the job: the job pages
        # are sent it all the same.
        assert forged(service, job["id"], "feed").status_code == 401

        def refused(name: str, data: dict[str, Any]) -> bool:
            return name == "job" and "refused: bad signature" in data.get("detail", "")

        assert wait_until(lambda: all(w.saw(refused) for w in one))
    finally:
        for watcher in watchers:
            watcher.close()

    def idle() -> bool:
        """Once the last stream notices its client is gone, the feed stops reading."""
        store.reads.clear()
        time.sleep(3 * live.TICK)
        return not store.reads

    assert wait_until(idle, within=3 * live.HEARTBEAT + 5)
