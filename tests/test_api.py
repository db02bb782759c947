"""The job API: bad uploads, tokens, listing, discovery, health."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.sandbox import API_PREFIX

from .helpers import (
    RecordingUpstream,
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    sent_upload,
)


@pytest.fixture
def upstream(start_sandbox: StartSandbox) -> RunningSandbox:
    return start_sandbox()


@pytest.fixture
def service(upstream: RunningSandbox, start_service: StartService) -> RunningService:
    return start_service(upstream, max_upload_bytes=4096)


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"", 400, "empty_file"),
        (b"\n\n", 400, "no_header"),
        (b"Email,Name\n", 400, "no_rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 400, "binary_file"),
        (b"Email,Name\nann@example.com,Ren\xe9e\n", 400, "not_utf8"),
        (b"Email,Name\n" + b"a@example.com,x\n" * 400, 413, "upload_too_large"),
    ],
)
def test_bad_uploads_get_a_clear_4xx_and_nothing_goes_upstream(
    service: RunningService,
    upstream: RunningSandbox,
    tmp_path: Path,
    content: bytes,
    status: int,
    code: str,
) -> None:
    upload = tmp_path / "upload.csv"
    upload.write_bytes(content)
    response = service.submit(upload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert upstream.sandbox.calls["submit"] == 0
    assert service.http.get("/jobs").json()["jobs"] == []


def test_a_missing_object_is_400(service: RunningService, contacts_csv: Path) -> None:
    with contacts_csv.open("rb") as handle:
        response = service.http.post("/jobs", files={"file": ("c.csv", handle, "text/csv")})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_object"


def test_a_missing_file_is_400(service: RunningService) -> None:
    response = service.http.post("/jobs", data={"object": "contact"}, files={"x": ("a", b"b")})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_file"


def test_not_multipart_is_415(service: RunningService) -> None:
    response = service.http.post(
        "/jobs", content=b"Email\na@b.co\n", headers={"Content-Type": "text/csv"}
    )
    assert response.status_code == 415


@pytest.mark.parametrize("metadata", ["{not json", "[1, 2]", '"text"'])
def test_bad_metadata_is_400(service: RunningService, contacts_csv: Path, metadata: str) -> None:
    response = service.submit(contacts_csv, metadata=metadata)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_metadata"


def test_metadata_hub_and_path_reach_the_upstream(
    service: RunningService, upstream: RunningSandbox, contacts_csv: Path
) -> None:
    metadata = {"identifierFieldName": "C_EmailAddress", "action": "upsert"}
    response = service.submit(
        contacts_csv,
        hub="crm",
        object="contacts",
        path="/imports/c.csv",
        metadata=json.dumps(metadata),
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["hub"], job["object"], job["path"]) == ("crm", "contacts", "/imports/c.csv")
    sent = upstream.sandbox.jobs[int(job["upstream_id"])]
    assert sent.metadata == {**metadata, "callback-payload": job["id"]}
    assert sent.path == "/imports/c.csv"


@pytest.mark.parametrize("given", [None, "", "   "])
def test_without_a_path_none_is_sent_and_the_job_shows_null(
    service: RunningService, upstream: RunningSandbox, contacts_csv: Path, given: str | None
) -> None:
    fields = {} if given is None else {"path": given}
    response = service.submit(contacts_csv, **fields)
    assert response.status_code == 202, response.text
    assert response.json()["path"] is None
    job = service.wait_for(response.json()["id"], {"COMPLETED"})
    assert job["path"] is None  # read back from the store
    assert upstream.sandbox.jobs[int(job["upstream_id"])].path is None
    [listed] = service.http.get("/jobs").json()["jobs"]
    assert listed["path"] is None


@pytest.mark.parametrize("path", [None, "/imports/c.csv"])
def test_a_spooled_upload_on_the_wire_sends_metadata_first_and_a_path_only_if_given(
    start_service: StartService, contacts_csv: Path, path: str | None
) -> None:
    upstream = RecordingUpstream({"id": 1234, "status": "CREATED", "instanceId": 987654})
    try:
        service = start_service(oc_base_url=upstream.url + API_PREFIX)
        fields = {"metadata": json.dumps({"action": "upsert", "identifierFieldName": "Email"})}
        if path:
            fields["path"] = path
        response = service.submit(contacts_csv, **fields)
    finally:
        upstream.close()
    assert response.status_code == 202, response.text
    job = response.json()
    [sent] = upstream.posts()
    meta, file = sent_upload(sent, service.url, job, path)
    assert meta == {
        "action": "upsert",
        "identifierFieldName": "Email",
        "callback-payload": job["id"],
    }
    assert (
        file.header_lines[0]
        == b'Content-Disposition: form-data; name="file"; filename="contacts.csv"'
    )
    assert file.data == contacts_csv.read_bytes()
    # The numeric id is kept as its digits; instanceId, which the job has no field for,
    # is in the submit's timeline entry.
    assert (job["path"], job["upstream_id"], job["state"]) == (path, "1234", "CREATED")
    [accepted] = [e for e in job["events"] if e["source"] == "submit" and e["state"] == "CREATED"]
    assert accepted["detail"].endswith("upstream job 1234 (instanceId 987654)")


@pytest.mark.parametrize("answered", [1234.0, True, "", 10**20])
def test_a_submit_answered_with_an_unusable_job_id_fails_the_job_and_sends_nothing_again(
    start_service: StartService, contacts_csv: Path, answered: object
) -> None:
    upstream = RecordingUpstream({"id": answered, "status": "CREATED"})
    try:
        service = start_service(oc_base_url=upstream.url + API_PREFIX)
        response = service.submit(contacts_csv)
    finally:
        upstream.close()
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert "accepted the upload but returned" in error["message"]
    assert (error["job"]["state"], error["job"]["upstream_id"]) == ("SUBMIT_FAILED", None)
    assert len(upstream.posts()) == 1


def test_an_unknown_object_upstream_is_a_502_with_its_message(
    service: RunningService, contacts_csv: Path
) -> None:
    response = service.submit(contacts_csv, object="widgets")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_refused"
    assert "Object 'widgets' is not available" in error["message"]
    assert error["job"]["state"] == "SUBMIT_FAILED"


def test_listing_filters_by_state_and_pages_with_a_cursor(
    service: RunningService, contacts_csv: Path
) -> None:
    ids = [service.submit(contacts_csv).json()["id"] for _ in range(3)]
    failed = service.submit(contacts_csv, object="widgets").json()["error"]["job"]["id"]
    first = service.http.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == [failed, ids[2]]
    rest = service.http.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[1], ids[0]]
    only_failed = service.http.get("/jobs", params={"state": "SUBMIT_FAILED"}).json()
    assert [j["id"] for j in only_failed["jobs"]] == [failed]
    assert "events" not in first["jobs"][0]


def test_objects_are_discovered_through_the_upstream(service: RunningService) -> None:
    assert service.http.get("/objects", params={"hub": "crm"}).json() == {
        "hub": "crm",
        "objects": ["accounts", "contacts", "leads", "opportunities"],
    }
    unknown = service.http.get("/objects", params={"hub": "nowhere"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "hub_not_found"


def test_health_readiness_and_metrics(service: RunningService, contacts_csv: Path) -> None:
    assert service.http.get("/healthz").json() == {"status": "ok"}
    assert service.http.get("/readyz").json() == {"status": "ready"}
    service.submit(contacts_csv)
    metrics = service.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert (
        'bulkhook_upstream_calls_total{instance="default",operation="submit",status="200"} 1.0'
        in metrics.text
    )
    assert 'bulkhook_jobs{instance="default",state=' in metrics.text


def test_api_tokens_guard_the_job_api_but_not_callbacks_or_health(
    upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(upstream, api_tokens=("token-one", "token-two"))
    assert service.http.get("/jobs").status_code == 401
    assert service.http.get("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert service.http.get("/objects").status_code == 401
    assert service.submit(contacts_csv).status_code == 401
    authorized = httpx.Client(
        base_url=service.url, headers={"Authorization": "Bearer token-two"}, timeout=30
    )
    with authorized:
        assert authorized.get("/jobs").status_code == 200
    assert service.http.get("/healthz").status_code == 200
    unsigned = service.http.post("/callbacks", content=b"{}")
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "bad_signature"  # reached the callback check
    refused = service.http.get("/jobs")
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "token-one" not in refused.text
