"""A job's life through the service, against the sandbox over real HTTP.

Submission, the callback path, the polling fallback, restarts and idempotency.
"""

from __future__ import annotations

import time
from pathlib import Path

from .helpers import SIGNATURE_KEY, StartSandbox, StartService, eventually, write_csv

DONE = {"COMPLETED", "ERROR", "ABORTED", "CANCELLED", "TIMED_OUT", "SUBMIT_FAILED"}


def test_the_sample_completes_by_a_verified_callback_without_polling(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    response = service.submit(contacts_csv)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "CREATED" and job["upstream_id"]
    final = service.wait_for(job["id"], DONE)
    assert final["state"] == "COMPLETED"
    assert final["records_count"] == 10
    assert final["records_failed_count"] == 0
    assert final["succeeded"] is True
    assert final["last_source"] == "callback"
    assert any("signature verified" in e["detail"] for e in final["events"])
    assert upstream.sandbox.status_calls == {}
    upload = upstream.sandbox.jobs[int(job["upstream_id"])]
    assert upload.callback_url == f"{service.url}/callbacks/jobs/{job['id']}"
    assert upload.metadata["callback-payload"] == job["id"]


def test_with_every_callback_dropped_polling_completes_the_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=0.5, poll_interval=0.5)
    started = time.monotonic()
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE, within=10)
    elapsed = time.monotonic() - started
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    assert final["records_count"] == 10
    assert elapsed < 0.5 + 0.5 + 1.0  # grace + one interval (+ slack for the job itself)
    assert upstream.sandbox.callbacks["dropped"] == 1


