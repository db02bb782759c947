"""A signed body is about one job: replayed to another job's URL, to made-up URLs, or
again with fresh webhook ids, it changes nothing but what it is about.

Open Connectors signs the body, not the URL. Every attack here uses a genuine body,
signed with the instance's key, on a real service over HTTP, on both stores.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from service.callbacks.signatures import sign
from service.sandbox import Sandbox
from service.server.thread import ServerThread

from .helpers import (
    SIGNATURE_KEY,
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    counted,
    deliver,
    essentials,
    genuine,
    job_now,
    job_url,
    refusals,
)


@pytest.fixture
def two_jobs(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> tuple[RunningService, dict[str, Any], dict[str, Any]]:
    """Jobs A and B, both accepted upstream, neither hearing a callback of its own."""
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    service = start_service(upstream, callback_grace=60)
    a = service.submit(contacts_csv).json()
    b = service.submit(contacts_csv).json()
    assert a["upstream_id"] and b["upstream_id"] and a["upstream_id"] != b["upstream_id"]
    return service, a, b


def stored_deliveries(service: RunningService, job_id: str) -> list[tuple[Any, ...]]:
    return service.query(f"SELECT webhook_id, outcome FROM deliveries WHERE job_id = '{job_id}'")


def test_another_jobs_body_at_a_jobs_url_is_409_and_noted_once(two_jobs: Any) -> None:
    service, a, b = two_jobs
    body = genuine(b)
    first = deliver(service, job_url(a), body, "b-at-a-0")
    assert first.status_code == 409
    assert first.json()["error"]["code"] == "wrong_job"
    after = job_now(service, a["id"])
    assert (
        essentials(after) == essentials(a) == ("CREATED", a["upstream_id"], None, None, "CREATED")
    )
    [refusal] = refusals(after)
    assert b["id"] in refusal["detail"] and refusal["state"] == "CREATED"
    # The same body with 50 fresh webhook ids: refused each time, noted once.
    for n in range(1, 51):
        again = deliver(service, job_url(a), body, f"b-at-a-{n}")
        assert (again.status_code, again.json()["error"]["code"]) == (409, "wrong_job")
    replayed = job_now(service, a["id"])
    assert replayed["events"] == after["events"]
    assert stored_deliveries(service, a["id"]) == [("b-at-a-0", "wrong_job")]
    assert counted(service, "wrong_job") == 51
    panel = service.http.get("/ui/callbacks").json()
    assert panel["counts_24h"]["wrong_job"] == 1  # the stored refusal; replays only counted
    assert panel["replica_counts"]["wrong_job"] == 51
    # The body is genuine: at its own job's URL it completes that job.
    own = deliver(service, job_url(b), body, "b-at-b")
    assert own.json() == {"status": "accepted", "job": b["id"], "state": "COMPLETED"}
    assert essentials(job_now(service, a["id"])) == essentials(a)


def test_a_body_naming_only_another_upstream_job_is_refused_too(two_jobs: Any) -> None:
    service, a, b = two_jobs
    body = json.dumps({"id": b["upstream_id"], "status": "ERROR", "recordsCount": 3}).encode()
    response = deliver(service, job_url(a), body, "only-id")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "wrong_job"
    assert b["upstream_id"] in response.json()["error"]["message"]
    after = job_now(service, a["id"])
    assert essentials(after) == essentials(a)
    assert len(refusals(after)) == 1
    assert essentials(job_now(service, b["id"])) == essentials(b)


def test_the_same_body_with_fresh_webhook_ids_is_a_duplicate(two_jobs: Any) -> None:
    service, a, _ = two_jobs
    body = genuine(a, status="RUNNING", recordsCount=None, recordsFailedCount=None)
    first = deliver(service, job_url(a), body, "a-0")
    assert first.json() == {"status": "accepted", "job": a["id"], "state": "RUNNING"}
    settled = job_now(service, a["id"])
    for n in range(1, 51):
        again = deliver(service, job_url(a), body, f"a-{n}")
        assert again.status_code == 200
        assert again.json() == {"status": "duplicate", "job": a["id"], "state": "RUNNING"}
    assert job_now(service, a["id"]) == settled
    assert [e["source"] for e in settled["events"]].count("callback") == 1
    assert stored_deliveries(service, a["id"]) == [("a-0", None)]
    assert counted(service, "duplicate") == 50
    # Another body (the job finished) still applies.
    done = deliver(service, job_url(a), genuine(a), "a-done")
    assert done.json()["state"] == "COMPLETED"


def test_a_body_replayed_to_made_up_job_urls_is_404_and_keeps_nothing(two_jobs: Any) -> None:
    service, a, b = two_jobs
    body = genuine(b)
    deliveries_before = service.query("SELECT COUNT(*) FROM deliveries")
    made_up = [f"0{n:023x}" for n in range(280)] + [
        "x" * 65,
        "a.b",
        "%2E%2E",
        "%00",
        "%F0%9F%98%80",
        "job%20id",
        "%C2%B2",
        "%ED%A0%80",
        "-" * 64 + "x",
        "'; DROP TABLE jobs; --",
    ]
    made_up += [f"z{n}" for n in range(300 - len(made_up))]
    for n, job_id in enumerate(made_up):
        response = deliver(service, f"/callbacks/jobs/{job_id}", body, f"made-up-{n}")
        assert response.status_code == 404, (job_id, response.text)
        assert response.json()["error"]["code"] == "job_not_found"
    # Forged ones too: no signature, or another key's.
    for job_id in made_up[:100]:
        for headers in ({}, {"Elements-Webhook-Signature": sign("not-the-key", body)}):
            forged = service.http.post(f"/callbacks/jobs/{job_id}", content=body, headers=headers)
            assert (forged.status_code, forged.json()["error"]["code"]) == (404, "job_not_found")
    time.sleep(0.2)  # a refusal would be noted just after its answer
    assert service.query("SELECT COUNT(*) FROM kept_callbacks") == [(0,)]
    assert service.query("SELECT COUNT(*) FROM deliveries") == deliveries_before
    assert service.query("SELECT COUNT(*) FROM rejected_callbacks") == [(0,)]
    assert counted(service, "job_not_found") == 500
    assert counted(service, "bad_signature") == 0
    assert essentials(job_now(service, a["id"])) == essentials(a)
    assert essentials(job_now(service, b["id"])) == essentials(b)


def test_a_body_naming_no_job_is_only_a_nudge_to_poll(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    body = json.dumps({"status": "COMPLETED", "recordsCount": 77}).encode()
    response = deliver(service, job_url(job), body, "no-names")
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while job["upstream_id"] not in upstream.sandbox.status_calls:
        assert time.monotonic() < deadline, "the nudge did not poll"
        time.sleep(0.02)
    after = service.wait_for(job["id"], {"CREATED", "RUNNING"})
    assert after["state"] != "COMPLETED" and after["records_count"] != 77
    [note] = [e for e in after["events"] if "names no job" in e["detail"]]
    assert "COMPLETED not applied" in note["detail"]


def test_at_the_instance_url_a_body_naming_two_jobs_is_409(two_jobs: Any) -> None:
    service, a, b = two_jobs
    crossed = genuine(a, id=b["upstream_id"])  # A's payload, B's upstream id
    response = deliver(service, "/callbacks", crossed, "crossed")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "wrong_job"
    # A's payload with an upstream id no job has, while A's upstream id is known.
    unknown = genuine(a, id="424242")
    other = deliver(service, "/callbacks", unknown, "unknown-upstream")
    assert (other.status_code, other.json()["error"]["code"]) == (409, "wrong_job")
    for job in (a, b):
        assert essentials(job_now(service, job["id"])) == essentials(job)
    assert counted(service, "wrong_job") == 2
    assert service.query("SELECT COUNT(*) FROM kept_callbacks") == [(0,)]
    # Each job's own body still applies at the instance-wide URL.
    for job in (a, b):
        ok = deliver(service, "/callbacks", genuine(job), f"own-{job['id']}")
        assert ok.json() == {"status": "accepted", "job": job["id"], "state": "COMPLETED"}


class SubmitGate:
    """The sandbox's ASGI app, holding every upload until ``release``: a job stays
    SUBMITTING for as long as the test needs, as on a slow network."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.held = threading.Event()
        self.released = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and "/bulk/" in scope["path"]:
            self.held.set()
            await asyncio.to_thread(self.released.wait)
        await self.app(scope, receive, send)


