"""A flood of forged callbacks: their answers wait, genuine callbacks do not, and the
store gets a bounded number of rows a second while every count stays exact."""

from __future__ import annotations

import asyncio
import gc
import math
import re
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.callbacks.pacing import Pacing
from service.callbacks.rejections import ROWS_PER_SECOND
from service.config import ConfigError, Settings

from .helpers import RunningSandbox, RunningService, counted, genuine, signed

DOCS = Path(__file__).resolve().parent.parent / "docs"
DELAY = 0.5


def forged_headers(body: bytes, webhook_id: str = "forged") -> dict[str, str]:
    return signed(body, webhook_id, key="not-the-key")


@pytest.fixture
def upstream(start_sandbox: Callable[..., RunningSandbox]) -> RunningSandbox:
    # The upstream never calls back on its own: the test sends every callback.
    return start_sandbox(drop_callbacks=1.0, job_seconds=60)


def timed_post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[float, Any]:
    """Seconds until the answer, and the answer, on a connection of its own."""
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post(path, content=body, headers=headers)
    return time.monotonic() - started, answer


class Background:
    """A request sent from a thread of its own; ``result()`` waits for its answer."""

    def __init__(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        self._out: list[tuple[float, Any]] = []
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(url, path, body, headers))
        self._thread.start()

    def _run(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        self._out.append(timed_post(url, path, body, headers))
        self.finished_at = time.monotonic()

    def result(self) -> tuple[float, Any]:
        self._thread.join(30)
        return self._out[0]


def wait_until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.01)


