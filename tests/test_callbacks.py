"""Receiving callbacks: verify before parsing, dedupe, keep, nudge, refuse."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from service.callbacks.signatures import sign

from .helpers import (
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    assert_failure_shown,
    deliver,
    genuine,
    job_now,
    signed,
    write_csv,
)

DONE = {"COMPLETED", "ERROR", "ABORTED", "CANCELLED", "TIMED_OUT", "SUBMIT_FAILED"}
WHOLE_FILE_ERROR = "All prospects require either 'email' or 'id'"


@pytest.fixture
def running(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> tuple[RunningSandbox, RunningService, dict[str, Any]]:
    """A service whose one job is RUNNING upstream and hears no callback of its own."""
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=30)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    return upstream, service, job


def snapshot(service: RunningService, job_id: str) -> dict[str, Any]:
    return service.http.get(f"/jobs/{job_id}").json()


def test_a_verified_callback_completes_the_job(running: Any) -> None:
    _, service, job = running
    body = json.dumps({"id": job["upstream_id"], "status": "COMPLETED", "recordsCount": 10})
    response = service.http.post(
        f"/callbacks/jobs/{job['id']}", content=body, headers=signed(body.encode(), "w-1")
    )
    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "job": job["id"], "state": "COMPLETED"}
    assert snapshot(service, job["id"])["state"] == "COMPLETED"


def test_a_job_the_upstream_fails_whole_shows_its_message_from_the_callback(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, callback_grace=60)
    people = write_csv(tmp_path / "people.csv", [["First", "Last"], ["Ada", "Lovelace"]])
    job = service.submit(people).json()
    done = service.wait_for(job["id"], DONE)
    assert upstream.sandbox.status_calls[done["upstream_id"]] == 0, "no poll: the callback said it"
    assert_failure_shown(service, job["id"], WHOLE_FILE_ERROR, "callback")


def test_a_later_callback_without_a_message_keeps_the_one_recorded(running: Any) -> None:
    _, service, job = running
    failed = genuine(job, status="ABORTED", recordsCount=None, error="Quota exceeded")
    assert deliver(service, f"/callbacks/jobs/{job['id']}", failed, "w-1").status_code == 200
    again = genuine(job, status="ABORTED", recordsCount=None, recordsFailedCount=None)
    assert deliver(service, "/callbacks", again, "w-2").status_code == 200
    late = genuine(job, status="COMPLETED", error="something else")
    assert deliver(service, "/callbacks", late, "w-3").status_code == 200
    after = job_now(service, job["id"])
    assert (after["state"], after["upstream_error"]) == ("ABORTED", "Quota exceeded")
    last = after["events"][-1]["detail"]
    assert "error: something else" in last and "ignored: job is already ABORTED" in last


def test_the_instance_wide_url_finds_the_job_by_payload_or_upstream_id(running: Any) -> None:
    _, service, job = running
    by_payload = json.dumps({"callback-payload": job["id"], "status": "RUNNING"}).encode()
    first = service.http.post("/callbacks", content=by_payload, headers=signed(by_payload, "w-1"))
    assert first.json()["state"] == "RUNNING"
    by_id = json.dumps({"jobId": int(job["upstream_id"]), "status": "COMPLETE"}).encode()
    second = service.http.post("/callbacks", content=by_id, headers=signed(by_id, "w-2"))
    assert second.json() == {"status": "accepted", "job": job["id"], "state": "COMPLETED"}


def test_a_repeated_delivery_is_acknowledged_and_changes_nothing(running: Any) -> None:
    _, service, job = running
    body = json.dumps({"id": job["upstream_id"], "status": "RUNNING"}).encode()
    url = f"/callbacks/jobs/{job['id']}"
    assert service.http.post(url, content=body, headers=signed(body, "w-1")).status_code == 200
    before = snapshot(service, job["id"])
    again = service.http.post(url, content=body, headers=signed(body, "w-1"))
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert snapshot(service, job["id"]) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Elements-Webhook-Signature": ""},
        {"Elements-Webhook-Signature": "sha256=junk"},
        {"Elements-Webhook-Signature": "md5=abc"},
        {"Elements-Webhook-Signature": sign("another key", b"{}")},
    ],
)
def test_an_unverified_callback_is_refused_and_changes_nothing(
    running: Any, headers: dict[str, str]
) -> None:
    _, service, job = running
    before = snapshot(service, job["id"])
    body = json.dumps({"id": job["upstream_id"], "status": "COMPLETED"}).encode()
    response = service.http.post(
        f"/callbacks/jobs/{job['id']}",
        content=body,
        headers={"Content-Type": "application/json", "Elements-Webhook-Id": "x", **headers},
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "bad_signature"
    assert snapshot(service, job["id"]) == before
    metrics = service.http.get("/metrics").text
    assert 'bulkhook_callbacks_total{instance="default",outcome="bad_signature"} 1.0' in metrics


def test_malformed_json_with_a_valid_signature_is_400_and_kept(running: Any) -> None:
    _, service, job = running
    body = b'{"id": "1", "status": '
    response = service.http.post(
        f"/callbacks/jobs/{job['id']}", content=body, headers=signed(body, "w-bad")
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_callback"
    kept = service.query("SELECT reason, body FROM kept_callbacks")
    assert kept == [("malformed", body)]
    assert snapshot(service, job["id"])["state"] == job["state"]


def test_a_callback_without_a_readable_status_polls_now(running: Any) -> None:
    upstream, service, job = running
    body = json.dumps({"message": {"eventId": "e-1", "objectType": "bulk"}}).encode()
    response = service.http.post(
        f"/callbacks/jobs/{job['id']}", content=body, headers=signed(body, "w-nudge")
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while snapshot(service, job["id"])["last_source"] != "poll" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.sandbox.status_calls == {job["upstream_id"]: 1}
    job_now = snapshot(service, job["id"])
    assert job_now["last_source"] == "poll"
    assert job_now["state"] == "CREATED"  # what the upstream said: still not running


def test_an_oversized_callback_is_413(running: Any) -> None:
    _, service, job = running
    body = json.dumps({"status": "COMPLETED", "pad": "x" * (1 << 20)}).encode()
    response = service.http.post(
        f"/callbacks/jobs/{job['id']}", content=body, headers=signed(body, "w-big")
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_without_any_signature_key_callbacks_are_refused(
    start_sandbox: StartSandbox, start_service: StartService
) -> None:
    service = start_service(start_sandbox(), signature_keys=())
    body = b'{"id": "1", "status": "COMPLETED"}'
    response = service.http.post("/callbacks", content=body, headers=signed(body, "w-1"))
    assert response.status_code == 401
    assert "no signature key" in response.json()["error"]["message"]