@pytest.fixture
def gated() -> Iterator[tuple[RunningSandbox, SubmitGate]]:
    sandbox = Sandbox(
        signature_key=SIGNATURE_KEY, job_seconds=60, drop_callbacks=1.0, callback_retry_base=0.01
    )
    gate = SubmitGate(sandbox.app)
    server = ServerThread(gate).start()
    yield RunningSandbox(sandbox, server), gate
    gate.released.set()
    server.stop()


def test_while_a_job_is_submitting_another_jobs_body_never_binds_it(
    gated: tuple[RunningSandbox, SubmitGate],
    start_service: StartService,
    contacts_csv: Path,
) -> None:
    upstream, gate = gated
    service = start_service(upstream, callback_grace=60)
    gate.released.set()
    b = service.submit(contacts_csv).json()
    gate.released.clear()
    gate.held.clear()
    predicted = str(upstream.sandbox._next_id)  # the upstream id A is about to get
    answers: list[httpx.Response] = []

    def submit() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http, contacts_csv.open("rb") as f:
            files = {"file": (contacts_csv.name, f, "text/csv")}
            answers.append(http.post("/jobs", data={"object": "contact"}, files=files))

    submitting = threading.Thread(target=submit)
    submitting.start()
    try:
        assert gate.held.wait(10)
        [a] = [j for j in service.http.get("/jobs").json()["jobs"] if j["id"] != b["id"]]
        assert (a["state"], a["upstream_id"]) == ("SUBMITTING", None)
        # B's body names B: refused outright, A adopts nothing.
        named = deliver(service, job_url(a), genuine(b), "b-named")
        assert (named.status_code, named.json()["error"]["code"]) == (409, "wrong_job")
        # B's body without its payload: kept until A's upstream id is known.
        bare = genuine(b, **{"callback-payload": None})
        assert deliver(service, job_url(a), bare, "b-bare").json() == {"status": "kept"}
        # A's own news, which races the submit's answer: kept as well.
        own = json.dumps({"id": predicted, "status": "COMPLETED", "recordsCount": 10}).encode()
        assert deliver(service, job_url(a), own, "a-early").json() == {"status": "kept"}
        assert deliver(service, job_url(a), own, "a-early-again").json() == {"status": "duplicate"}
        still = job_now(service, a["id"])
        assert (still["state"], still["upstream_id"]) == ("SUBMITTING", None)
    finally:
        gate.released.set()
        submitting.join(30)
    [answer] = answers
    assert answer.status_code == 202, answer.text
    final = job_now(service, a["id"])
    assert final["upstream_id"] == predicted != b["upstream_id"]
    assert (final["state"], final["records_count"], final["last_source"]) == (
        "COMPLETED",
        10,
        "callback",
    )
    details = [e["detail"] for e in refusals(final)]
    assert len(details) == 2
    assert b["id"] in details[0]  # the one refused at once
    assert b["upstream_id"] in details[1]  # the kept one, refused once A's id was known
    assert service.query("SELECT COUNT(*) FROM kept_callbacks WHERE applied_at IS NULL") == [(0,)]
    assert essentials(job_now(service, b["id"])) == essentials(b)
    # Now that A's upstream id is known, the bare body is refused at once, noted no more.
    again = deliver(service, job_url(a), bare, "b-bare-again")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "wrong_job")
    assert len(refusals(job_now(service, a["id"]))) == 2
