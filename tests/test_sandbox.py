"""The sandbox upstream: the bulk API, signed callbacks, every fault.

Every test talks to a real sandbox on a loopback uvicorn server over HTTP; callbacks
land on a real receiver that records the bytes exactly as they arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.callbacks.signatures import Verdict, verify
from service.sandbox import SandboxOptions
from service.sandbox.options import WHOLE_FILE_ERROR

from .helpers import (
    SIGNATURE_KEY,
    Receiver,
    RunningSandbox,
    StartSandbox,
    eventually,
    free_port,
    wait_healthy,
    write_csv,
)

AUTH_VALUE = "User u, Organization o, Element e"
AUTH = {"Authorization": AUTH_VALUE}
JSON = "application/json"
TERMINAL = {"COMPLETED", "COMPLETE", "ERROR", "ABORTED", "CANCELLED", "CANCELED"}


# -- helpers --------------------------------------------------------------------------


def api(sandbox: RunningSandbox, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=sandbox.api_url, headers=headers or AUTH, timeout=10)


def submit(
    sandbox: RunningSandbox,
    file: Path,
    *,
    callback: str | None = None,
    metadata: dict[str, Any] | None = None,
    hub: str = "marketing",
    obj: str = "contact",
) -> httpx.Response:
    """POST {api}/hubs/{hub}/bulk/{obj}?path=/contacts.csv, multipart ``file`` (+ ``metaData``)."""
    headers = {"Elements-Async-Callback-Url": callback} if callback else {}
    data = {"metaData": json.dumps(metadata)} if metadata is not None else {}
    with api(sandbox) as http, file.open("rb") as handle:
        return http.post(
            f"/hubs/{hub}/bulk/{obj}",
            params={"path": "/contacts.csv"},
            files={"file": (file.name, handle, "text/csv")},
            data=data,
            headers=headers,
        )


def status(sandbox: RunningSandbox, job_id: int | str, hub: str = "marketing") -> dict[str, Any]:
    with api(sandbox) as http:
        response = http.get(f"/hubs/{hub}/bulk/{job_id}/status")
    assert response.status_code == 200, response.text
    return response.json()


def follow(sandbox: RunningSandbox, job_id: int | str, within: float = 5.0) -> list[str]:
    """Poll the status until it is terminal; return each distinct status seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + within
    with api(sandbox) as http:
        while time.monotonic() < deadline:
            current = http.get(f"/hubs/marketing/bulk/{job_id}/status").json()["status"]
            if not seen or seen[-1] != current:
                seen.append(current)
            if current in TERMINAL:
                return seen
            time.sleep(0.005)
    raise AssertionError(f"job {job_id} never ended; saw {seen}")


def wait_status(
    sandbox: RunningSandbox, job_id: int | str, wanted: str, within: float = 5
) -> float:
    """Poll until the job shows ``wanted``; return the monotonic time it was first seen."""
    deadline = time.monotonic() + within
    with api(sandbox) as http:
        while time.monotonic() < deadline:
            if http.get(f"/hubs/marketing/bulk/{job_id}/status").json()["status"] == wanted:
                return time.monotonic()
            time.sleep(0.005)
    raise AssertionError(f"job {job_id} never became {wanted}")


def wait_until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def http_stats(sandbox: RunningSandbox) -> dict[str, Any]:
    response = httpx.get(f"{sandbox.url}/_sandbox/stats", timeout=10)
    assert response.status_code == 200
    return response.json()


def pages(http: httpx.Client, path: str, **params: Any) -> list[httpx.Response]:
    """Every page of a paged list, following ``Elements-Next-Page-Token`` (bounded)."""
    answered: list[httpx.Response] = []
    token: str | None = None
    for _ in range(50):
        query = {**params, **({"nextPage": token} if token else {})}
        page = http.get(path, params=query)
        assert page.status_code == 200, page.text
        answered.append(page)
        token = page.headers.get("elements-next-page-token")
        if token is None:
            return answered
    raise AssertionError("the pages never ended")


# -- the API surface ------------------------------------------------------------------


def test_root_answers_200_for_scripts_that_wait(sandbox: RunningSandbox) -> None:
    assert httpx.get(sandbox.url + "/").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer x"},
        {"Authorization": "User"},
        {"Authorization": "User u Organization o"},
        {"Authorization": "Root r, Organization o"},
        {"Authorization": "User u, , Element e"},
    ],
    ids=["missing", "empty", "bearer", "no-value", "no-comma", "unknown-part", "empty-part"],
)
def test_missing_or_malformed_authorization_is_401(
    sandbox: RunningSandbox, headers: dict[str, str]
) -> None:
    for method, path in [
        ("GET", "/hubs/marketing/objects"),
        ("GET", "/hubs/marketing/bulk/1/status"),
    ]:
        response = httpx.request(method, sandbox.api_url + path, headers=headers)
        assert response.status_code == 401
        assert response.json()["message"]
    assert http_stats(sandbox)["calls"] == {}, "refused calls never reach an operation"


