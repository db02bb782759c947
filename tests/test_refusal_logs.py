"""A flood of refused callbacks writes a few short log lines, not one per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.callbacks.signatures import sign

from .helpers import RunningSandbox, RunningService, counted


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("bulkhook.callbacks")  # other services of the suite log too
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_two_thousand_forged_callbacks_with_15_kb_ids_log_a_few_short_lines(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    lines: Lines,
) -> None:
    # Answers to forged callbacks wait a tenth of a millisecond (test_flood checks the pacing).
    service = start_service(start_sandbox(drop_callbacks=1.0, job_seconds=60), refusal_delay=0.0001)
    job = service.submit(contacts_csv).json()
    body = b'{"status": "COMPLETED"}'
    huge = "j" * 15_000
    lines.records.clear()
    started = time.monotonic()
    for n in range(2000):
        forged = {"Elements-Webhook-Signature": sign("not-the-key", body)}
        response = service.http.post(f"/callbacks/jobs/{huge}{n}", content=body, headers=forged)
        assert response.status_code == 404
        assert len(response.content) < 300  # the answer does not echo the id either
    for n in range(200):  # at a real job's URL, with a 15 KB webhook id
        forged = {
            "Elements-Webhook-Signature": sign("not-the-key", body),
            "Elements-Webhook-Id": f"{huge}{n}",
        }
        response = service.http.post(f"/callbacks/jobs/{job['id']}", content=body, headers=forged)
        assert response.status_code == 401
    assert counted(service, "job_not_found") == 2000
    assert counted(service, "bad_signature") == 200
    written = [r for r in lines.records if r.levelno >= logging.INFO]
    # A line and a count of those held back, at most, per kind and 10-second window,
    # however many requests: two kinds, over as many windows as the machine took.
    windows = int((time.monotonic() - started) // 10) + 1
    assert 2 <= len(written) <= 2 * 2 * windows, [r.getMessage()[:100] for r in written]
    for record in written:
        assert len(record.getMessage()) < 500
        for field in ("job_id", "webhook_id"):
            value = getattr(record, field, None)
            assert value is None or len(value) < 100, (field, len(value))
    # Stored refusals carry cut ids too; none for the made-up URLs. Past the rows noted
    # one by one each second, a row per second stands for the rest (no webhook id).
    deadline = time.monotonic() + 5  # noted just after each answer, or once its second ends
    query = "SELECT job_ref, webhook_id, repeats FROM rejected_callbacks"
    stored = service.query(query)
    while sum(repeats for *_, repeats in stored) < 200:
        assert time.monotonic() < deadline, stored
        time.sleep(0.05)
        stored = service.query(query)
    assert sum(repeats for *_, repeats in stored) == 200
    assert all(ref == job["id"] for ref, _, _ in stored)
    assert all(webhook is None or len(webhook) <= 200 for _, webhook, _ in stored)
    service.server.stop()  # the lines held back are counted at shutdown
    for outcome, total in (("job_not_found", 2000), ("bad_signature", 200)):
        logged = [r for r in lines.records if getattr(r, "outcome", None) == outcome]
        held = [
            int(r.getMessage().split()[0])
            for r in lines.records
            if f"like the last {outcome} line" in r.getMessage()
        ]
        assert logged and len(logged) + sum(held) == total
