"""At-least-once callbacks and a faulty upstream: same outcome, nothing lost or doubled."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from service.callbacks.signatures import sign
from service.jobs import TERMINAL
from service.upstream.client import RetryPolicy

from .helpers import SIGNATURE_KEY, RunningService, StartSandbox, StartService, write_csv

DONE = {str(state) for state in TERMINAL}
ORDER = ["SUBMITTING", "CREATED", "STARTED", "RUNNING", "CANCELLATION_PENDING"]


def outcome(job: dict[str, Any]) -> tuple[Any, ...]:
    """What a user reads off a finished job."""
    return (job["state"], job["records_count"], job["records_failed_count"], job["succeeded"])


def state_changes(job: dict[str, Any]) -> list[str]:
    changes: list[str] = []
    for event in job["events"]:
        if not changes or event["state"] != changes[-1]:
            changes.append(event["state"])
    return changes


def assert_forward_only(changes: list[str]) -> None:
    *live, final = changes
    assert final in DONE
    ranks = [ORDER.index(state) for state in live]
    assert ranks == sorted(set(ranks)), changes


def run_jobs(service: RunningService, upload: Path, count: int) -> list[dict[str, Any]]:
    ids = []
    for _ in range(count):
        response = service.submit(upload)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return [service.wait_for(job_id, DONE, within=30) for job_id in ids]


def test_duplicated_delayed_callbacks_racing_polls_end_like_a_clean_run(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> None:
    upload = write_csv(
        tmp_path / "mixed.csv",
        [["Email", "Name"], ["a@example.com", "a"], ["", "b"], ["c@example.com", "c"]],
    )
    clean = run_jobs(start_service(start_sandbox(job_seconds=0.3)), upload, 3)

    noisy_upstream = start_sandbox(job_seconds=0.3, duplicate_callbacks=1.0, callback_delay=0.8)
    noisy_service = start_service(
        noisy_upstream, callback_grace=0.2, poll_interval=0.2, poll_max_interval=0.4
    )
    noisy = run_jobs(noisy_service, upload, 3)
    time.sleep(2.0)  # let every late duplicate arrive
    noisy = [noisy_service.http.get(f"/jobs/{job['id']}").json() for job in noisy]

    assert {outcome(job) for job in clean} == {("COMPLETED", 3, 1, False)}
    assert {outcome(job) for job in noisy} == {("COMPLETED", 3, 1, False)}
    for job in clean + noisy:
        assert_forward_only(state_changes(job))
    assert noisy_upstream.sandbox.callbacks["delivered"] == 6
    for job in noisy:
        callbacks = [e for e in job["events"] if e["source"] == "callback"]
        assert len(callbacks) == 1  # the duplicate was recognised, not applied again
        assert job["last_source"] in {"poll", "callback"}


def test_stale_news_never_moves_a_job_backwards(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(start_sandbox(job_seconds=0.2))
    job = run_jobs(service, contacts_csv, 1)[0]
    for n, status in enumerate(["RUNNING", "CREATED", "ERROR", "CANCELLED"]):
        body = json.dumps({"id": job["upstream_id"], "status": status}).encode()
        response = service.http.post(
            f"/callbacks/jobs/{job['id']}",
            content=body,
            headers={
                "Elements-Webhook-Id": f"stale-{n}",
                "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
            },
        )
        assert response.status_code == 200
        assert response.json()["state"] == "COMPLETED"
    final = service.http.get(f"/jobs/{job['id']}").json()
    assert outcome(final) == outcome(job)
    assert sum("ignored" in e["detail"] for e in final["events"]) == 4


def test_a_faulty_upstream_loses_no_job_and_doubles_no_upload(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=0.3, fail_rate=0.3, retry_after=0.1, seed=7)
    service = start_service(
        upstream,
        callback_grace=0.3,
        poll_interval=0.2,
        poll_max_interval=0.5,
        upstream_retry=RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.2),
    )
    # At least one ambiguous failure: the upstream made the job, the answer was a 500.
    upstream.sandbox.inject_fault("submit", 500, after_processing=True)
    accepted, refused = [], []
    for _ in range(12):
        response = service.submit(contacts_csv)
        assert response.status_code in (202, 502), response.text
        if response.status_code == 202:
            accepted.append(response.json()["id"])
        else:
            refused.append(response.json()["error"]["job"]["id"])
    assert accepted and refused
    finals = [service.wait_for(job_id, DONE, within=30) for job_id in accepted]
    assert {job["state"] for job in finals} == {"COMPLETED"}
    for job_id in refused:
        assert service.http.get(f"/jobs/{job_id}").json()["state"] == "SUBMIT_FAILED"

    # One upload, at most one upstream job: every upstream job names a distinct local job.
    payloads = [job.metadata["callback-payload"] for job in upstream.sandbox.jobs.values()]
    assert len(payloads) == len(set(payloads))
    assert set(accepted) <= set(payloads) <= set(accepted) | set(refused)

    for job in finals:
        for _ in range(3):
            errors = service.http.get(f"/jobs/{job['id']}/errors")
            if errors.status_code == 200:
                break
        assert errors.status_code == 200
        assert errors.json()["count"] == 0
    assert upstream.sandbox.calls["status"] + upstream.sandbox.calls["errors"] > 0


def test_cancel_through_a_faulty_upstream(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(job_seconds=20, retry_after=0.1, seed=3)
    service = start_service(
        upstream,
        callback_grace=0.3,
        poll_interval=0.2,
        upstream_retry=RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.2),
    )
    job = service.submit(contacts_csv).json()
    upstream.sandbox.inject_fault("cancel", 503, times=2)
    upstream.sandbox.inject_fault("status", 429, retry_after=0.1, times=3)
    response = service.http.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert service.wait_for(job["id"], DONE)["state"] == "CANCELLED"
    assert upstream.sandbox.calls["cancel"] == 3