def test_a_well_formed_authorization_is_accepted(sandbox: RunningSandbox) -> None:
    for value in (AUTH_VALUE, "User u", "Organization o, Element e", "Element e"):
        url = f"{sandbox.api_url}/hubs/marketing/objects"
        assert httpx.get(url, headers={"Authorization": value}).status_code == 200


def test_with_the_authorization_option_only_that_exact_value_is_accepted(
    start_sandbox: StartSandbox,
) -> None:
    exact = "User a, Organization b, Element c"
    sandbox = start_sandbox(authorization=exact)
    url = f"{sandbox.api_url}/hubs/marketing/objects"
    assert httpx.get(url, headers={"Authorization": exact}).status_code == 200
    for other in (AUTH_VALUE, "User a, Organization b", exact + "x", "User a, Element c"):
        refused = httpx.get(url, headers={"Authorization": other})
        assert refused.status_code == 401
        assert refused.json()["message"]
    assert httpx.get(url).status_code == 401


def test_objects_discovery_lists_the_hub_objects(sandbox: RunningSandbox) -> None:
    with api(sandbox) as http:
        marketing = http.get("/hubs/marketing/objects")
        crm = http.get("/hubs/crm/objects")
    assert marketing.status_code == 200
    assert marketing.json() == ["activities", "contact", "campaign", "list", "account"]
    assert crm.json() == ["accounts", "contacts", "leads", "opportunities"]


