"""Bulk queries (downloads): the sandbox's ``/bulk/query`` and result files over real
HTTP, its CEQL subset, and the upstream client's two calls for them."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.callbacks.signatures import Verdict, verify
from service.sandbox.ceql import Query, QueryError, parse
from service.upstream.client import (
    Credentials,
    QueryRefused,
    RetryPolicy,
    UpstreamClient,
    UpstreamError,
    UpstreamUnavailable,
)

from .helpers import (
    SIGNATURE_KEY,
    Receiver,
    RunningSandbox,
    StartSandbox,
    free_port,
    write_csv,
)

AUTH = {"Authorization": "User u, Organization o, Element e"}
ACCEPT = {"csv": "text/csv", "json": "application/json", "jsonl": "application/jsonl"}
TERMINAL = {"COMPLETED", "ERROR", "ABORTED", "CANCELLED"}
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


# -- helpers --------------------------------------------------------------------------


def api(sandbox: RunningSandbox) -> httpx.Client:
    return httpx.Client(base_url=sandbox.api_url, headers=AUTH, timeout=30)


def upload(sandbox: RunningSandbox, file: Path, metadata: dict[str, Any] | None = None) -> str:
    """Upload ``file`` as contacts and wait until the job completed."""
    data = {"metaData": json.dumps(metadata)} if metadata else {}
    with api(sandbox) as http, file.open("rb") as handle:
        answer = http.post(
            "/hubs/marketing/bulk/contact", files={"file": (file.name, handle)}, data=data
        )
    assert answer.status_code == 200, answer.text
    job_id = str(answer.json()["id"])
    assert finish(sandbox, job_id)["status"] == "COMPLETED"
    return job_id


def start_query(
    sandbox: RunningSandbox,
    q: str,
    *,
    callback: str | None = None,
    metadata: dict[str, Any] | None = None,
    hub: str = "marketing",
) -> httpx.Response:
    headers = {"Elements-Async-Callback-Url": callback} if callback else {}
    files = {"metaData": (None, json.dumps(metadata))} if metadata is not None else None
    with api(sandbox) as http:
        return http.post(f"/hubs/{hub}/bulk/query", params={"q": q}, headers=headers, files=files)


def finish(sandbox: RunningSandbox, job_id: str, within: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    with api(sandbox) as http:
        while time.monotonic() < deadline:
            body: dict[str, Any] = http.get(f"/hubs/marketing/bulk/{job_id}/status").json()
            if body["status"] in TERMINAL:
                return body
            time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ended")


def query(sandbox: RunningSandbox, q: str, within: float = 10.0) -> str:
    """Start ``q`` and wait for it to complete; its job id."""
    answer = start_query(sandbox, q)
    assert answer.status_code == 200, answer.text
    job_id = str(answer.json()["id"])
    assert finish(sandbox, job_id, within)["status"] == "COMPLETED"
    return job_id


def results(sandbox: RunningSandbox, job_id: str, obj: str = "contact", fmt: str = "csv") -> Any:
    """The result file, read as records: a list of dicts in every format."""
    with api(sandbox) as http:
        answer = http.get(f"/hubs/marketing/bulk/{job_id}/{obj}", headers={"Accept": ACCEPT[fmt]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(ACCEPT[fmt])
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(answer.content.decode("utf-8"))))
    if fmt == "json":
        return answer.json()
    text = answer.content.decode("utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


# -- round trip and the CEQL subset on the wire ----------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_uploaded_contacts_export_back_identical(
    sandbox: RunningSandbox, contacts_csv: Path, fmt: str
) -> None:
    upload(sandbox, contacts_csv)
    job_id = query(sandbox, "select * from contact")
    expected = rows_of(contacts_csv)
    assert len(expected) == 10
    assert results(sandbox, job_id, fmt=fmt) == expected
    assert finish(sandbox, job_id)["recordsCount"] == 10


def test_a_where_clause_keeps_only_the_matching_records(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    upload(sandbox, contacts_csv)
    smiths = [row for row in rows_of(contacts_csv) if row["C_LastName"] == "Smith"]
    assert 1 < len(smiths) < 10
    job_id = query(sandbox, "SELECT * FROM contact WHERE C_LastName = 'Smith'")
    assert results(sandbox, job_id, fmt="json") == smiths
    assert finish(sandbox, job_id)["recordsCount"] == len(smiths)
    both = query(sandbox, "select * from contact where C_LastName = 'Smith' And C_Company = 'Acme'")
    assert results(sandbox, both, fmt="json") == [
        row for row in smiths if row["C_Company"] == "Acme"
    ]
    none = query(sandbox, "select * from contact where C_Company = 'Nobody''s'")
    assert results(sandbox, none, fmt="json") == []
    assert results(sandbox, none, fmt="csv") == []


def test_limit_and_field_selection(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    upload(sandbox, contacts_csv)
    expected = rows_of(contacts_csv)
    job_id = query(sandbox, "select C_EmailAddress, C_LastName from contact limit 3")
    picked = [
        {"C_EmailAddress": r["C_EmailAddress"], "C_LastName": r["C_LastName"]} for r in expected
    ]
    assert results(sandbox, job_id, fmt="csv") == picked[:3]
    assert results(sandbox, job_id, fmt="jsonl") == picked[:3]
    assert finish(sandbox, job_id)["recordsCount"] == 3
    assert results(sandbox, query(sandbox, "select * from contact limit 0"), fmt="json") == []


def test_failed_rows_are_not_exported_and_uploads_upsert_by_email(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    header = ["C_EmailAddress", "C_LastName"]
    upload(sandbox, write_csv(tmp_path / "a.csv", [header, ["a@x.io", "One"], ["bad", "Two"]]))
    upload(sandbox, write_csv(tmp_path / "b.csv", [header, ["a@x.io", "Uno"], ["c@x.io", "Three"]]))
    job_id = query(sandbox, "select * from contact")
    assert results(sandbox, job_id, fmt="json") == [
        {"C_EmailAddress": "a@x.io", "C_LastName": "Uno"},
        {"C_EmailAddress": "c@x.io", "C_LastName": "Three"},
    ]


def test_an_object_holds_at_most_max_records(start_sandbox: StartSandbox, tmp_path: Path) -> None:
    sandbox = start_sandbox(max_records=2)
    rows = [["C_EmailAddress"], ["a@x.io"], ["b@x.io"], ["c@x.io"]]
    upload(sandbox, write_csv(tmp_path / "three.csv", rows))
    upload(sandbox, write_csv(tmp_path / "again.csv", [["C_EmailAddress"], ["d@x.io"]]))
    job_id = query(sandbox, "select * from contact")
    assert results(sandbox, job_id, fmt="json") == [
        {"C_EmailAddress": "a@x.io"},
        {"C_EmailAddress": "b@x.io"},
    ]


@pytest.mark.parametrize(
    "q",
    [
        "",
        "select",
        "select * contact",
        "delete from contact",
        "select * from contact where C_LastName = 'open",
        "select * from contact where C_LastName 'x'",
        "select * from contact limit -1",
        "select * from contact limit 1.5",
        "select * from contact order by id",
        "select * from contact where a = 'x' or b = 'y'",
    ],
)
def test_a_query_that_does_not_parse_is_400(sandbox: RunningSandbox, q: str) -> None:
    answer = start_query(sandbox, q)
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("Error parsing query: ")
    assert sandbox.sandbox.jobs == {}


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_an_object_nothing_was_loaded_into_exports_an_empty_file(
    sandbox: RunningSandbox, fmt: str
) -> None:
    job_id = query(sandbox, "select * from account")
    with api(sandbox) as http:
        answer = http.get(f"/hubs/marketing/bulk/{job_id}/account", headers={"Accept": ACCEPT[fmt]})
    assert answer.status_code == 200
    assert answer.content == {"csv": b"", "json": b"[]", "jsonl": b""}[fmt]


@pytest.mark.parametrize(
    "raw", ["select%FF%FE", "select%00*", "%27%27%27", "select+*+from+contact+limit+" + "9" * 40]
)
def test_a_query_of_undecodable_or_odd_text_is_400_not_500(
    sandbox: RunningSandbox, raw: str
) -> None:
    with api(sandbox) as http:
        answer = http.post(f"/hubs/marketing/bulk/query?q={raw}")
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("Error parsing query: ")


def test_a_query_of_an_unknown_object_is_400(sandbox: RunningSandbox) -> None:
    answer = start_query(sandbox, "select * from widgets")
    assert answer.status_code == 400
    assert "widgets" in answer.json()["message"]


def test_a_query_job_calls_back_signed_with_its_payload(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    upload(sandbox, contacts_csv)
    payload = {"job": "bh-123", "n": [1, 2]}
    answer = start_query(
        sandbox,
        "select * from contact",
        callback=receiver.url,
        metadata={"callback-payload": payload, "fileName": "contacts.csv"},
    )
    assert answer.status_code == 200
    job_id = answer.json()["id"]
    assert isinstance(job_id, int)
    assert answer.json()["status"] == "CREATED"
    [delivery] = receiver.wait_for(1)
    signature = delivery.headers["elements-webhook-signature"]
    assert signature.startswith("sha256=")
    assert verify(signature, delivery.body, [SIGNATURE_KEY]).verdict == Verdict.VALID
    body = json.loads(delivery.body)
    assert body["id"] == str(job_id)
    assert body["status"] == "COMPLETED"
    assert body["recordsCount"] == 10
    assert body["jobDirection"] == "DOWNLOAD"
    assert body["callback-payload"] == payload


def test_results_are_404_until_completed_and_after_retention(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(job_seconds=1.0, retention=1.0)
    upload(sandbox, contacts_csv)
    job_id = start_query(sandbox, "select * from contact").json()["id"]
    with api(sandbox) as http:
        early = http.get(f"/hubs/marketing/bulk/{job_id}/contact")
        assert early.status_code == 404
        assert finish(sandbox, str(job_id))["status"] == "COMPLETED"
        assert http.get(f"/hubs/marketing/bulk/{job_id}/contact").status_code == 200
        assert http.get(f"/hubs/marketing/bulk/{job_id}/account").status_code == 404
        deadline = time.monotonic() + 15
        while http.get(f"/hubs/marketing/bulk/{job_id}/contact").status_code == 200:
            assert time.monotonic() < deadline, "the results were never forgotten"
            time.sleep(0.1)
        assert http.get(f"/hubs/marketing/bulk/{job_id}/contact").status_code == 404
        assert http.get(f"/hubs/marketing/bulk/{job_id}/status").status_code == 404


def test_an_upload_job_has_no_results_and_an_unsupported_accept_is_406(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    upload_id = upload(sandbox, contacts_csv)
    job_id = query(sandbox, "select * from contact")
    with api(sandbox) as http:
        assert http.get(f"/hubs/marketing/bulk/{upload_id}/contact").status_code == 404
        refused = http.get(f"/hubs/marketing/bulk/{job_id}/contact", headers={"Accept": "text/xml"})
        assert refused.status_code == 406
        assert "Accept" in refused.json()["message"]
        listed = http.get(
            "/hubs/marketing/bulk/jobs", params={"where": "job_direction='UPLOAD'"}
        ).json()
    assert [str(item["id"]) for item in listed] == [upload_id]


def test_faults_are_injected_by_operation_name(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    upload(sandbox, contacts_csv)
    sandbox.sandbox.inject_fault("query", 503, retry_after=2)
    refused = start_query(sandbox, "select * from contact")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    job_id = query(sandbox, "select * from contact")
    sandbox.sandbox.inject_fault("download", 429, retry_after=1)
    with api(sandbox) as http:
        assert http.get(f"/hubs/marketing/bulk/{job_id}/contact").status_code == 429
    assert len(results(sandbox, job_id)) == 10


def test_the_generated_object_streams_its_records(start_sandbox: StartSandbox) -> None:
    count = 30_000
    sandbox = start_sandbox(generated_records=count)
    with api(sandbox) as http:
        assert "generated" in http.get("/hubs/marketing/objects").json()
    job_id = query(sandbox, "select * from generated")
    assert finish(sandbox, job_id)["recordsCount"] == count
    seen, last, pieces = 0, None, 0
    with (
        api(sandbox) as http,
        http.stream(
            "GET", f"/hubs/marketing/bulk/{job_id}/generated", headers={"Accept": ACCEPT["jsonl"]}
        ) as answer,
    ):
        assert answer.status_code == 200
        for line in answer.iter_lines():
            last = json.loads(line)
            seen += 1
        pieces = answer.num_bytes_downloaded
    assert seen == count
    assert last is not None and last["id"] == str(count)
    assert pieces > 1024 * 1024
    # The same records every time, and a where clause over them.
    one = query(sandbox, "select id, C_EmailAddress from generated where id = 7")
    assert results(sandbox, one, "generated", "json") == [
        {"id": "7", "C_EmailAddress": "user7@example.com"}
    ]
    assert finish(sandbox, one)["recordsCount"] == 1


def test_generated_records_must_be_a_count(start_sandbox: StartSandbox) -> None:
    with pytest.raises(ValueError, match="generated_records"):
        start_sandbox(generated_records=-1)


# -- the CEQL parser ------------------------------------------------------------------


def test_the_parser_reads_the_whole_subset() -> None:
    assert parse("select * from contact") == Query("contact")
    assert parse("  SeLeCt a,b , c FROM x WHERE a = 'it''s' AND b = 12 and c = -1.5 LIMIT 5 ") == (
        Query("x", ("a", "b", "c"), (("a", "it's"), ("b", "12"), ("c", "-1.5")), 5)
    )


@given(st.text(max_size=200))
@example("select * from contact where a = '")
@example("select * from contact limit " + "9" * 5000)
@example("select * from x where a = " + "1" * 5000)
@settings(max_examples=400, deadline=None)
def test_the_parser_raises_only_its_own_error(text: str) -> None:
    try:
        parsed = parse(text)
    except QueryError as exc:
        assert str(exc)
    else:
        assert parsed.object


@given(st.text(max_size=50).filter(lambda value: "\x00" not in value))
@settings(max_examples=200, deadline=None)
def test_any_quoted_value_reads_back_exactly(value: str) -> None:
    quoted = "'" + value.replace("'", "''") + "'"
    assert parse(f"select * from contact where C_Company = {quoted}").where == (
        ("C_Company", value),
    )


# -- the upstream client --------------------------------------------------------------


def client_for(sandbox: RunningSandbox) -> UpstreamClient:
    credentials = Credentials("user-secret", "org-secret", "element-token")
    return UpstreamClient(sandbox.api_url, credentials, retry=FAST)


async def wait_completed(client: UpstreamClient, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await client.status("marketing", job_id)).status == "COMPLETED":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the query never completed")


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
async def test_the_client_starts_a_query_and_streams_its_result(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path, fmt: str
) -> None:
    upload(sandbox, contacts_csv)
    async with client_for(sandbox) as client:
        started = await client.start_query(
            "marketing",
            "select * from contact",
            callback_url=receiver.url,
            payload={"job": "bh-1"},
        )
        assert started.id.isdigit() and started.status == "CREATED"
        await wait_completed(client, started.id)
        body = bytearray()
        async with client.download("marketing", started.id, "contact", format=fmt) as result:
            assert result.content_type is not None
            assert result.content_type.startswith(ACCEPT[fmt])
            async for piece in result.aiter_bytes():
                body += piece
    with api(sandbox) as http:
        direct = http.get(
            f"/hubs/marketing/bulk/{started.id}/contact", headers={"Accept": ACCEPT[fmt]}
        )
    assert bytes(body) == direct.content
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["callback-payload"] == {"job": "bh-1"}


@pytest.mark.anyio
async def test_the_client_raises_a_typed_error_for_a_refused_query(
    sandbox: RunningSandbox,
) -> None:
    async with client_for(sandbox) as client:
        with pytest.raises(QueryRefused) as refused:
            await client.start_query("marketing", "select from", payload="x")
    assert refused.value.code == "upstream_query_refused"
    assert refused.value.http_status == 400
    assert refused.value.message.startswith("Error parsing query: ")
    assert sandbox.sandbox.calls["query"] == 1, "a refused query is not retried"


@pytest.mark.anyio
async def test_the_client_download_retries_429_then_streams(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    upload(sandbox, contacts_csv)
    job_id = query(sandbox, "select * from contact")
    sandbox.sandbox.inject_fault("download", 429, retry_after=0.05, times=2)
    async with (
        client_for(sandbox) as client,
        client.download("marketing", job_id, "contact", format="jsonl") as result,
    ):
        lines = b"".join([piece async for piece in result.aiter_bytes()]).splitlines()
    assert len(lines) == 10
    assert sandbox.sandbox.calls["download"] == 3


@pytest.mark.anyio
async def test_the_client_download_of_results_not_there_is_an_upstream_error(
    sandbox: RunningSandbox,
) -> None:
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as missing:
            async with client.download("marketing", "424242", "contact"):
                pass
        assert missing.value.status == 404
        assert "424242" in missing.value.message
        with pytest.raises(ValueError, match="format"):
            async with client.download("marketing", "1", "contact", format="xml"):
                pass


def test_the_sandbox_command_offers_generated_records(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "service", "sandbox", "--port", str(port)]
    command += ["--job-seconds", "0.1", "--generated-records", "25"]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "the sandbox exited"
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=url + "/elements/api-v2", headers=AUTH, timeout=10) as http:
            job_id = http.post(
                "/hubs/crm/bulk/query", params={"q": "select id from generated limit 30"}
            ).json()["id"]
            deadline = time.monotonic() + 10
            while http.get(f"/hubs/crm/bulk/{job_id}/status").json()["status"] != "COMPLETED":
                assert time.monotonic() < deadline, "the query never completed"
                time.sleep(0.02)
            answer = http.get(f"/hubs/crm/bulk/{job_id}/generated")
        assert answer.text.splitlines() == ["id", *(str(i) for i in range(1, 26))]
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.mark.anyio
async def test_a_download_cut_mid_file_raises_unavailable_after_the_bytes_sent(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox(generated_records=5_000)
    job_id = query(sandbox, "select * from generated")
    with api(sandbox) as http:
        whole = http.get(f"/hubs/marketing/bulk/{job_id}/generated").content
    assert len(whole) > 200_000
    sandbox.sandbox.inject_fault("download", 200, cut_after=100_000)
    received = bytearray()
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamUnavailable) as cut:
            async with client.download("marketing", job_id, "generated") as result:
                async for piece in result.aiter_bytes():
                    received += piece
        assert "mid-file" in str(cut.value)
        # Not retried by the client: the caller starts the file again, and gets it whole.
        again = bytearray()
        async with client.download("marketing", job_id, "generated") as result:
            async for piece in result.aiter_bytes():
                again += piece
    assert bytes(received) == whole[:100_000]
    assert bytes(again) == whole
    assert sandbox.sandbox.calls["download"] == 3


@pytest.mark.parametrize(
    "spec",
    [
        {"operation": "status", "status": 200, "cut_after": 10},
        {"operation": "download", "status": 500, "cut_after": 10},
        {"operation": "download", "status": 200, "cut_after": -1},
        {"operation": "download", "status": 200, "cut_after": "10"},
    ],
)
def test_a_cut_is_only_for_a_download_answered_200(
    sandbox: RunningSandbox, spec: dict[str, Any]
) -> None:
    answer = httpx.post(f"{sandbox.url}/_sandbox/faults", json=spec)
    assert answer.status_code == 400
    assert "cut_after" in answer.json()["message"]


@pytest.mark.anyio
async def test_the_client_download_holds_no_more_than_a_piece_of_the_file(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox(generated_records=150_000)
    job_id = query(sandbox, "select * from generated", within=60)
    size = 0
    async with client_for(sandbox) as client:
        tracemalloc.start()
        try:
            async with client.download("marketing", job_id, "generated", format="jsonl") as result:
                async for piece in result.aiter_bytes():
                    size += len(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size > 10 * 1024 * 1024
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte file"
