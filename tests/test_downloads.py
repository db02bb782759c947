"""Download jobs: a bulk query's result is fetched into the results directory once the
job completes, whole or not at all, and served from there with its SHA-256 as ETag.
On both stores, against the sandbox over real HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    RunningSandbox,
    RunningService,
    assert_error,
    records_of,
    sandbox_result,
)

FORMATS = ("csv", "json", "jsonl")
CONTACTS = 10


def uploaded(service: RunningService, contacts_csv: Path) -> None:
    """The sample contacts loaded into the sandbox's ``contact`` object."""
    submitted = service.submit(contacts_csv)
    assert submitted.status_code == 202, submitted.text
    job = service.wait_for(submitted.json()["id"], {"COMPLETED"})
    assert job["records_count"] == CONTACTS and job["records_failed_count"] == 0


def stored(service: RunningService, **fields: Any) -> dict[str, Any]:
    """A download asked for and followed until its result is stored."""
    answer = service.download(**fields)
    assert answer.status_code == 202, answer.text
    return service.wait_for_result(answer.json()["id"], {"stored"})


def results_dir(service: RunningService) -> Path:
    return Path(service.settings.results_dir)


def leftovers(directory: Path) -> list[str]:
    return [entry.name for entry in directory.iterdir() if entry.name.endswith(".part")]


def test_contacts_exported_in_every_format_are_the_records_uploaded(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    uploaded(service, contacts_csv)
    expected = records_of(contacts_csv.read_bytes(), "csv")
    for fmt in FORMATS:
        answer = service.download("contact", format=fmt)
        assert answer.status_code == 202, answer.text
        started = answer.json()
        assert answer.headers["location"] == f"/jobs/{started['id']}"
        assert (started["direction"], started["query"], started["format"]) == (
            "download",
            "select * from contact",
            fmt,
        )
        assert started["path"] is None and started["state"] == "CREATED"
        assert started["upstream_id"] is not None
        assert started["result"]["status"] == "pending" and started["result"]["url"] is None

        job = service.wait_for_result(started["id"], {"stored"})
        data = service.http.get(f"/jobs/{job['id']}/result")
        assert data.status_code == 200
        assert records_of(data.content, fmt) == expected, fmt
        own = sandbox_result(upstream, job["upstream_id"], fmt)
        assert data.content == own
        digest = hashlib.sha256(own).hexdigest()
        assert job["state"] == "COMPLETED" and job["records_count"] == CONTACTS
        assert job["result"] == {
            "status": "stored",
            "format": fmt,
            "bytes": len(own),
            "records": CONTACTS,
            "sha256": digest,
            "detail": None,
            "attempts": 1,
            "url": f"/jobs/{job['id']}/result",
        }
        assert data.headers["etag"] == f'"{digest}"'
        assert data.headers["content-length"] == str(len(own))
        assert data.headers["content-disposition"] == (
            f'attachment; filename="contact-{job["id"]}.{fmt}"'
        )
    assert leftovers(results_dir(service)) == []

    # Lists carry the direction and filter by it; uploads are uploads.
    downloads = service.http.get("/jobs", params={"direction": "download"}).json()["jobs"]
    uploads = service.http.get("/jobs", params={"direction": "upload"}).json()["jobs"]
    assert [job["format"] for job in downloads] == ["jsonl", "json", "csv"]
    assert {job["direction"] for job in downloads} == {"download"}
    assert all("result" not in job for job in downloads)
    assert len(uploads) == 1
    assert (uploads[0]["direction"], uploads[0]["query"], uploads[0]["format"]) == (
        "upload",
        None,
        None,
    )
    assert service.http.get(f"/jobs/{uploads[0]['id']}").json()["result"] is None
    assert_error(service.http.get("/jobs", params={"direction": "sideways"}), 400, "bad_direction")


def test_a_where_clause_exports_the_matching_records_only(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    uploaded(service, contacts_csv)
    query = "select * from contact where C_Company = 'Acme'"
    job = stored(service, query=query, format="jsonl")
    assert job["query"] == query
    data = service.http.get(f"/jobs/{job['id']}/result").content
    matched = [r for r in records_of(contacts_csv.read_bytes(), "csv") if r["C_Company"] == "Acme"]
    assert matched and records_of(data, "jsonl") == matched
    assert job["result"]["records"] == len(matched) == job["records_count"]


def test_a_query_the_upstream_cannot_parse_fails_the_job_at_once(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service(start_sandbox())
    answer = service.download(query="select * from contact where")
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "upstream_query_refused"
    assert "Error parsing query" in error["message"]
    job = error["job"]
    assert job["state"] == "SUBMIT_FAILED" and job["direction"] == "download"
    assert job["upstream_error"].startswith("Error parsing query")
    now = service.http.get(f"/jobs/{job['id']}").json()
    assert now["state"] == "SUBMIT_FAILED" and now["upstream_error"] == job["upstream_error"]
    assert now["result"]["status"] == "pending" and "SUBMIT_FAILED" in now["result"]["detail"]
    assert_error(service.http.get(f"/jobs/{job['id']}/result"), 404, "result_not_stored")
    # Nothing is left to poll: the job is over.
    assert service.query(f"SELECT next_poll_at FROM jobs WHERE id = '{job['id']}'") == [(None,)]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"object": "contact", "NaN": NaN}', "bad_json"),
        (b'{"object": "contact", "limit": 5}', "unknown_field"),
        (b'{"query": "select * from contact"}', "missing_object"),
        (b'{"object": "con/tact"}', "bad_object"),
        (b'{"object": 7}', "bad_object"),
        (b'{"object": "contact", "hub": "../x"}', "bad_hub"),
        (b'{"object": "contact", "format": "xml"}', "bad_format"),
        (b'{"object": "contact", "format": null, "query": ""}', "bad_query"),
        (b'{"object": "contact", "query": "select \\u0000"}', "bad_query"),
        (b'{"object": "contact", "query": "select \\ud800"}', "bad_query"),
        (b'{"object": "contact", "query": "' + b"x" * 4001 + b'"}', "bad_query"),
        (b'{"object": "contact", "query": ["select"]}', "bad_query"),
    ],
)
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_bad_download_request_is_refused_and_makes_no_job(
    start_service: Callable[..., RunningService], body: bytes, code: str
) -> None:
    service = start_service()
    answer = service.http.post(
        "/jobs", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert_error(answer, 400, code)
    assert service.http.get("/jobs").json()["jobs"] == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_body_over_64_kib_is_refused_without_being_read_whole(
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service()
    body = json.dumps({"object": "contact", "query": "x" * (64 * 1024)}).encode()
    declared = service.http.post(
        "/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(declared, 413, "too_large")

    def chunked() -> Iterator[bytes]:
        yield b'{"object": "contact", "query": "'
        for _ in range(1024):  # 64 MiB, if it were all read
            yield b"x" * 65536
        yield b'"}'

    streamed = service.http.post(
        "/jobs", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert_error(streamed, 413, "too_large")
    assert service.http.get("/jobs").json()["jobs"] == []


def test_the_same_idempotency_key_gives_the_same_download(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    key = {"Idempotency-Key": "export-1"}
    first = service.download(format="json", headers=key)
    again = service.download(format="csv", headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["format"] == "json"
    assert upstream.sandbox.calls["query"] == 1