def test_an_unknown_hub_is_404(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    with api(sandbox) as http:
        response = http.get("/hubs/nowhere/objects")
    assert response.status_code == 404
    assert "nowhere" in response.json()["message"]
    assert submit(sandbox, contacts_csv, hub="nowhere").status_code == 404


def test_submit_needs_a_known_object_a_file_and_object_metadata(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    assert submit(sandbox, contacts_csv, obj="widgets").status_code == 404
    with api(sandbox) as http:
        base = "/hubs/marketing/bulk/contact"
        no_file = http.post(base, params={"path": "/x.csv"}, files={"other": b"a,b\n"})
        not_multipart = http.post(base, params={"path": "/x.csv"}, json={"file": "a,b"})
        bad_meta = [
            http.post(base, files={"file": b"a\n"}, data={"metaData": raw})
            for raw in ("{not json", "[1, 2]", '"text"', "[" * 10_000)
        ]
        bad_meta_file = [
            http.post(base, files={"file": b"a\n", "metaData": ("m.json", raw, JSON)})
            for raw in (b"\xff{}", b"{}" + b" " * (64 << 10), b"[]")
        ]
    assert (no_file.status_code, not_multipart.status_code) == (400, 415)
    assert [r.status_code for r in [*bad_meta, *bad_meta_file]] == [400] * 7
    assert all(r.json()["message"] for r in [no_file, not_multipart, *bad_meta, *bad_meta_file])
    assert http_stats(sandbox)["jobs"] == 0, "a refused submission creates no job"


def _form(boundary: str, parts: list[tuple[str, str | None, str | None, bytes]]) -> bytes:
    """A multipart body of (name, filename, content type, data) parts, in that order."""
    body = b""
    for name, filename, content_type, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"' if filename else ""
        head += f"\r\nContent-Type: {content_type}" if content_type else ""
        body += (head + "\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    "sent_as",
    ["a plain field before the file", "a plain field after the file", "a file part of its own"],
)
def test_submit_reads_metadata_however_a_client_sends_it_and_needs_no_path(
    sandbox: RunningSandbox, contacts_csv: Path, sent_as: str
) -> None:
    metadata = {"action": "upsert", "identifierFieldName": "C_EmailAddress", "callback-payload": 7}
    text = json.dumps(metadata).encode()
    meta = (
        ("metaData", "metaData.json", JSON, text)
        if "file" in sent_as
        else ("metaData", None, None, text)
    )
    file = ("file", "contacts.csv", "text/csv", contacts_csv.read_bytes())
    parts = [file, meta] if "after" in sent_as else [meta, file]
    with api(sandbox) as http:
        created = http.post(
            "/hubs/marketing/bulk/contact",
            content=_form("sandbox-test", parts),
            headers={"Content-Type": "multipart/form-data; boundary=sandbox-test"},
        )
    assert created.status_code == 200, created.text
    job = sandbox.sandbox.jobs[created.json()["id"]]
    assert (job.metadata, job.path) == (metadata, None)
    assert follow(sandbox, job.id)[-1] == "COMPLETED"
    assert status(sandbox, job.id)["recordsCount"] == 10


def test_an_unknown_job_is_404(sandbox: RunningSandbox) -> None:
    with api(sandbox) as http:
        for path in ("/hubs/marketing/bulk/1/status", "/hubs/marketing/bulk/abc/errors"):
            response = http.get(path)
            assert response.status_code == 404
            assert response.json()["message"]
        assert http.put("/hubs/marketing/bulk/1/cancel").status_code == 404


# -- a job's life ---------------------------------------------------------------------


def test_the_sample_contacts_run_asynchronously_to_completed(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(job_seconds=2)
    response = submit(sandbox, contacts_csv)
    assert response.status_code == 200
    created = response.json()
    assert isinstance(created["id"], int)
    assert created["status"] == "CREATED"
    assert created["instanceId"] == 31001  # the first hub's connector instance
    # The submit answer says CREATED; the first look may come after that stage ended.
    seen = follow(sandbox, created["id"])
    assert [s for s in seen if s != "CREATED"] == ["STARTED", "RUNNING", "COMPLETED"]
    final = status(sandbox, created["id"])
    assert final["id"] == str(created["id"])
    assert (final["recordsCount"], final["recordsFailedCount"]) == (10, 0)
    assert (final["objectName"], final["jobDirection"]) == ("contact", "UPLOAD")
    assert sandbox.sandbox.jobs[created["id"]].path == "/contacts.csv"  # as given


def test_a_completed_job_calls_back_signed_with_the_instance_key(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    [delivery] = receiver.wait_for(1)
    assert delivery.path == "/callbacks"
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["elements-webhook-id"]
    header = delivery.headers["elements-webhook-signature"]
    assert header.startswith("sha256=")
    result = verify(header, delivery.body, [SIGNATURE_KEY])
    assert result.ok, result.reason
    assert result.algorithm == "sha256"
    assert not verify(header, delivery.body + b" ", [SIGNATURE_KEY]).ok
    body = json.loads(delivery.body)
    assert body["id"] == str(job_id)
    assert body["status"] == "COMPLETED"
    assert (body["recordsCount"], body["recordsFailedCount"]) == (10, 0)
    assert "callback-payload" not in body
    assert status(sandbox, job_id)["status"] == "COMPLETED"


def test_metadata_callback_payload_is_echoed_in_the_callback(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    metadata = {"callback-payload": "job-42", "identifierFieldName": "C_EmailAddress"}
    submit(sandbox, contacts_csv, callback=receiver.url, metadata=metadata)
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["callback-payload"] == "job-42"
    assert verify(delivery.headers["elements-webhook-signature"], delivery.body, [SIGNATURE_KEY]).ok


def test_rows_with_an_empty_or_invalid_email_fail_and_page_through_errors(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    rows = [["Name", "C_EmailAddress", "Company"]]
    bad = {}
    for i in range(9):
        email = [f"ok{i}@x.io", "", "not-an-email", "a@b", "two@@x.io"][i % 5]
        rows.append([f"n{i}", email, "Acme"])
        if i % 5:
            bad[f"n{i}"] = "is empty" if email == "" else "is not a valid email address"
    upload = write_csv(tmp_path / "rows.csv", rows)
    job_id = submit(sandbox, upload).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    final = status(sandbox, job_id)
    assert (final["recordsCount"], final["recordsFailedCount"]) == (9, len(bad)) == (9, 7)
    with api(sandbox) as http:
        answered = pages(http, f"/hubs/marketing/bulk/{job_id}/errors", pageSize=2)
    assert [len(page.json()) for page in answered] == [2, 2, 2, 1]
    for page in answered:
        assert page.headers["elements-returned-count"] == str(len(page.json()))
    assert all("elements-next-page-token" in page.headers for page in answered[:-1])
    assert "elements-next-page-token" not in answered[-1].headers
    errors = [error for page in answered for error in page.json()]
    names = [error["record"]["Name"] for error in errors]
    assert sorted(names) == sorted(bad), "every failed row exactly once"
    for error in errors:
        problem = bad[error["record"]["Name"]]
        assert error["errorMessage"] == f"C_EmailAddress {problem}"
    assert len({error["lineNumber"] for error in errors}) == 7


def test_any_email_like_column_is_checked(sandbox: RunningSandbox, tmp_path: Path) -> None:
    upload = write_csv(
        tmp_path / "rows.csv",
        [["Name", "WorkEMAIL"], ["a", "a@x.io"], ["b", " "], ["c", "c@x.io"]],
    )
    job_id = submit(sandbox, upload).json()["id"]
    follow(sandbox, job_id)
    final = status(sandbox, job_id)
    assert (final["recordsCount"], final["recordsFailedCount"]) == (3, 1)
    with api(sandbox) as http:
        [error] = http.get(f"/hubs/marketing/bulk/{job_id}/errors").json()
    assert error["record"]["Name"] == "b"


def test_a_file_with_neither_an_email_nor_an_id_column_fails_whole(
    start_sandbox: StartSandbox, receiver: Receiver, tmp_path: Path
) -> None:
    # STARTED shows for a quarter of the job's time: long enough to be seen on a busy
    # machine, whose poll can come a few hundred milliseconds late.
    sandbox = start_sandbox(job_seconds=2.0)
    upload = write_csv(tmp_path / "people.csv", [["First", "Last"], ["Ada", "Lovelace"]])
    job_id = submit(sandbox, upload, callback=receiver.url).json()["id"]
    # Refused once started: it never runs.
    assert follow(sandbox, job_id)[-2:] == ["STARTED", "ABORTED"]
    final = status(sandbox, job_id)
    assert final["error"] == WHOLE_FILE_ERROR == "All prospects require either 'email' or 'id'"
    assert "recordsCount" not in final and "recordsFailedCount" not in final
    [delivery] = receiver.wait_for(1)
    assert verify(delivery.headers["elements-webhook-signature"], delivery.body, [SIGNATURE_KEY]).ok
    called_back = json.loads(delivery.body)
    assert (called_back["status"], called_back["error"]) == ("ABORTED", WHOLE_FILE_ERROR)


def test_an_id_column_is_enough_to_load_a_file(sandbox: RunningSandbox, tmp_path: Path) -> None:
    upload = write_csv(tmp_path / "ids.csv", [["Id", "First"], ["17", "Ada"], ["18", "Grace"]])
    job_id = submit(sandbox, upload).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    final = status(sandbox, job_id)
    assert (final["recordsCount"], final["recordsFailedCount"]) == (2, 0)
    assert "error" not in final


def test_fail_whole_aborts_a_good_file_with_the_message_given(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(fail_whole=1.0, fail_whole_message="Daily API limit reached")
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    seen = follow(sandbox, job_id)
    assert seen[-1] == "ABORTED" and "RUNNING" not in seen
    assert status(sandbox, job_id)["error"] == "Daily API limit reached"
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["error"] == "Daily API limit reached"
    with api(sandbox) as http:
        [listed] = http.get("/hubs/marketing/bulk/jobs").json()
    assert (listed["jobState"], listed["error"]) == ("ABORTED", "Daily API limit reached")


def test_fail_whole_fails_its_share_of_jobs_repeatably_with_a_seed(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    outcomes = []
    for _ in range(2):
        sandbox = start_sandbox(fail_whole=0.5, seed=11, job_seconds=0.05)
        ids = [submit(sandbox, contacts_csv).json()["id"] for _ in range(12)]
        outcomes.append([follow(sandbox, job_id)[-1] for job_id in ids])
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {"ABORTED", "COMPLETED"}


@pytest.mark.parametrize(
    "options",
    [
        {"fail_whole": 1.5},
        {"fail_whole": -0.1},
        {"fail_whole_message": ""},
        {"fail_whole_message": "a\ud800b"},
    ],
)
def test_bad_fail_whole_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="fail_whole"):
        SandboxOptions(**options)


def test_errors_paging_refuses_a_bad_token_or_page_size(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    job_id = submit(sandbox, contacts_csv).json()["id"]
    path = f"/hubs/marketing/bulk/{job_id}/errors"
    with api(sandbox) as http:
        bad_tokens = [http.get(path, params={"nextPage": t}) for t in ("@@", "bm9wZTox", "xyz")]
        bad_sizes = [http.get(path, params={"pageSize": s}) for s in ("0", "-1", "x", "501")]
        fine = http.get(path, params={"pageSize": 5})
    assert [r.status_code for r in bad_tokens] == [400, 400, 400]
    assert [r.status_code for r in bad_sizes] == [400, 400, 400, 400]
    assert all(r.json()["message"] for r in bad_tokens + bad_sizes)
    assert (fine.status_code, fine.json(), fine.headers["elements-returned-count"]) == (
        200,
        [],
        "0",
    )


@pytest.mark.parametrize(
    "content",
    [b"Email,Name\n\xff\xfe@x.io,x\n", b"C_EmailAddress\na@x.io\n\xe9t\xe9@x.io\n", b"", b"\r\n\n"],
    ids=["latin1-in-first-row", "latin1-later", "empty", "blank-lines"],
)
def test_a_non_utf8_file_or_one_without_a_header_row_ends_in_error(
    sandbox: RunningSandbox, receiver: Receiver, tmp_path: Path, content: bytes
) -> None:
    upload = tmp_path / "x.csv"
    upload.write_bytes(content)
    job_id = submit(sandbox, upload, callback=receiver.url).json()["id"]
    assert follow(sandbox, job_id)[-1] == "ERROR"
    said = status(sandbox, job_id)
    assert said["error"]
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["status"] == "ERROR"
    assert json.loads(delivery.body)["error"] == said["error"]


def test_a_utf8_bom_is_not_part_of_the_header(sandbox: RunningSandbox, tmp_path: Path) -> None:
    upload = tmp_path / "bom.csv"
    upload.write_bytes("\ufeffName,Email\r\né,a@x.io\r\nb,\r\n".encode())
    job_id = submit(sandbox, upload).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    assert status(sandbox, job_id)["recordsFailedCount"] == 1
    with api(sandbox) as http:
        [error] = http.get(f"/hubs/marketing/bulk/{job_id}/errors").json()
    assert error["record"] == {"Name": "b", "Email": ""}


# -- cancel and the jobs list ---------------------------------------------------------


def test_cancelling_a_running_job(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(job_seconds=2)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    started = time.monotonic()
    with api(sandbox) as http:
        response = http.put(f"/hubs/marketing/bulk/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLATION_PENDING"
    seen = follow(sandbox, job_id)
    assert seen[-1] == "CANCELLED"
    assert set(seen) <= {"CANCELLATION_PENDING", "CANCELLED"}
    assert time.monotonic() - started < 1.0, "cancelled well before the job would end"
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["status"] == "CANCELLED"
    assert verify(delivery.headers["elements-webhook-signature"], delivery.body, [SIGNATURE_KEY]).ok
    with api(sandbox) as http:
        again = http.put(f"/hubs/marketing/bulk/{job_id}/cancel")
    assert again.status_code == 400
    assert again.json()["message"]


def test_cancelling_a_finished_job_is_400(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    job_id = submit(sandbox, contacts_csv).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    with api(sandbox) as http:
        response = http.put(f"/hubs/marketing/bulk/{job_id}/cancel")
    assert response.status_code == 400
    assert "COMPLETED" in response.json()["message"]
    assert status(sandbox, job_id)["status"] == "COMPLETED"


def test_the_jobs_list_pages_one_job_at_a_time(
    sandbox: RunningSandbox, contacts_csv: Path, tmp_path: Path
) -> None:
    mixed = write_csv(
        tmp_path / "mixed.csv", [["Email", "Name"], ["", "a"], ["b@example.com", "b"]]
    )
    ids = [submit(sandbox, file).json()["id"] for file in (contacts_csv, mixed, contacts_csv)]
    other = submit(sandbox, contacts_csv, hub="crm", obj="contacts")
    assert other.status_code == 200
    for job_id in ids:
        assert follow(sandbox, job_id)[-1] == "COMPLETED"
    with api(sandbox) as http:
        answered = pages(
            http, "/hubs/marketing/bulk/jobs", where="job_direction='UPLOAD'", pageSize=1
        )
        unfiltered = http.get("/hubs/marketing/bulk/jobs")
        refused = http.get("/hubs/marketing/bulk/jobs", params={"where": "job_direction='X'"})
    assert len(answered) == 3
    assert [page.headers["elements-returned-count"] for page in answered] == ["1", "1", "1"]
    listed = [job for page in answered for job in page.json()]
    assert unfiltered.json() == listed  # every job the sandbox runs is an upload
    # The list's own names, not the status endpoint's: a numeric id, recordCount,
    # errorCount, jobState.
    assert [job["id"] for job in listed] == ids
    assert all(isinstance(job["id"], int) for job in listed)
    assert [
        (j["objectName"], j["jobDirection"], j["jobState"], j["recordCount"], j["errorCount"])
        for j in listed
    ] == [
        ("contact", "UPLOAD", "COMPLETED", 10, 0),
        ("contact", "UPLOAD", "COMPLETED", 2, 1),
        ("contact", "UPLOAD", "COMPLETED", 10, 0),
    ]
    assert not {"recordsCount", "recordsFailedCount"} & {key for job in listed for key in job}
    assert refused.status_code == 400


# -- fault options --------------------------------------------------------------------


def test_sha1_instances_sign_with_sha1(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(signature_algo="sha1")
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    header = delivery.headers["elements-webhook-signature"]
    assert header.startswith("sha1=")
    result = verify(header, delivery.body, [SIGNATURE_KEY])
    assert result.ok and result.algorithm == "sha1"


def test_wrong_key_signs_with_a_key_that_is_not_the_instances(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(wrong_key=True)
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    header = delivery.headers["elements-webhook-signature"]
    assert header.startswith("sha256=")
    assert verify(header, delivery.body, [SIGNATURE_KEY]).verdict is Verdict.MISMATCH


def test_an_instance_without_a_key_sends_unsigned_callbacks(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(signature_key=None)
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    assert "elements-webhook-signature" not in delivery.headers
    assert delivery.headers["elements-webhook-id"]


def test_drop_callbacks_never_sends_the_callback(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(drop_callbacks=1.0)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    wait_until(lambda: http_stats(sandbox)["callbacks"].get("dropped") == 1)
    # The drop is decided before any send: once counted, nothing can arrive.
    assert receiver.wait_for(1, timeout=0.2) == []
    assert "sent" not in sandbox.sandbox.stats()["callbacks"]


def test_duplicate_callbacks_deliver_the_same_event_twice(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(duplicate_callbacks=1.0)
    submit(sandbox, contacts_csv, callback=receiver.url)
    first, second = receiver.wait_for(2)
    assert first.body == second.body
    assert first.headers["elements-webhook-id"] == second.headers["elements-webhook-id"]
    assert (
        first.headers["elements-webhook-signature"] == second.headers["elements-webhook-signature"]
    )
    assert verify(second.headers["elements-webhook-signature"], second.body, [SIGNATURE_KEY]).ok
    assert len(receiver.wait_for(3, timeout=0.2)) == 2
    assert sandbox.sandbox.stats()["callbacks"]["duplicated"] == 1


def test_callback_delay_holds_the_callback_after_completion(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    delay = 0.5
    sandbox = start_sandbox(callback_delay=delay, job_seconds=0.1)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    completed_seen = wait_status(sandbox, job_id, "COMPLETED")
    [delivery] = receiver.wait_for(1)
    # Seen-COMPLETED lags the real transition by one poll at most (a few ms).
    assert delivery.at - completed_seen >= delay - 0.1


def test_without_delay_the_callback_follows_completion_promptly(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    completed_seen = wait_status(sandbox, job_id, "COMPLETED")
    [delivery] = receiver.wait_for(1)
    assert delivery.at - completed_seen < 0.4


def test_job_seconds_sets_how_long_a_job_runs(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(job_seconds=0.8)
    submitted = time.monotonic()
    job_id = submit(sandbox, contacts_csv).json()["id"]
    time.sleep(0.55)
    assert status(sandbox, job_id)["status"] == "RUNNING", "not terminal halfway"
    completed_seen = wait_status(sandbox, job_id, "COMPLETED")
    assert completed_seen - submitted >= 0.8


def test_fail_rate_one_answers_every_api_call_500_or_429(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(fail_rate=1.0, retry_after=2, seed=5)
    answered: list[httpx.Response] = []
    with api(sandbox) as http:
        for _ in range(8):
            answered += [
                http.get("/hubs/marketing/objects"),
                http.get("/hubs/marketing/bulk/1/status"),
                http.get("/hubs/marketing/bulk/1/errors"),
                http.put("/hubs/marketing/bulk/1/cancel"),
                http.get("/hubs/marketing/bulk/jobs"),
            ]
    answered += [submit(sandbox, contacts_csv) for _ in range(4)]
    codes = {response.status_code for response in answered}
    assert codes == {429, 500}
    for response in answered:
        assert response.json()["message"]
        if response.status_code == 429:
            assert response.headers["retry-after"] == "2"
        else:
            assert "retry-after" not in response.headers


def test_fail_rate_half_fails_some_calls_reproducibly_by_seed(
    start_sandbox: StartSandbox,
) -> None:
    def codes(seed: int) -> list[int]:
        sandbox = start_sandbox(fail_rate=0.5, seed=seed)
        with api(sandbox) as http:
            return [http.get("/hubs/marketing/objects").status_code for _ in range(30)]

    first, again = codes(11), codes(11)
    assert first == again, "the same seed fails the same calls"
    assert 200 in first
    assert {429, 500} & set(first)
    assert set(first) <= {200, 429, 500}
    assert 5 <= first.count(200) <= 25


def test_a_submit_500_by_chance_still_creates_the_job(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(fail_rate=1.0, seed=3, job_seconds=0.1)
    codes = [submit(sandbox, contacts_csv).status_code for _ in range(10)]
    assert set(codes) == {429, 500}
    # A 500 comes after the work (the ambiguous failure); a 429 refuses it up front.
    wait_until(lambda: sandbox.sandbox.stats()["jobs_by_status"] == {"COMPLETED": codes.count(500)})
    assert http_stats(sandbox)["jobs"] == codes.count(500)


def test_an_injected_500_after_processing_on_submit_leaves_one_job(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    spec = {"operation": "submit", "status": 500, "after_processing": True}
    assert httpx.post(f"{sandbox.url}/_sandbox/faults", json=spec).status_code == 200
    refused = submit(sandbox, contacts_csv)
    assert refused.status_code == 500
    assert "id" not in refused.json()
    assert http_stats(sandbox)["jobs"] == 1
    [job] = sandbox.sandbox.jobs.values()
    assert follow(sandbox, job.id)[-1] == "COMPLETED"


def test_legacy_status_names_say_complete_and_canceled(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(legacy_status_names=True, job_seconds=0.1)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETE"
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["status"] == "COMPLETE"
    with api(sandbox) as http:
        [listed] = http.get("/hubs/marketing/bulk/jobs").json()
    assert listed["jobState"] == "COMPLETE"

    slow = start_sandbox(legacy_status_names=True, job_seconds=2)
    slow_id = submit(slow, contacts_csv).json()["id"]
    with api(slow) as http:
        assert http.put(f"/hubs/marketing/bulk/{slow_id}/cancel").status_code == 200
    assert follow(slow, slow_id)[-1] == "CANCELED"


def test_the_instance_wide_callback_url_is_used_without_a_job_url(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(callback_url=receiver.url + "/instance")
    instance_job = submit(sandbox, contacts_csv).json()["id"]
    [first] = receiver.wait_for(1)
    assert first.path == "/callbacks/instance"
    assert json.loads(first.body)["id"] == str(instance_job)
    job_url_job = submit(sandbox, contacts_csv, callback=receiver.url + "/job").json()["id"]
    _, second = receiver.wait_for(2)
    assert second.path == "/callbacks/job", "the job's own URL wins"
    assert json.loads(second.body)["id"] == str(job_url_job)


def test_no_callback_url_at_all_means_no_callback(
    sandbox: RunningSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    job_id = submit(sandbox, contacts_csv).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    time.sleep(0.1)
    assert sandbox.sandbox.stats()["callbacks"] == {}
    assert receiver.deliveries == []


def test_a_failed_delivery_is_redelivered_until_a_2xx(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    receiver.answers = [500, 500]
    sandbox = start_sandbox(callback_retry_base=0.01)
    submit(sandbox, contacts_csv, callback=receiver.url)
    deliveries = receiver.wait_for(3)
    assert len(deliveries) == 3
    assert len({d.headers["elements-webhook-id"] for d in deliveries}) == 1
    assert len({d.body for d in deliveries}) == 1
    # Attempt n waits base * 4**n: 0.04 s, then 0.16 s.
    assert deliveries[1].at - deliveries[0].at >= 0.04
    assert deliveries[2].at - deliveries[1].at >= 0.16
    wait_until(lambda: http_stats(sandbox)["callbacks"].get("delivered") == 1)
    callbacks = http_stats(sandbox)["callbacks"]
    assert (callbacks["sent"], callbacks["failed"], callbacks["redelivered"]) == (3, 2, 2)
    assert len(receiver.wait_for(4, timeout=0.2)) == 3


def test_redelivery_gives_up_after_callback_retries(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    receiver.answers = [503] * 10
    sandbox = start_sandbox(callback_retries=2, callback_retry_base=0.005)
    submit(sandbox, contacts_csv, callback=receiver.url)
    wait_until(lambda: http_stats(sandbox)["callbacks"].get("failed") == 3)
    assert len(receiver.wait_for(4, timeout=0.3)) == 3
    assert "delivered" not in http_stats(sandbox)["callbacks"]


# -- scripted faults and stats over HTTP ----------------------------------------------


def test_a_scripted_429_answers_the_next_status_call_only(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    job_id = submit(sandbox, contacts_csv).json()["id"]
    spec = {"operation": "status", "status": 429, "retry_after": 2}
    injected = httpx.post(f"{sandbox.url}/_sandbox/faults", json=spec)
    assert injected.status_code == 200
    with api(sandbox) as http:
        objects = http.get("/hubs/marketing/objects")
        refused = http.get(f"/hubs/marketing/bulk/{job_id}/status")
        answered = http.get(f"/hubs/marketing/bulk/{job_id}/status")
    assert objects.status_code == 200, "a fault for status leaves other operations alone"
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "2")
    assert refused.json()["message"]
    assert answered.status_code == 200
    assert answered.json()["id"] == str(job_id)
    stats = http_stats(sandbox)
    assert stats["calls"] == {"submit": 1, "objects": 1, "status": 2}
    assert stats["jobs"] == 1


def test_a_scripted_fault_for_any_operation_several_times(sandbox: RunningSandbox) -> None:
    spec = {"status": 503, "times": 2}
    assert httpx.post(f"{sandbox.url}/_sandbox/faults", json=spec).status_code == 200
    with api(sandbox) as http:
        codes = [
            http.get("/hubs/marketing/objects").status_code,
            http.get("/hubs/marketing/bulk/jobs").status_code,
            http.get("/hubs/marketing/objects").status_code,
        ]
    assert codes == [503, 503, 200]


@pytest.mark.parametrize(
    "body",
    [
        b'{"operation": "nope", "status": 500}',
        b'{"operation": "status"}',
        b'{"operation": "status", "status": "x"}',
        b'{"operation": "status", "status": 1}',
        b'{"operation": "status", "status": 200}',
        b'{"operation": "status", "status": 999}',
        b'{"operation": "status", "status": 429, "retry_after": "soon"}',
        b'{"operation": "status", "status": 429, "retry_after": -1}',
        b'{"operation": "status", "status": 503, "times": 0}',
        b'{"operation": "status", "status": 503, "times": "x"}',
        b"[429]",
        b"null",
        b"not json",
    ],
)
def test_a_bad_fault_spec_is_400_and_changes_nothing(
    sandbox: RunningSandbox, contacts_csv: Path, body: bytes
) -> None:
    response = httpx.post(f"{sandbox.url}/_sandbox/faults", content=body)
    assert response.status_code == 400
    assert response.json()["message"]
    job_id = submit(sandbox, contacts_csv).json()["id"]
    with api(sandbox) as http:
        assert http.get("/hubs/marketing/objects").status_code == 200
        assert http.get(f"/hubs/marketing/bulk/{job_id}/status").status_code == 200


# -- the CLI --------------------------------------------------------------------------


@contextlib.contextmanager
def sandbox_command(*flags: str) -> Iterator[tuple[httpx.Client, list[str]]]:
    """``bulkhook sandbox`` run with ``flags`` on a free port: a client of its API, and
    the lines it printed (filled in once it has stopped)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OC_")}
    command = [sys.executable, "-m", "service", "sandbox", "--port", str(port), *flags]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    printed: list[str] = []
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, path="/")
        with httpx.Client(base_url=url + "/elements/api-v2", headers=AUTH, timeout=10) as http:
            yield http, printed
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
        printed.extend(output.splitlines())


def submit_through(http: httpx.Client, upload: Path, **headers: str) -> Any:
    """Submit ``upload`` to a sandbox started by ``sandbox_command``; its job id."""
    with upload.open("rb") as handle:
        created = http.post(
            "/hubs/marketing/bulk/contact",
            files={"file": (upload.name, handle, "text/csv")},
            headers=headers,
        )
    assert created.status_code == 200, created.text
    return created.json()["id"]


def test_the_sandbox_command_serves_the_api(receiver: Receiver, contacts_csv: Path) -> None:
    with sandbox_command("--job-seconds", "0.1", "--signature-key", "k") as (http, printed):
        job_id = submit_through(http, contacts_csv, **{"Elements-Async-Callback-Url": receiver.url})
        eventually(
            lambda: (
                http.get(f"/hubs/marketing/bulk/{job_id}/status").json()["status"] == "COMPLETED"
            ),
            within=10,
        )
        [delivery] = receiver.wait_for(1)
        assert verify(delivery.headers["elements-webhook-signature"], delivery.body, ["k"]).ok
    assert any("signed with sha256" in line for line in printed)


@pytest.mark.parametrize("flag", ["--fail-rate", "--fail-whole"])
def test_the_sandbox_command_refuses_a_fraction_above_one(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "sandbox", flag, "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert flag in result.stderr
    assert result.stdout == ""


def test_the_sandbox_command_fails_jobs_whole_with_the_message_given(
    contacts_csv: Path,
) -> None:
    flags = ("--job-seconds", "0.1", "--fail-whole", "1", "--fail-whole-message", "No quota")
    with sandbox_command(*flags) as (http, _):
        job_id = submit_through(http, contacts_csv)
        eventually(
            lambda: http.get(f"/hubs/marketing/bulk/{job_id}/status").json()["status"] in TERMINAL,
            within=10,
        )
        said = http.get(f"/hubs/marketing/bulk/{job_id}/status").json()
    assert (said["status"], said["error"]) == ("ABORTED", "No quota")


def test_a_job_is_forgotten_after_its_retention_and_kept_until_then(
    start_sandbox: StartSandbox, tmp_path: Path
) -> None:
    sandbox = start_sandbox(retention=2.0, job_seconds=0.1)
    upload = write_csv(tmp_path / "rows.csv", [["Name", "Email"], ["a", ""], ["b", "b@x.io"]])
    job_id = submit(sandbox, upload).json()["id"]
    assert follow(sandbox, job_id)[-1] == "COMPLETED"
    with api(sandbox) as http:
        kept = http.get(f"/hubs/marketing/bulk/{job_id}/errors")
        assert kept.status_code == 200 and len(kept.json()) == 1
        deadline = time.monotonic() + 15
        while http.get(f"/hubs/marketing/bulk/{job_id}/errors").status_code == 200:
            assert time.monotonic() < deadline, "the job was never forgotten"
            time.sleep(0.1)
        forgotten = http.get(f"/hubs/marketing/bulk/{job_id}/errors")
        assert forgotten.status_code == 404
        assert f"No bulk job found with id {job_id}" in forgotten.json()["message"]
        assert http.get(f"/hubs/marketing/bulk/{job_id}/status").status_code == 404
        listed = http.get("/hubs/marketing/bulk/jobs").json()
    assert str(job_id) not in [str(item["id"]) for item in listed]
    assert sandbox.sandbox.stats()["forgotten"] == 1


def test_a_negative_retention_is_refused(start_sandbox: StartSandbox) -> None:
    with pytest.raises(ValueError, match="retention"):
        start_sandbox(retention=-1.0)
