"""What the dashboard reads to stay current, on SQLite and PostgreSQL: the callbacks
panel's 24-hour counts read only the recent minutes on each render, and every open
live stream is served by one shared change feed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from service.store import activity

from .conftest import RunningService

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


def counting(service: RunningService) -> CountingStore:
    store = CountingStore(service.state.store)
    service.state.store = store
    return store


def add_deliveries(service: RunningService, at: float, outcome: str, n: int = 1) -> None:
    """Deliveries as the service records them, straight into its database: accepted
    ones name their job; kept ones have a kept callback saying why; refused ones are
    rejections."""
    for _ in range(n):
        hook = f"hook-{time.monotonic_ns()}"
        if outcome == "accepted":
            service.query(f"INSERT INTO deliveries VALUES ('{hook}', 'job-1', {at})")
        elif outcome in {"unknown_job", "malformed"}:
            service.query(f"INSERT INTO deliveries VALUES ('{hook}', NULL, {at})")
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
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service(None)
    store = counting(service)
    now = time.time()
    total, start, end = 100_000, now - 23 * HOUR, now - HOUR
    step = (end - start) / total
    if service.settings.sqlite_path is not None:
        service.query(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {total - 1}) INSERT INTO deliveries "
            f"SELECT 'bulk-' || i, 'job-1', {start} + i * {step} FROM n"
        )
    else:
        service.query(
            "INSERT INTO deliveries SELECT 'bulk-' || i, 'job-1', "
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
