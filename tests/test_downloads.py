"""Download jobs: a bulk query's result is fetched into the results directory once the
job completes, whole or not at all, and served from there with its SHA-256 as ETag.
On both stores, against the sandbox over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.downloads.records import Format
from service.downloads.results import ResultFiles
from service.downloads.rules import UPSTREAM_KEEPS, FetchState, after_failure
from service.sandbox import API_PREFIX
from service.server.thread import ServerThread
from service.store import open_store
from service.upstream.client import RetryPolicy

from .helpers import (
    SIGNATURE_KEY,
    RunningSandbox,
    RunningService,
    assert_error,
    eventually,
    free_port,
    metric,
    odd_upstream,
    records_of,
    run_bulkhook,
    sandbox_result,
    serve,
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
    # Owner-only: results may hold anything the upstream holds.
    assert results_dir(service).stat().st_mode & 0o777 == 0o700
    assert {entry.stat().st_mode & 0o777 for entry in results_dir(service).iterdir()} == {0o600}

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
    # The job is shown as GET /jobs/{id} shows it.
    assert job["failed_records"] is None
    assert job["result"]["status"] == "failed" and job["result"]["url"] is None
    assert [event["state"] for event in job["events"]] == ["SUBMITTING", "SUBMIT_FAILED"]
    assert job["upstream_error"].startswith("Error parsing query")
    now = service.http.get(f"/jobs/{job['id']}").json()
    assert now["state"] == "SUBMIT_FAILED" and now["upstream_error"] == job["upstream_error"]
    assert now["result"]["status"] == "failed" and "SUBMIT_FAILED" in now["result"]["detail"]
    assert_error(service.http.get(f"/jobs/{job['id']}/result"), 404, "result_not_stored")
    # Nothing is left to poll: the job is over.
    assert service.query(f"SELECT next_poll_at FROM jobs WHERE id = '{job['id']}'") == [(None,)]


def test_a_query_the_upstream_fails_otherwise_is_a_502_and_the_job_ends(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, upstream_retry=RetryPolicy(attempts=1))
    upstream.sandbox.inject_fault("query", 403)
    answer = service.download()
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["upstream_status"]) == ("upstream_refused", 403)
    job = service.http.get("/jobs", params={"direction": "download"}).json()["jobs"][0]
    assert job["state"] == "SUBMIT_FAILED" and job["upstream_id"] is None


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
        # The result is fetched as the object: a query must read it, and an object
        # named in the default query must be one word.
        (b'{"object": "contact", "query": "select * from account"}', "bad_query"),
        (b'{"object": "contact", "query": "select Email"}', "bad_query"),
        (b'{"object": "contact limit 1"}', "bad_object"),
        (b'{"object": "contact where x = \'1\'"}', "bad_object"),
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


def test_listing_one_direction_pages_through_its_own_index(
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service()
    sql = "SELECT * FROM jobs WHERE direction = 'download' AND id < 'z' ORDER BY id DESC LIMIT 50"
    if service.settings.sqlite_path is not None:
        plan = " ".join(str(row[-1]) for row in service.query(f"EXPLAIN QUERY PLAN {sql}"))
        assert "USING INDEX jobs_direction_id (direction=? AND id<?)" in plan, plan
    else:
        [(definition,)] = service.query(
            "SELECT indexdef FROM pg_indexes"
            " WHERE indexname = 'jobs_direction_id' AND schemaname = current_schema()"
        )
        assert definition.endswith("(direction, id)"), definition


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


@pytest.mark.parametrize("upload_first", [True, False])
def test_an_idempotency_key_is_never_shared_by_an_upload_and_a_download(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    upload_first: bool,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    key = {"Idempotency-Key": "nightly-1"}
    if upload_first:
        first = service.submit(contacts_csv, headers=key)
        again = service.download(headers=key)
        owner, other = "upload", "download"
    else:
        first = service.download(headers=key)
        again = service.submit(contacts_csv, headers=key)
        owner, other = "download", "upload"
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert_error(again, 409, "idempotency_key_reused")
    message = again.json()["error"]["message"]
    assert f"{owner} job {job_id}" in message and other in message
    assert "idempotent-replayed" not in again.headers
    # Nothing started: one job, one upstream call, no spooled file left.
    assert [job["id"] for job in service.http.get("/jobs").json()["jobs"]] == [job_id]
    assert (upstream.sandbox.calls["query"], upstream.sandbox.calls["submit"]) == (
        (0, 1) if upload_first else (1, 0)
    )
    spooled = service.components.spool.path.glob("bulkhook-upload-*")
    assert list(spooled) == []
    # The key still answers its own direction with its own job.
    replay = (
        service.submit(contacts_csv, headers=key) if upload_first else service.download(headers=key)
    )
    assert (replay.status_code, replay.json()["id"]) == (200, job_id)


def test_a_download_whose_callbacks_never_come_is_polled_to_its_result(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0)
    service = start_service(upstream, callback_grace=0.3)
    uploaded(service, contacts_csv)
    job = stored(service, format="csv")
    assert job["last_source"] == "poll" and job["records_count"] == CONTACTS
    assert not any(event["source"] == "callback" for event in job["events"])
    assert job["result"]["records"] == CONTACTS


def test_a_download_completed_by_its_callback_is_fetched(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    # Polls come too late to matter: the callback (jobDirection DOWNLOAD) completes it.
    service = start_service(upstream, callback_grace=60.0)
    uploaded(service, contacts_csv)
    job = stored(service, format="json")
    assert job["last_source"] == "callback"
    assert upstream.sandbox.calls["status"] == 0


def test_a_result_cut_off_mid_file_is_fetched_again_whole(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> None:
    upstream = start_sandbox(generated_records=20_000)
    service = start_service(upstream)
    upstream.sandbox.inject_fault("download", 200, cut_after=300_000)
    job = stored(service, object_name="generated", format="csv")
    own = sandbox_result(upstream, job["upstream_id"], "csv")
    assert len(own) > 300_000
    result = job["result"]
    assert (result["attempts"], result["records"], result["bytes"]) == (2, 20_000, len(own))
    assert result["sha256"] == hashlib.sha256(own).hexdigest()
    served = service.http.get(f"/jobs/{job['id']}/result")
    assert hashlib.sha256(served.content).hexdigest() == result["sha256"]
    assert upstream.sandbox.calls["download"] == 2
    metrics = service.http.get("/metrics").text
    assert metric(metrics, 'bulkhook_downloads_total{instance="default",outcome="retried"}') == 1
    assert metric(metrics, 'bulkhook_downloads_total{instance="default",outcome="stored"}') == 1
    assert metric(metrics, "bulkhook_result_bytes_total") == len(own)
    assert leftovers(results_dir(service)) == []


def test_a_refused_fetch_waits_at_least_the_retry_after_the_upstream_asks(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, upstream_retry=RetryPolicy(attempts=1))
    uploaded(service, contacts_csv)
    upstream.sandbox.inject_fault("download", 429, retry_after=3)
    before = time.time()
    answer = service.download(format="jsonl")
    job_id = answer.json()["id"]
    waiting = service.wait_for_result(job_id, {"fetching"}, within=30)
    eventually(
        lambda: "HTTP 429" in (service.http.get(f"/jobs/{job_id}").json()["result"]["detail"] or "")
    )
    [(due,)] = service.query(f"SELECT due_at FROM result_fetches WHERE job_id = '{job_id}'")
    assert waiting["state"] == "COMPLETED"
    assert due >= before + 3
    job = service.wait_for_result(job_id, {"stored"})
    assert job["result"]["attempts"] == 2 and job["result"]["detail"] is None
    assert upstream.sandbox.calls["download"] == 2


def test_an_answer_that_cannot_be_decoded_is_a_failed_attempt_tried_again_later(
    start_service: Callable[..., RunningService],
) -> None:
    async def lying(request: Request) -> Response:
        return Response(
            b"this is not gzip", media_type="text/csv", headers={"Content-Encoding": "gzip"}
        )

    with ServerThread(odd_upstream(lying)).start() as upstream:
        service = start_service(
            oc_base_url=upstream.url + API_PREFIX, upstream_retry=RetryPolicy(attempts=1)
        )
        job_id = service.download().json()["id"]

        def result() -> dict[str, Any]:
            return dict(service.http.get(f"/jobs/{job_id}").json()["result"])

        eventually(lambda: result()["attempts"] >= 2)
        now = result()
        assert now["status"] == "fetching" and now["url"] is None
        assert "could not be decoded" in now["detail"]
        [(due,)] = service.query(f"SELECT due_at FROM result_fetches WHERE job_id = '{job_id}'")
        assert due is not None and math.isfinite(due)
        retried = metric(
            service.http.get("/metrics").text,
            'bulkhook_downloads_total{instance="default",outcome="retried"}',
        )
        assert retried >= 2
        assert leftovers(results_dir(service)) == []


def test_an_unexpected_error_in_an_attempt_is_a_failed_attempt_too(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class FailingOnce(ResultFiles):
        """The results directory, with a bug in its first write."""

        failed = False

        async def write(self, job_id: str, fmt: Format, chunks: AsyncIterator[bytes]) -> Any:
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise LookupError("a bug")
            return await super().write(job_id, fmt, chunks)

    monkeypatch.setattr("service.app.ResultFiles", FailingOnce)
    service = start_service(start_sandbox())
    uploaded(service, contacts_csv)
    # Not claimed again only when the lease (two minutes) runs out: tried again at once.
    job = stored(service, format="csv")
    assert job["result"]["attempts"] == 2 and job["result"]["records"] == CONTACTS
    metrics = service.http.get("/metrics").text
    assert metric(metrics, 'bulkhook_downloads_total{instance="default",outcome="retried"}') == 1


def test_a_lease_renewal_the_store_fails_is_tried_again_and_the_fetch_goes_on(
    start_service: Callable[..., RunningService], store_url: str
) -> None:
    asked: list[str] = []

    async def trickle(request: Request) -> Response:
        asked.append(request.url.path)

        async def body() -> AsyncIterator[bytes]:
            yield b"id,name\n"
            for n in range(15):
                await asyncio.sleep(0.1)
                yield b"%d,x\n" % n

        return StreamingResponse(body(), media_type="text/csv")

    store = open_store(store_url)
    renew = store.save_fetch
    failed: list[str] = []

    async def renewal_fails_once(
        state: FetchState, owner: str, *, lease_until: float | None = None
    ) -> bool:
        if lease_until is not None and not failed:
            failed.append(state.job_id)
            raise ConnectionError("the store is away for a moment")
        return await renew(state, owner, lease_until=lease_until)

    store.save_fetch = renewal_fails_once  # type: ignore[method-assign]
    with ServerThread(odd_upstream(trickle)).start() as upstream:
        # A lease of 0.6 s, renewed every 0.2 s, on a fetch of 1.5 s.
        service = start_service(oc_base_url=upstream.url + API_PREFIX, store=store, poll_lease=0.6)
        job = service.wait_for_result(service.download().json()["id"], {"stored"})
    assert failed == [job["id"]]
    assert job["result"]["attempts"] == 1 and job["result"]["records"] == 15
    # Kept all along: no second attempt ever asked for the file.
    assert len(asked) == 1


def test_a_result_that_is_gone_upstream_is_given_up_after_three_answers(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, upstream_retry=RetryPolicy(attempts=1))
    uploaded(service, contacts_csv)
    upstream.sandbox.inject_fault("download", 404, times=3)
    answer = service.download()
    job = service.wait_for_result(answer.json()["id"], {"failed"})
    result = job["result"]
    assert result["attempts"] == 3 and result["url"] is None and result["sha256"] is None
    assert "given up" in result["detail"] and "HTTP 404" in result["detail"]
    assert_error(service.http.get(f"/jobs/{job['id']}/result"), 404, "result_not_stored")
    metrics = service.http.get("/metrics").text
    assert metric(metrics, 'bulkhook_downloads_total{instance="default",outcome="failed"}') == 1
    assert metric(metrics, 'bulkhook_downloads_total{instance="default",outcome="retried"}') == 2


def test_the_result_route_answers_ranges_etags_and_says_why_there_is_none(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream)
    uploaded(service, contacts_csv)
    upload_id = service.http.get("/jobs").json()["jobs"][0]["id"]
    job = stored(service, format="json")
    url = f"/jobs/{job['id']}/result"
    whole = service.http.get(url)
    etag = whole.headers["etag"]
    assert whole.headers["content-type"] == "application/json"

    part = service.http.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(whole.content)}"
    tail = service.http.get(url, headers={"Range": "bytes=-5", "If-Range": etag})
    assert tail.status_code == 206 and tail.content == whole.content[-5:]
    beyond = service.http.get(url, headers={"Range": f"bytes={len(whole.content)}-"})
    assert beyond.status_code == 416
    unchanged = service.http.get(url, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    head = service.http.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(whole.content))

    assert_error(service.http.get("/jobs/nosuchjob/result"), 404, "job_not_found")
    assert_error(service.http.get(f"/jobs/{upload_id}/result"), 404, "not_a_download")
    # A download whose job has not completed yet has nothing to serve, and says so.
    upstream.sandbox.options = dataclasses.replace(upstream.sandbox.options, job_seconds=60.0)
    running = service.download(format="csv").json()
    refused = service.http.get(f"/jobs/{running['id']}/result")
    assert refused.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "result_not_stored" and "pending" in error["message"]
    assert error["result"]["status"] == "pending" and error["result"]["url"] is None


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_the_result_route_needs_the_bearer_token_like_every_job_route(
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service(api_tokens=("a-token",))
    assert_error(service.http.get("/jobs/0190f3a10102/result"), 401, "unauthorized")
    found = service.http.get(
        "/jobs/0190f3a10102/result", headers={"Authorization": "Bearer a-token"}
    )
    assert_error(found, 404, "job_not_found")


GENERATED = 1_500_000


def service_env(upstream: RunningSandbox, database_url: str, results: Path) -> dict[str, str]:
    return {
        "OC_BASE_URL": upstream.api_url,
        "OC_USER_SECRET": "user-secret",
        "OC_ORG_SECRET": "org-secret",
        "OC_ELEMENT_TOKEN": "element-token",
        "OC_SIGNATURE_KEYS": SIGNATURE_KEY,
        "BULKHOOK_DATABASE_URL": database_url,
        "BULKHOOK_RESULTS_DIR": str(results),
        "BULKHOOK_POLL_INTERVAL": "0.3",
        "BULKHOOK_POLL_MAX_INTERVAL": "1",
        "BULKHOOK_POLL_LEASE": "2",
    }


def part_files(results: Path) -> list[Path]:
    return [entry for entry in results.glob(".*.part")] if results.is_dir() else []


def test_a_fetch_cut_off_by_kill_9_is_made_again_and_no_part_is_ever_served(
    start_sandbox: Callable[..., RunningSandbox], store_url: str, tmp_path: Path
) -> None:
    """A large result is arriving when the service is killed; restarted, it fetches
    again once the lease runs out. Until the whole file is stored the result answers
    404, and afterwards no temporary file is left."""
    upstream = start_sandbox(generated_records=GENERATED)
    results = tmp_path / "results"
    env = service_env(upstream, store_url, results)
    process, url = serve(tmp_path, **env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post("/jobs", json={"object": "generated"})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            eventually(lambda: any(part.stat().st_size > 0 for part in part_files(results)), 60)
            during = http.get(f"/jobs/{job_id}/result")
            assert during.status_code == 404
            assert during.json()["error"]["result"]["status"] == "fetching"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert part_files(results), "the kill left the unfinished file, as a kill does"
    assert not (results / f"{job_id}.csv").exists()

    process, url = serve(tmp_path, **env)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            answers: list[int] = []

            def whole() -> bool:
                # The file first, then the status: a file served means the status says
                # stored by then, so only the last look may have seen it.
                answers.append(http.head(f"/jobs/{job_id}/result").status_code)
                result = http.get(f"/jobs/{job_id}").json()["result"]
                return bool(result["status"] == "stored")

            eventually(whole, within=120)
            job = http.get(f"/jobs/{job_id}").json()
            digest = hashlib.sha256()
            with http.stream("GET", f"/jobs/{job_id}/result") as served:
                assert served.status_code == 200
                for chunk in served.iter_bytes():
                    digest.update(chunk)
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert set(answers[:-1]) <= {404}
    own = hashlib.sha256()
    for piece in upstream.sandbox.result(upstream.sandbox.jobs[int(job["upstream_id"])], "csv"):
        own.update(piece)
    assert job["result"]["status"] == "stored" and job["result"]["records"] == GENERATED
    assert job["result"]["sha256"] == digest.hexdigest() == own.hexdigest()
    assert upstream.sandbox.calls["download"] == 2
    assert part_files(results) == []


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_two_replicas_fetch_a_result_once_and_both_serve_it(
    start_sandbox: Callable[..., RunningSandbox], store_url: str, tmp_path: Path
) -> None:
    upstream = start_sandbox(generated_records=50_000)
    results = tmp_path / "shared-results"
    env = service_env(upstream, store_url, results)
    replicas = [serve(tmp_path, **env) for _ in range(2)]
    try:
        (_, first), (_, second) = replicas
        with (
            httpx.Client(base_url=first, timeout=30) as one,
            httpx.Client(base_url=second, timeout=30) as other,
        ):
            answer = one.post("/jobs", json={"object": "generated", "format": "jsonl"})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            eventually(
                lambda: other.get(f"/jobs/{job_id}").json()["result"]["status"] == "stored", 60
            )
            bodies = [client.get(f"/jobs/{job_id}/result").content for client in (one, other)]
            result = other.get(f"/jobs/{job_id}").json()["result"]
            stored_counts = [
                metric(
                    client.get("/metrics").text,
                    'bulkhook_downloads_total{instance="default",outcome="stored"}',
                )
                for client in (one, other)
            ]
    finally:
        for process, _ in replicas:
            process.terminate()
            process.communicate(timeout=10)
    assert bodies[0] == bodies[1]
    assert hashlib.sha256(bodies[0]).hexdigest() == result["sha256"]
    assert result["attempts"] == 1 and result["records"] == 50_000
    assert sorted(stored_counts) == [0, 1]
    assert upstream.sandbox.calls["download"] == 1


def test_an_unusable_results_directory_stops_start_up_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_bulkhook(
        "serve",
        "--port",
        str(free_port()),
        BULKHOOK_RESULTS_DIR=str(blocker / "results"),
        BULKHOOK_DATABASE_URL=f"sqlite:///{tmp_path / 'bulkhook.db'}",
    )
    assert result.returncode == 3, result.stderr
    assert "BULKHOOK_RESULTS_DIR" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_fetch_is_given_up_after_three_not_founds_in_a_row_or_three_days() -> None:
    start = FetchState("0190f3a10102", "fetching", "csv", since=1000.0)

    def fail(state: FetchState, now: float, *, not_found: bool) -> FetchState:
        return after_failure(
            state, now, "HTTP 404", not_found=not_found, retry_after=None, first=1, most=8
        )

    once = fail(start, 1001, not_found=True)
    twice = fail(once, 1002, not_found=True)
    assert (once.status, twice.status, twice.not_found) == ("fetching", "fetching", 2)
    # Another failure in between starts the count again.
    reset = fail(twice, 1003, not_found=False)
    assert (reset.status, reset.not_found, reset.attempts) == ("fetching", 0, 3)
    ended = fail(
        fail(fail(reset, 1004, not_found=True), 1005, not_found=True), 1006, not_found=True
    )
    assert ended.status == "failed" and ended.due_at is None
    assert "given up" in (ended.detail or "")
    late = fail(start, 1000 + UPSTREAM_KEEPS, not_found=False)
    assert late.status == "failed" and "three days" in (late.detail or "")


def test_a_retry_doubles_up_to_the_most_and_waits_out_retry_after() -> None:
    start = FetchState("0190f3a10102", "fetching", "csv", since=0.0)
    waits = []
    state = start
    for _ in range(6):
        state = after_failure(
            state, 10.0, "HTTP 503", not_found=False, retry_after=None, first=1, most=8
        )
        assert state.due_at is not None
        waits.append(state.due_at - 10.0)
    assert [0.8 <= w / min(8, 2**n) <= 1.0 for n, w in enumerate(waits)] == [True] * 6
    asked = after_failure(start, 10.0, "HTTP 429", not_found=False, retry_after=30, first=1, most=8)
    assert asked.due_at == 40.0


@pytest.mark.parametrize("retry_after", [1e9, math.inf, math.nan])
def test_no_retry_after_puts_the_next_attempt_past_the_three_days(retry_after: float) -> None:
    start = FetchState("0190f3a10102", "fetching", "csv", since=1000.0)
    deadline = 1000.0 + UPSTREAM_KEEPS
    asked = after_failure(
        start, 2000.0, "HTTP 429", not_found=False, retry_after=retry_after, first=1, most=8
    )
    assert asked.status == "fetching" and asked.due_at is not None
    assert math.isfinite(asked.due_at) and 2000.0 < asked.due_at <= deadline
    if math.isnan(retry_after):
        assert asked.due_at <= 2001.0  # not a wait at all: the usual backoff
    else:
        assert asked.due_at == deadline
        # The attempt at the deadline is the last.
        last = after_failure(
            asked, deadline, "HTTP 429", not_found=False, retry_after=retry_after, first=1, most=8
        )
        assert last.status == "failed" and last.due_at is None
        assert "three days" in (last.detail or "")


def test_a_retry_after_of_decades_waits_no_longer_than_the_upstream_keeps_the_result(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, upstream_retry=RetryPolicy(attempts=1))
    uploaded(service, contacts_csv)
    upstream.sandbox.inject_fault("download", 429, retry_after=1e9)
    job_id = service.download(format="jsonl").json()["id"]
    eventually(
        lambda: "HTTP 429" in (service.http.get(f"/jobs/{job_id}").json()["result"]["detail"] or "")
    )
    [(due,)] = service.query(f"SELECT due_at FROM result_fetches WHERE job_id = '{job_id}'")
    assert due <= time.time() + UPSTREAM_KEEPS


def test_a_cancelled_download_has_no_result_and_no_copy_of_failed_records(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> None:
    upstream = start_sandbox(job_seconds=30)
    service = start_service(upstream)
    job = service.download().json()
    cancelled = service.http.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["result"]["status"] == "pending"
    final = service.wait_for(job["id"], {"CANCELLED"}, within=30)
    assert final["result"]["status"] == "failed" and "CANCELLED" in final["result"]["detail"]
    assert final["failed_records"] is None
    assert service.query("SELECT COUNT(*) FROM result_fetches") == [(0,)]
    assert_error(service.http.get(f"/jobs/{job['id']}/result"), 404, "result_not_stored")