def test_duplicate_callbacks_are_applied_once(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(duplicate_callbacks=1.0)
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    service.wait_for(job["id"], DONE)
    deadline = time.monotonic() + 5
    while upstream.sandbox.callbacks["delivered"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.sandbox.callbacks["delivered"] == 2
    final = service.http.get(f"/jobs/{job['id']}").json()
    assert [e["source"] for e in final["events"]].count("callback") == 1
    metrics = service.http.get("/metrics").text
    assert 'bulkhook_callbacks_total{instance="default",outcome="duplicate"} 1.0' in metrics


def test_a_delayed_callback_still_settles_the_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(callback_delay=1.0)
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "callback")
    assert upstream.sandbox.status_calls == {}


def test_a_callback_racing_the_submit_response(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=0)
    service = start_service(upstream)
    for _ in range(5):
        response = service.submit(contacts_csv)
        assert response.status_code == 202
        final = service.wait_for(response.json()["id"], DONE)
        assert (final["state"], final["last_source"]) == ("COMPLETED", "callback")
        assert final["upstream_id"] == response.json()["upstream_id"]
    assert upstream.sandbox.status_calls == {}


def test_an_instance_that_signs_with_sha1(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(signature_algo="sha1")
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "callback")
    assert any("(sha1" in e["detail"] for e in final["events"])


def test_a_callback_signed_with_the_wrong_key_is_refused_then_polling_recovers(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(wrong_key=True, callback_retries=0)
    service = start_service(upstream, callback_grace=1.0)
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE)
    assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    assert [entry["outcome"] for entry in upstream.sandbox.callback_log] == [401]
    assert not any(e["source"] == "callback" for e in final["events"])


def test_failed_records_are_counted_and_listed_across_pages(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> None:
    rows = [["C_EmailAddress", "C_FirstName"]]
    rows += [["" if i % 3 else f"p{i}@example.com", f"n{i}"] for i in range(690)]
    upload = write_csv(tmp_path / "people.csv", rows)
    upstream = start_sandbox()
    service = start_service(upstream)
    job = service.submit(upload).json()
    final = service.wait_for(job["id"], DONE)
    assert (final["state"], final["records_count"], final["records_failed_count"]) == (
        "COMPLETED",
        690,
        460,
    )
    assert final["succeeded"] is False
    errors = service.http.get(f"/jobs/{job['id']}/errors").json()
    assert errors["count"] == 460
    assert len({e["record"]["C_FirstName"] for e in errors["errors"]}) == 460
    # The upstream pages at most 200 records: 460 take three pages or more, whether the
    # answer was read from it or from the copy the job's end started at once.
    assert upstream.sandbox.calls["errors"] >= 3


def test_a_restart_resumes_polling_of_jobs_in_flight(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=0.5)
    first = start_service(upstream, callback_grace=60)
    ids = [first.submit(contacts_csv).json()["id"] for _ in range(3)]
    first.server.stop()
    # Due times are in the store: make them due now, as if the grace had passed.
    first.query(f"UPDATE jobs SET next_poll_at = {time.time()}")
    second = start_service(upstream, callback_grace=60)  # the same database
    for job_id in ids:
        final = second.wait_for(job_id, DONE)
        assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")


def test_an_idempotency_key_makes_no_second_upstream_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    first = service.submit(contacts_csv, headers={"Idempotency-Key": "load-2026-11-29"})
    again = service.submit(contacts_csv, headers={"Idempotency-Key": "load-2026-11-29"})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(upstream.sandbox.jobs) == 1
    assert upstream.sandbox.calls["submit"] == 1


def test_a_refused_upload_is_recorded_as_submit_failed(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox()
    upstream.sandbox.inject_fault("submit", 400)
    service = start_service(upstream)
    response = service.submit(contacts_csv)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_refused"
    assert "Injected upstream failure" in error["message"]
    assert error["job"]["state"] == "SUBMIT_FAILED"
    stored = service.http.get(f"/jobs/{error['job']['id']}").json()
    assert stored["state"] == "SUBMIT_FAILED"


def test_a_callback_for_a_job_not_known_yet_is_kept_and_applied_when_it_appears(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    import json

    from service.callbacks.signatures import sign

    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=30)
    service = start_service(upstream)
    predicted = str(upstream.sandbox._next_id)
    body = json.dumps({"id": predicted, "status": "COMPLETED", "recordsCount": 10}).encode()
    early = service.http.post(
        "/callbacks",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Elements-Webhook-Id": "early-1",
            "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
        },
    )
    assert early.status_code == 202
    assert early.json() == {"status": "kept"}
    job = service.submit(contacts_csv).json()
    assert job["upstream_id"] == predicted
    assert (job["state"], job["last_source"]) == ("COMPLETED", "callback")


def test_cancel_goes_through_the_upstream(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=5)
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    cancelled = service.http.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "CANCELLATION_PENDING"
    final = service.wait_for(job["id"], DONE)
    assert final["state"] == "CANCELLED"
    again = service.http.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_terminal"


def test_a_second_cancel_while_the_first_is_pending_answers_with_the_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=5, drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    first = service.http.post(f"/jobs/{job['id']}/cancel")
    assert (first.status_code, first.json()["state"]) == (200, "CANCELLATION_PENDING")
    upstream_job = upstream.sandbox.find_job("marketing", str(job["upstream_id"]))
    assert upstream_job is not None
    eventually(lambda: upstream_job.status == "CANCELLED")
    again = service.http.post(f"/jobs/{job['id']}/cancel")  # a double click
    assert again.status_code == 200, again.text
    assert (again.json()["state"], again.json()["last_source"]) == ("CANCELLED", "poll")
    assert upstream.sandbox.calls["cancel"] == 1


def test_refresh_polls_now(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    time.sleep(0.4)
    refreshed = service.http.post(f"/jobs/{job['id']}/refresh").json()
    assert (refreshed["state"], refreshed["last_source"]) == ("COMPLETED", "poll")
    assert upstream.sandbox.status_calls == {job["upstream_id"]: 1}


def test_embedded_mode_needs_no_configuration(
    start_service: StartService, contacts_csv: Path
) -> None:
    from service.sandbox import SandboxOptions

    service = start_service(
        None, signature_keys=(), sandbox_options=SandboxOptions(job_seconds=0.2)
    )
    objects = service.http.get("/objects").json()
    assert objects == {
        "hub": "marketing",
        "objects": ["activities", "contact", "campaign", "list", "account"],
    }
    job = service.submit(contacts_csv).json()
    final = service.wait_for(job["id"], DONE)
    assert (final["state"], final["last_source"], final["records_count"]) == (
        "COMPLETED",
        "callback",
        10,
    )
