"""The Open Connectors client, against the sandbox over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.sandbox import API_PREFIX, Sandbox
from service.server.thread import ServerThread
from service.upstream.client import (
    Credentials,
    JobStatus,
    ListedJob,
    RetryPolicy,
    UpstreamClient,
    UpstreamError,
    UpstreamUnavailable,
    parse_retry_after,
)
from service.values import MAX_COUNT, MAX_MESSAGE, is_clean

from .helpers import (
    Receiver,
    RecordingUpstream,
    RunningSandbox,
    form_parts,
    free_port,
    write_csv,
)

pytestmark = pytest.mark.anyio

CREDENTIALS = Credentials("user-secret", "org-secret", "element-token")
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def client_for(sandbox: RunningSandbox, **kwargs: object) -> UpstreamClient:
    kwargs.setdefault("retry", FAST)
    return UpstreamClient(sandbox.api_url, CREDENTIALS, **kwargs)  # type: ignore[arg-type]


async def wait_terminal(client: UpstreamClient, job_id: str, within: float = 10.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = await client.status("marketing", job_id)
        if status.status in {"COMPLETED", "ERROR", "ABORTED", "CANCELLED"}:
            return status.status
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


async def test_discovers_objects(sandbox: RunningSandbox) -> None:
    async with client_for(sandbox) as client:
        assert await client.objects("marketing") == [
            "activities",
            "contact",
            "campaign",
            "list",
            "account",
        ]


async def test_sends_the_configured_authorization_parts(
    start_sandbox: Callable[..., RunningSandbox],
) -> None:
    sandbox = start_sandbox(
        authorization="User user-secret, Organization org-secret, Element element-token"
    )
    async with client_for(sandbox) as client:
        assert await client.objects("marketing")
    partial = UpstreamClient(sandbox.api_url, Credentials(user_secret="user-secret"), retry=FAST)
    async with partial:
        with pytest.raises(UpstreamError) as caught:
            await partial.objects("marketing")
    assert caught.value.status == 401
    assert "Invalid Organization or User secret" in caught.value.message
    assert caught.value.request_id
    assert sandbox.sandbox.calls["objects"] == 1  # a 401 is not retried


def test_credentials_never_show_in_repr() -> None:
    text = repr(CREDENTIALS)
    assert "user-secret" not in text and "org-secret" not in text
    expected = "User user-secret, Organization org-secret, Element element-token"
    assert CREDENTIALS.header() == expected
    assert Credentials(org_secret="o").header() == "Organization o"
    assert Credentials().header() is None


async def test_submit_then_follow_the_job_to_completed(
    sandbox: RunningSandbox, contacts_csv: Path, receiver: Receiver
) -> None:
    async with client_for(sandbox) as client:
        submission = await client.submit(
            "marketing",
            "contact",
            contacts_csv,
            callback_url=receiver.url,
            metadata={"callback-payload": "bulkhook-job-1"},
        )
        assert submission.id.isdigit()  # the sandbox answers a number: kept as a string
        assert isinstance(submission.raw["id"], int)
        assert submission.status == "CREATED"
        assert await wait_terminal(client, submission.id) == "COMPLETED"
        status = await client.status("marketing", int(submission.id))
    assert status.id == submission.id
    assert (status.records_count, status.records_failed_count) == (10, 0)
    job = sandbox.sandbox.jobs[int(submission.id)]
    assert job.path is None  # none given, none sent
    assert job.callback_url == receiver.url
    (delivery,) = receiver.wait_for(1)
    assert json.loads(delivery.body)["callback-payload"] == "bulkhook-job-1"


async def test_submit_sends_a_path_only_when_given(sandbox: RunningSandbox, tmp_path: Path) -> None:
    upload = write_csv(tmp_path / "people.csv", [["Email"], ["a@example.com"]])
    async with client_for(sandbox) as client:
        first = await client.submit("marketing", "contact", upload)
        second = await client.submit("marketing", "contact", upload, path="/imports/x.csv")
    assert sandbox.sandbox.jobs[int(first.id)].path is None
    assert sandbox.sandbox.jobs[int(second.id)].path == "/imports/x.csv"


@pytest.mark.parametrize("path", [None, "/imports/x.csv"])
async def test_the_upload_on_the_wire_sends_metadata_first_as_a_plain_field(
    tmp_path: Path, path: str | None
) -> None:
    upload = write_csv(tmp_path / "people.csv", [["Email"], ["a@example.com"]])
    metadata = {"identifierFieldName": "Email", "action": "upsert", "callback-payload": "job-1"}
    upstream = RecordingUpstream({"id": 1234, "status": "CREATED", "instanceId": 987654})
    try:
        async with UpstreamClient(upstream.url + API_PREFIX, CREDENTIALS, retry=FAST) as client:
            submission = await client.submit(
                "marketing",
                "contact",
                upload,
                path=path,
                callback_url="https://hooks.example/callbacks/jobs/job-1",
                metadata=metadata,
            )
    finally:
        upstream.close()
    [sent] = upstream.posts()
    target = urlsplit(sent.target)
    assert target.path == f"{API_PREFIX}/hubs/marketing/bulk/contact"
    assert parse_qs(target.query) == ({"path": [path]} if path else {})
    assert sent.headers["elements-async-callback-url"] == (
        "https://hooks.example/callbacks/jobs/job-1"
    )
    assert sent.headers["authorization"] == CREDENTIALS.header()
    assert int(sent.headers["content-length"]) == len(sent.body)
    meta, file = form_parts(sent)
    assert meta.header_lines == (b'Content-Disposition: form-data; name="metaData"',)
    assert json.loads(meta.data) == metadata
    assert file.header_lines == (
        b'Content-Disposition: form-data; name="file"; filename="people.csv"',
        b"Content-Type: text/csv",
    )
    assert file.data == upload.read_bytes()
    assert (submission.id, submission.instance_id) == ("1234", "987654")


@pytest.mark.parametrize(
    ("answered", "kept"),
    [
        (1234, "1234"),
        (10**17 + 1, "100000000000000001"),
        ("0042", "0042"),
        ("abc-123", "abc-123"),
    ],
)
async def test_a_submitted_job_id_is_kept_as_text_exactly_as_given(
    contacts_csv: Path, answered: object, kept: str
) -> None:
    upstream = RecordingUpstream({"id": answered, "status": "CREATED", "instanceId": "i-7"})
    try:
        async with UpstreamClient(upstream.url, CREDENTIALS, retry=FAST) as client:
            submission = await client.submit("marketing", "contact", contacts_csv)
    finally:
        upstream.close()
    assert (submission.id, submission.instance_id) == (kept, "i-7")


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "CREATED"},
        {"id": None},
        {"id": True},
        {"id": 1234.0},
        {"id": 1.5e3},
        {"id": -1},
        {"id": 10**18},
        {"id": 10**40},
        {"id": ""},
        {"id": "   "},
        {"id": " 12 "},
        {"id": "12\n"},
        {"id": "x" * 201},
        {"id": [1234]},
        {"id": {"value": 1234}},
        [1234],
        "1234",
    ],
)
async def test_a_submit_answer_without_a_usable_job_id_is_a_protocol_error(
    contacts_csv: Path, answer: object
) -> None:
    upstream = RecordingUpstream(answer)
    try:
        async with UpstreamClient(upstream.url, CREDENTIALS, retry=FAST) as client:
            with pytest.raises(UpstreamError) as caught:
                await client.submit("marketing", "contact", contacts_csv)
    finally:
        upstream.close()
    assert "accepted the upload but returned" in caught.value.message
    assert is_clean(caught.value.message) and len(caught.value.message) < 300
    assert caught.value.status is None and caught.value.request_sent  # a job may exist
    assert len(upstream.posts()) == 1  # never sent again


async def test_status_normalises_legacy_names(
    start_sandbox: Callable[..., RunningSandbox], contacts_csv: Path
) -> None:
    sandbox = start_sandbox(legacy_status_names=True, job_seconds=0.05)
    async with client_for(sandbox) as client:
        submission = await client.submit("marketing", "contact", contacts_csv)
        await asyncio.sleep(0.3)
        status = await client.status("marketing", submission.id)
    assert status.raw_status == "COMPLETE"
    assert status.status == "COMPLETED"


async def test_errors_follow_every_page(sandbox: RunningSandbox, tmp_path: Path) -> None:
    rows = [["C_EmailAddress", "C_FirstName"]]
    rows += [[f"user{i}@example.com" if i % 2 else "", f"n{i}"] for i in range(14)]
    upload = write_csv(tmp_path / "mixed.csv", rows)
    async with client_for(sandbox) as client:
        submission = await client.submit("marketing", "contact", upload)
        assert await wait_terminal(client, submission.id) == "COMPLETED"
        status = await client.status("marketing", submission.id)
        errors = await client.errors("marketing", submission.id, page_size=2)
    assert (status.records_count, status.records_failed_count) == (14, 7)
    assert len(errors) == 7
    assert sorted(e["record"]["C_FirstName"] for e in errors) == sorted(
        f"n{i}" for i in range(0, 14, 2)
    )
    assert sandbox.sandbox.calls["errors"] == 4  # 2 + 2 + 2 + 1


async def test_lists_upload_jobs_across_pages(sandbox: RunningSandbox, tmp_path: Path) -> None:
    rows = [["Email", "Name"], ["a@example.com", "a"], ["", "b"], ["b@example.com", "c"]]
    mixed = write_csv(tmp_path / "mixed.csv", rows)
    async with client_for(sandbox) as client:
        ids = [(await client.submit("marketing", "contact", mixed)).id for _ in range(3)]
        for job_id in ids:
            assert await wait_terminal(client, job_id) == "COMPLETED"
        listed = await client.jobs("marketing", page_size=2)
    assert sorted(job.id for job in listed) == sorted(ids)
    assert {
        (job.object_name, job.direction, job.status, job.records_count, job.records_failed_count)
        for job in listed
    } == {("contact", "UPLOAD", "COMPLETED", 3, 1)}
    assert sandbox.sandbox.calls["jobs"] == 2


async def test_the_job_list_is_read_by_its_own_names_whichever_status_field_it_has(
    sandbox: RunningSandbox,
) -> None:
    sandbox.sandbox.inject_fault(
        "jobs",
        200,
        body=[
            {"id": 77, "objectName": "contact", "jobDirection": "UPLOAD", "status": "COMPLETE"},
            {"id": "78", "jobState": "RUNNING", "recordCount": 5, "errorCount": 2},
            {"id": 79, "jobState": "CANCELED", "status": "RUNNING", "recordCount": "x"},
            {"id": 80.0, "jobState": "COMPLETED"},
            {"id": True, "jobState": "COMPLETED"},
            {"jobState": "COMPLETED"},
            "not a job",
        ],
    )
    async with client_for(sandbox) as client:
        listed = await client.jobs("marketing")
    assert [(job.id, job.status, job.raw_status) for job in listed] == [
        ("77", "COMPLETED", "COMPLETE"),
        ("78", "RUNNING", "RUNNING"),
        ("79", "CANCELLED", "CANCELED"),  # jobState wins when both are there
    ]
    assert (listed[0].object_name, listed[0].direction) == ("contact", "UPLOAD")
    assert (listed[1].records_count, listed[1].records_failed_count) == (5, 2)
    assert listed[2].records_count is None


@pytest.mark.parametrize("after_processing", [True, False])
async def test_the_job_list_tells_whether_a_failed_submit_made_a_job(
    sandbox: RunningSandbox, contacts_csv: Path, after_processing: bool
) -> None:
    """A 500 after the body was sent leaves the outcome open; the list settles it."""
    sandbox.sandbox.inject_fault("submit", 500, after_processing=after_processing)
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.submit("marketing", "contact", contacts_csv)
        assert caught.value.request_sent
        listed = await client.jobs("marketing")
    made = [str(job.id) for job in sandbox.sandbox.jobs.values()]
    assert [job.id for job in listed] == made
    assert len(made) == (1 if after_processing else 0)
    assert all((job.object_name, job.direction) == ("contact", "UPLOAD") for job in listed)


async def test_cancel(start_sandbox: Callable[..., RunningSandbox], contacts_csv: Path) -> None:
    sandbox = start_sandbox(job_seconds=5)
    async with client_for(sandbox) as client:
        submission = await client.submit("marketing", "contact", contacts_csv)
        cancelled = await client.cancel("marketing", submission.id)
        assert cancelled is not None and cancelled.status == "CANCELLATION_PENDING"
        assert await wait_terminal(client, submission.id) == "CANCELLED"
        with pytest.raises(UpstreamError) as caught:
            await client.cancel("marketing", submission.id)
    assert caught.value.status == 400


async def test_an_unknown_job_is_a_404_without_retries(sandbox: RunningSandbox) -> None:
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.status("marketing", "999999")
    assert caught.value.status == 404
    assert "No bulk job" in caught.value.message
    assert sandbox.sandbox.calls["status"] == 1


async def test_a_429_with_retry_after_is_honoured(sandbox: RunningSandbox) -> None:
    sandbox.sandbox.inject_fault("objects", 429, retry_after=1)
    async with client_for(sandbox) as client:
        started = time.monotonic()
        assert await client.objects("marketing")
        waited = time.monotonic() - started
    assert waited >= 1.0
    assert sandbox.sandbox.calls["objects"] == 2


async def test_a_retry_after_too_long_is_raised_not_slept(sandbox: RunningSandbox) -> None:
    sandbox.sandbox.inject_fault("status", 429, retry_after=120)
    async with client_for(sandbox) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await client.status("marketing", "1")
    assert time.monotonic() - started < 5
    assert caught.value.status == 429
    assert caught.value.retry_after == 120


async def test_a_500_on_a_get_is_retried(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    async with client_for(sandbox) as client:
        submission = await client.submit("marketing", "contact", contacts_csv)
        sandbox.sandbox.inject_fault("status", 500, times=2)
        status = await client.status("marketing", submission.id)
        sandbox.sandbox.inject_fault("errors", 502)
        assert await client.errors("marketing", submission.id) == []
    assert status.id == submission.id
    assert sandbox.sandbox.calls["status"] == 3
    assert sandbox.sandbox.calls["errors"] == 2


async def test_gets_give_up_after_the_bounded_attempts(sandbox: RunningSandbox) -> None:
    sandbox.sandbox.inject_fault("objects", 503, times=10)
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.objects("marketing")
    assert caught.value.status == 503
    assert sandbox.sandbox.calls["objects"] == FAST.attempts


async def test_a_submit_that_failed_after_the_body_was_sent_is_not_retried(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    sandbox.sandbox.inject_fault("submit", 500, after_processing=True)
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.submit("marketing", "contact", contacts_csv)
    assert caught.value.status == 500
    assert caught.value.request_sent
    assert sandbox.sandbox.calls["submit"] == 1
    assert len(sandbox.sandbox.jobs) == 1  # the upstream made the job; we made only one


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_submit_5xx_without_retry_after_is_not_retried(
    sandbox: RunningSandbox, contacts_csv: Path, status: int
) -> None:
    sandbox.sandbox.inject_fault("submit", status)
    async with client_for(sandbox) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.submit("marketing", "contact", contacts_csv)
    assert caught.value.status == status
    assert sandbox.sandbox.calls["submit"] == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_a_submit_refused_with_retry_after_is_retried_once_it_may(
    sandbox: RunningSandbox, contacts_csv: Path, status: int
) -> None:
    sandbox.sandbox.inject_fault("submit", status, retry_after=0.2)
    async with client_for(sandbox) as client:
        started = time.monotonic()
        submission = await client.submit("marketing", "contact", contacts_csv)
    assert time.monotonic() - started >= 0.2
    assert sandbox.sandbox.calls["submit"] == 2
    assert list(sandbox.sandbox.jobs) == [int(submission.id)]


async def test_a_submit_is_retried_while_the_connection_is_refused(
    contacts_csv: Path,
) -> None:
    port = free_port()
    sandbox = Sandbox(job_seconds=0.1)
    server = ServerThread(sandbox.app, port=port)
    loop = asyncio.get_running_loop()
    starting = loop.call_later(0.3, server.start)
    client = UpstreamClient(
        f"http://127.0.0.1:{port}/elements/api-v2",
        CREDENTIALS,
        retry=RetryPolicy(attempts=20, base_delay=0.1, max_delay=0.2),
    )
    try:
        async with client:
            submission = await client.submit("marketing", "contact", contacts_csv)
        assert list(sandbox.jobs) == [int(submission.id)]
    finally:
        starting.cancel()
        server.stop()


async def test_an_unreachable_upstream_is_reported_as_never_sent(contacts_csv: Path) -> None:
    client = UpstreamClient(f"http://127.0.0.1:{free_port()}", CREDENTIALS, retry=FAST)
    async with client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.submit("marketing", "contact", contacts_csv)
        with pytest.raises(UpstreamUnavailable):
            await client.objects("marketing")
    assert caught.value.status is None
    assert not caught.value.request_sent
    assert "cannot connect" in str(caught.value)


async def test_submit_streams_the_file_from_disk(sandbox: RunningSandbox, tmp_path: Path) -> None:
    upload = tmp_path / "big.csv"
    rows = 400_000
    with upload.open("w") as out:
        out.write("Email,Name\n")
        for i in range(rows):
            out.write(f"user{i}@example.com,Name number {i}\n")
    size = upload.stat().st_size
    assert size > 10 * 1024 * 1024
    seen: list[int] = []
    async with client_for(sandbox) as client:
        tracemalloc.start()
        try:
            submission = await client.submit("marketing", "contact", upload, progress=seen.append)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await wait_terminal(client, submission.id, within=60) == "COMPLETED"
        status = await client.status("marketing", submission.id)
    assert sum(seen) == size
    assert max(seen) <= 1 << 20
    assert peak < size / 2, f"peak {peak} bytes for a {size}-byte file"
    assert status.records_count == rows


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 <= later <= 31


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**12, max_value=10**30)
    | st.floats()
    | st.text(alphabet=st.sampled_from("0123456789²\x00\ud800 .-eRUNIGCOMPLTD"), max_size=20)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "status": json_values,
            "recordsCount": json_values,
            "recordsFailedCount": json_values,
            "error": json_values,
        },
    )
)
@example({"id": "1", "status": "RUNNING", "recordsCount": 10**20})
@example({"status": "COMPLETED", "recordsCount": "²", "recordsFailedCount": "9" * 5000})
@example({"id": "a\x00", "status": "RUN\ud800NING", "recordsCount": 1e20})
@example({"id": True, "status": 7, "recordsCount": -1, "recordsFailedCount": float("nan")})
@example({"status": "ABORTED", "error": "x\ud800\x00" * 1000})
@example({"status": "ABORTED", "error": {"message": ["not text"]}})
def test_any_status_body_is_read_into_storable_values(body: dict[str, Any]) -> None:
    status = JobStatus.from_body(body, "fallback")
    for text in (status.id, status.raw_status, status.note, status.error):
        assert text is None or is_clean(text)
    assert status.error is None or 0 < len(status.error) <= MAX_MESSAGE
    for count in (status.records_count, status.records_failed_count):
        assert count is None or (isinstance(count, int) and 0 <= count <= MAX_COUNT)
    for name, count in (
        ("recordsCount", status.records_count),
        ("recordsFailedCount", status.records_failed_count),
    ):
        assert (name in status.note) == (body.get(name) is not None and count is None)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "jobState": json_values,
            "status": json_values,
            "recordCount": json_values,
            "errorCount": json_values,
            "objectName": json_values,
        },
    )
)
@example({"id": 10**20, "jobState": "COMPLETED"})
@example({"id": "7\x00", "status": "RUN\ud800NING", "recordCount": 1e20})
@example({"id": 7, "jobState": 7, "status": "RUNNING", "errorCount": "9" * 5000})
def test_any_job_list_item_is_read_into_storable_values(item: dict[str, Any]) -> None:
    listed = ListedJob.from_item(item)
    if listed is None:
        return
    assert isinstance(item.get("id"), int | str) and not isinstance(item.get("id"), bool)
    for text in (listed.id, listed.raw_status, listed.object_name, listed.direction):
        assert text is None or is_clean(text)
    for count in (listed.records_count, listed.records_failed_count):
        assert count is None or (isinstance(count, int) and 0 <= count <= MAX_COUNT)