def test_a_forged_callback_is_answered_after_the_delay_and_a_genuine_one_at_once(
    upstream: RunningSandbox,
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(upstream, refusal_delay=DELAY, callback_grace=60)
    job = service.submit(contacts_csv).json()
    path = f"/callbacks/jobs/{job['id']}"
    body = genuine(job)
    forged = Background(service.url, path, body, forged_headers(body))
    time.sleep(0.1)  # the forged one is waiting now
    took, answer = timed_post(service.url, path, body, signed(body, "genuine-1"))
    answered_at = time.monotonic()
    assert answer.status_code == 200, answer.text
    assert took < DELAY / 2
    forged_took, forged_answer = forged.result()
    assert forged_answer.status_code == 401
    assert forged_answer.json()["error"]["code"] == "bad_signature"
    assert forged_took >= DELAY
    assert answered_at < forged.finished_at
    assert service.http.get(f"/jobs/{job['id']}").json()["state"] == "COMPLETED"


def test_every_refusal_before_the_signature_verified_waits_and_no_other_does(
    upstream: RunningSandbox,
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(
        upstream, refusal_delay=DELAY, callback_grace=60, max_callback_bytes=1024
    )
    job = service.submit(contacts_csv).json()
    other = service.submit(contacts_csv).json()
    body = genuine(job)
    paced = {
        "bad_signature": (f"/callbacks/jobs/{job['id']}", body, forged_headers(body)),
        "bad_signature at /callbacks": ("/callbacks", body, forged_headers(body)),
        "job_not_found": ("/callbacks/jobs/no-such-job", body, forged_headers(body)),
        "unknown_instance": ("/callbacks/instances/nowhere", body, forged_headers(body)),
        "too_large": ("/callbacks", b"x" * 2048, forged_headers(b"x" * 2048)),
    }
    statuses = {
        "bad_signature": 401,
        "bad_signature at /callbacks": 401,
        "job_not_found": 404,
        "unknown_instance": 404,
        "too_large": 413,
    }
    for name, (path, sent, headers) in paced.items():
        took, answer = timed_post(service.url, path, sent, headers)
        assert answer.status_code == statuses[name], (name, answer.text)
        assert took >= DELAY, name
    # Refusals of verified callbacks: a body about another job, one that is no JSON object.
    about_other = genuine(other)
    not_an_object = b"[1, 2]"
    immediate = {
        "wrong_job": (about_other, 409),
        "malformed_callback": (not_an_object, 400),
    }
    for code, (sent, status) in immediate.items():
        took, answer = timed_post(
            service.url, f"/callbacks/jobs/{job['id']}", sent, signed(sent, f"hook-{code}")
        )
        assert answer.status_code == status, (code, answer.text)
        assert answer.json()["error"]["code"] == code
        assert took < DELAY / 2, code


def test_no_delay_when_the_setting_is_zero(
    upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    service = start_service(upstream, refusal_delay=0)
    body = b'{"status": "COMPLETED"}'
    took, answer = timed_post(service.url, "/callbacks", body, forged_headers(body))
    assert answer.status_code == 401
    assert took < 0.5


def test_the_default_delay_is_the_documented_one_second(
    upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    default = Settings.from_env({}, env_file=None).refusal_delay
    assert default == Settings().refusal_delay == 1.0
    table = (DOCS / "operations.md").read_text()
    row = next(line for line in table.splitlines() if "`BULKHOOK_REFUSAL_DELAY`" in line)
    assert f"| `{default:g}` |" in row, row
    example = (DOCS.parent / ".env.example").read_text()
    assert f"# BULKHOOK_REFUSAL_DELAY={default:g}\n" in example
    service = start_service(upstream, refusal_delay=default)
    body = b'{"status": "COMPLETED"}'
    took, answer = timed_post(service.url, "/callbacks", body, forged_headers(body))
    assert answer.status_code == 401
    assert default <= took < default + 1


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", 0.0), ("0.25", 0.25), ("10", 10.0), ("2.5", 2.5)]
)
def test_the_delay_setting_takes_zero_to_ten_seconds(raw: str, expected: float) -> None:
    settings = Settings.from_env({"BULKHOOK_REFUSAL_DELAY": raw}, env_file=None)
    assert settings.refusal_delay == expected


@pytest.mark.parametrize("raw", ["-1", "10.5", "nan", "inf", "soon", "1s"])
def test_an_unusable_delay_stops_start_up_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"BULKHOOK_REFUSAL_DELAY": raw}, env_file=None)
    message = str(caught.value)
    assert message.startswith("BULKHOOK_REFUSAL_DELAY must be a number of seconds from 0")
    assert "to 10" in message


@pytest.mark.parametrize("value", [-0.5, 11, math.nan, math.inf, True, "1"])
def test_settings_built_in_code_check_the_delay_too(value: Any) -> None:
    with pytest.raises(ConfigError, match="BULKHOOK_REFUSAL_DELAY"):
        Settings(refusal_delay=value)


# A flood ---------------------------------------------------------------------------------

FLOOD = 600
# httpx's pool sends several times fewer requests a second over 32 connections than over 8.
CONCURRENCY = 8


async def flood(url: str, requests: list[tuple[str, bytes, dict[str, str]]]) -> list[int]:
    """Send every request, ``CONCURRENCY`` at a time, each waiting for its answer."""
    statuses: list[int] = []
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while queue:
                path, body, headers = queue.pop()
                answer = await client.post(path, content=body, headers=headers)
                statuses.append(answer.status_code)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def test_a_flood_writes_a_bounded_number_of_rows_a_second_and_every_count_is_exact(
    upstream: RunningSandbox,
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(upstream, callback_grace=60, max_callback_bytes=1024)
    job = service.submit(contacts_csv).json()
    body = genuine(job)
    big = b"x" * 2048
    kinds = {
        "bad_signature": [
            (f"/callbacks/jobs/{job['id']}", body, forged_headers(body, f"forged-{n}"))
            for n in range(FLOOD // 2)
        ]
        + [("/callbacks", body, forged_headers(body, f"forged-wide-{n}")) for n in range(100)],
        "too_large": [
            ("/callbacks", big, forged_headers(big, f"big-{n}")) for n in range(FLOOD // 2 - 100)
        ],
    }
    requests = [request for sent in zip(*kinds.values(), strict=False) for request in sent]
    requests += kinds["bad_signature"][len(kinds["too_large"]) :]
    assert len(requests) == FLOOD
    started = time.time()
    statuses = asyncio.run(flood(service.url, requests))
    assert sorted(set(statuses)) == [401, 413]
    expected = {reason: len(sent) for reason, sent in kinds.items()}

    # The summary of the last second is written once it ends, with no refusal after it.
    def stored() -> dict[str, int]:
        rows = service.query("SELECT reason, SUM(repeats) FROM rejected_callbacks GROUP BY 1")
        return {reason: int(total) for reason, total in rows}

    wait_until(lambda: stored() == expected, within=5)
    rows = service.query("SELECT received_at, reason, repeats, webhook_id FROM rejected_callbacks")
    per_second: dict[int, list[tuple[str, int, str | None]]] = {}
    for at, reason, repeats, webhook_id in rows:
        assert started - 1 <= at <= time.time()
        per_second.setdefault(math.floor(at), []).append((reason, repeats, webhook_id))
    summaries = 0
    for second, noted in per_second.items():
        one_by_one = [row for row in noted if row[2] is not None]
        summary = [row for row in noted if row[2] is None]
        assert len(one_by_one) <= ROWS_PER_SECOND, second
        assert len(summary) == len({reason for reason, _, _ in summary}) <= len(kinds), second
        assert len(noted) <= ROWS_PER_SECOND + len(kinds)
        summaries += len(summary)
    assert summaries >= 1  # the flood outran the rows noted one by one
    # However long the flood took: at most the documented rows in each second it spanned.
    spanned = math.floor(time.time()) - math.floor(started) + 1
    assert len(rows) <= spanned * (ROWS_PER_SECOND + len(kinds))
    assert len(rows) < FLOOD / 2
    # Every count the dashboard and the metrics show is exact.
    counts = service.http.get("/ui/callbacks").json()
    for reason, total in expected.items():
        assert counts["counts_24h"][reason] == total, (reason, counts["counts_24h"])
        assert counted(service, reason) == total
    # A summary shows as one line saying how many more were refused.
    lines = [line for line in counts["recent"] if line["repeats"] > 1]
    assert lines, counts["recent"]
    for line in lines:
        assert re.match(rf"and {line['repeats']} more callbacks? refused \(", line["detail"])
        assert line["webhook_id"] is None


def test_the_job_timeline_shows_a_summary_of_the_refusals_at_its_url(
    upstream: RunningSandbox,
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    body = genuine(job)
    path = f"/callbacks/jobs/{job['id']}"
    sent = [(path, body, forged_headers(body, f"forged-{n}")) for n in range(200)]
    asyncio.run(flood(service.url, sent))
    query = f"SELECT SUM(repeats), COUNT(*) FROM rejected_callbacks WHERE job_ref = '{job['id']}'"
    wait_until(lambda: service.query(query)[0][0] == 200)
    [(total, rows)] = service.query(query)
    assert total == 200
    assert rows < 200
    page = service.http.get(f"/ui/jobs/{job['id']}").text
    assert re.search(r"and \d+ more callbacks? refused \(bad signature\)", page)


# The bound on answers waiting -------------------------------------------------------------


def test_past_the_most_answers_waiting_a_refusal_is_answered_at_once_closing_its_connection(
    upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    pacing = Pacing(delay=2.0, most=3)
    service = start_service(upstream, pacing=pacing)
    body = b'{"status": "COMPLETED"}'
    held = [
        Background(service.url, "/callbacks", body, forged_headers(body, f"held-{n}"))
        for n in range(3)
    ]
    wait_until(lambda: pacing.waiting == 3)
    took, answer = timed_post(service.url, "/callbacks", body, forged_headers(body))
    assert answer.status_code == 401
    assert answer.headers["connection"] == "close"
    assert took < 1.0
    for request in held:
        held_took, held_answer = request.result()
        assert held_answer.status_code == 401
        assert held_answer.headers.get("connection") != "close"
        assert held_took >= 2.0
    # Room again once they were answered.
    took, answer = timed_post(service.url, "/callbacks", body, forged_headers(body))
    assert took >= 2.0 and answer.status_code == 401


def test_a_waiting_answer_does_not_hold_the_body(
    upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    pacing = Pacing(delay=4.0)
    service = start_service(upstream, pacing=pacing)
    size, count = 512 * 1024, 20
    bodies = [bytes([n]) * size for n in range(count)]  # made before memory is traced
    tracemalloc.start()
    try:
        held = [
            Background(service.url, "/callbacks", body, forged_headers(body, f"big-{n}"))
            for n, body in enumerate(bodies)
        ]
        wait_until(lambda: pacing.waiting == count, within=10)
        gc.collect()
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for request in held:
        assert request.result()[1].status_code == 401
    # Held, the bodies alone would be 10 MiB.
    assert allocated < count * size / 4, allocated


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/callbacks", id="too-large"),
        pytest.param("/callbacks/instances/nowhere", id="unknown-instance"),
    ],
)
def test_a_waiting_answer_does_not_hold_a_body_it_never_read(
    path: str, upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    """Refused before reading (declared larger than the limit, or for an instance with
    no keys), the body is still on its way while the answer waits: the server buffers
    none of it meanwhile."""
    pacing = Pacing(delay=3.0)
    service = start_service(upstream, pacing=pacing, max_callback_bytes=64 * 1024)
    size, count = 1024 * 1024, 16
    bodies = [bytes([n]) * size for n in range(count)]  # made before memory is traced
    tracemalloc.start()
    try:
        held = [
            Background(service.url, path, body, forged_headers(body, f"unread-{n}"))
            for n, body in enumerate(bodies)
        ]
        wait_until(lambda: pacing.waiting == count, within=10)
        time.sleep(0.5)  # as long again for what the senders still push
        gc.collect()
        # The server's allocations: not the senders' buffers for the answers they await.
        senders = tracemalloc.Filter(False, "*/httpcore/*")
        snapshot = tracemalloc.take_snapshot().filter_traces([senders])
        allocated = sum(stat.size for stat in snapshot.statistics("filename"))
    finally:
        tracemalloc.stop()
    expected = 413 if path == "/callbacks" else 404
    for request in held:
        took, answer = request.result()
        assert answer.status_code == expected
        assert took >= 3.0
    # Buffered while they wait, a read's worth of each would be 4 MiB and more.
    assert allocated < count * 64 * 1024, allocated


def test_a_server_stopping_sends_the_waiting_answers_at_once(
    upstream: RunningSandbox, start_service: Callable[..., RunningService]
) -> None:
    pacing = Pacing(delay=8.0)
    service = start_service(upstream, pacing=pacing)
    body = b'{"status": "COMPLETED"}'
    held = [
        Background(service.url, "/callbacks", body, forged_headers(body, f"held-{n}"))
        for n in range(5)
    ]
    wait_until(lambda: pacing.waiting == 5)
    started = time.monotonic()
    service.server.stop()
    assert time.monotonic() - started < 3.0
    for request in held:
        took, answer = request.result()
        assert answer.status_code == 401
        assert took < 4.0


def test_the_rows_noted_one_by_one_a_second_are_the_documented_number() -> None:
    assert f"at most {ROWS_PER_SECOND} rows a second" in (DOCS / "callbacks.md").read_text()
