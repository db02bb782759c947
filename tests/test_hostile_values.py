"""Hostile values at the API and the upstream edges: a clear 4xx or a note, never a 5xx,
never a changed job, on both stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.upstream.client import RetryPolicy

from .helpers import RunningSandbox, RunningService, StartSandbox, StartService

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HUGE = "9" * 5000
# Text as an attacker sends it: NUL, lone surrogates, superscript digits, huge numbers.
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from("\x00\ud800\udfff²./\\%?#é 9"), max_size=12),
    st.integers().map(str),
    st.just(HUGE),
)


@pytest.fixture
def upstream(start_sandbox: StartSandbox) -> RunningSandbox:
    return start_sandbox(drop_callbacks=1.0, job_seconds=600)


@pytest.fixture
def service(upstream: RunningSandbox, start_service: StartService) -> RunningService:
    return start_service(upstream, callback_grace=600)


@pytest.fixture
def job(service: RunningService, contacts_csv: Path) -> dict[str, Any]:
    """A job the hostile requests must leave exactly as it is."""
    response = service.submit(contacts_csv)
    assert response.status_code == 202, response.text
    return service.http.get(f"/jobs/{response.json()['id']}").json()  # type: ignore[no-any-return]


def calls(upstream: RunningSandbox) -> dict[str, int]:
    """What reached the upstream, as its own statistics say."""
    return httpx.get(f"{upstream.url}/_sandbox/stats").json()["calls"]  # type: ignore[no-any-return]


def post_job(service: RunningService, fields: dict[str, str], filename: str = "c.csv") -> Any:
    content = b"Email,Name\r\nann@example.com,Ann\r\n"
    files = {"file": (filename, content, "text/csv")}
    return service.http.post("/jobs", data=fields, files=files)


def encoded(value: str) -> str:
    """``value`` percent-encoded as UTF-8; a lone surrogate as the bytes a sloppy
    encoder writes for it."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def query(service: RunningService, path: str, raw_query: bytes) -> httpx.Response:
    """A GET with the query string sent byte for byte (no client-side re-encoding)."""
    url = httpx.URL(service.url + path).copy_with(query=raw_query)
    return service.http.get(url)


@pytest.mark.parametrize(
    ("raw_query", "code"),
    [
        (b"limit=%C2%B2", "bad_limit"),  # "²".isdigit() is True
        (b"limit=" + HUGE.encode(), "bad_limit"),
        (b"limit=%00", "bad_limit"),
        (b"limit=%ED%A0%80", "bad_limit"),  # a surrogate's UTF-8 form
        (b"cursor=%00", "bad_cursor"),
        (b"cursor=%C2%B2", "bad_cursor"),
        (b"cursor=" + b"a" * 15000, "bad_cursor"),
        (b"state=%00", "bad_state"),
        (b"state=%C4%B0", "bad_state"),  # "İ".upper() is not ASCII
        (b"state=running%00", "bad_state"),
    ],
)
def test_odd_list_parameters_are_a_400(
    service: RunningService, job: dict[str, Any], raw_query: bytes, code: str
) -> None:
    response = query(service, "/jobs", raw_query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert service.http.get("/jobs").json()["jobs"][0]["id"] == job["id"]


@pytest.mark.parametrize(
    "job_id", ["%00", "a%00b", "x" * 15000, "%C3%A9t%C3%A9", "%ED%A0%80", "a..b", "a.b"]
)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("GET", "/errors"), ("POST", "/cancel"), ("POST", "/refresh")],
)
def test_an_id_that_cannot_be_a_job_is_404_before_the_store_is_asked(
    service: RunningService,
    upstream: RunningSandbox,
    job: dict[str, Any],
    job_id: str,
    method: str,
    suffix: str,
) -> None:
    before = calls(upstream)
    response = service.http.request(method, f"/jobs/{job_id}{suffix}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "job_not_found"
    assert len(response.content) < 500  # the id is not echoed back
    assert calls(upstream) == before
    assert service.http.get(f"/jobs/{job['id']}").json() == job


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"object": ".."}, "bad_object"),
        ({"object": "."}, "bad_object"),
        ({"object": "../marketing"}, "bad_object"),
        ({"object": "contact/../x"}, "bad_object"),
        ({"object": "%2e%2e"}, "bad_object"),
        ({"object": "a\\b"}, "bad_object"),
        ({"object": "contact?x=1"}, "bad_object"),
        ({"object": "contact#x"}, "bad_object"),
        ({"object": "con\x00tact"}, "bad_object"),
        ({"object": "contact", "hub": ".."}, "bad_hub"),
        ({"object": "contact", "hub": "../../admin"}, "bad_hub"),
        ({"object": "contact", "hub": "mar\x00keting"}, "bad_hub"),
        ({"object": "contact", "path": "/a\x00b.csv"}, "bad_path"),
        ({"object": "contact", "path": "/a\nb.csv"}, "bad_path"),
        ({"object": "contact", "metadata": '{"n": ' + HUGE + "}"}, "bad_metadata"),
        ({"object": "contact", "metadata": "[" * 50_000}, "bad_metadata"),
        ({"object": "contact", "metadata": '{"a": "\x00"}'}, "bad_metadata"),
        # Numbers JSON cannot carry back: they would go upstream as Infinity or NaN.
        ({"object": "contact", "metadata": '{"n": 1e999}'}, "bad_metadata"),
        ({"object": "contact", "metadata": '{"n": -Infinity}'}, "bad_metadata"),
        ({"object": "contact", "metadata": '{"n": NaN}'}, "bad_metadata"),
    ],
)
def test_hostile_form_fields_are_a_400_and_nothing_goes_upstream(
    service: RunningService,
    upstream: RunningSandbox,
    job: dict[str, Any],
    fields: dict[str, str],
    code: str,
) -> None:
    before = calls(upstream)
    response = post_job(service, fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert calls(upstream) == before
    assert [j["id"] for j in service.http.get("/jobs").json()["jobs"]] == [job["id"]]


@pytest.mark.parametrize("hub", ["..", ".", "../hubs", "a/b", "%2e%2e", "\x00"])
def test_discovery_refuses_a_hub_that_would_climb_the_upstream_url(
    service: RunningService, upstream: RunningSandbox, hub: str
) -> None:
    before = calls(upstream)
    response = service.http.get("/objects", params={"hub": hub})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_hub"
    assert calls(upstream) == before


def raw_upload(service: RunningService, filename: bytes, **fields: bytes) -> httpx.Response:
    """A multipart body written byte for byte: clients escape what an attacker would not."""
    boundary = b"hostile-boundary"
    parts = [
        b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (boundary, name.encode(), value)
        for name, value in fields.items()
    ]
    parts.append(
        b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
        b"Content-Type: text/csv\r\n\r\nEmail,Name\r\nann@example.com,Ann\r\n\r\n--%s--\r\n"
        % (boundary, filename, boundary)
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
    return service.http.post("/jobs", content=b"".join(parts), headers=headers)


@pytest.mark.parametrize("filename", [b"a\x00b.csv", b"a\xed\xa0\x80b.csv"])
def test_a_nul_or_surrogate_in_the_filename_never_reaches_a_store(
    service: RunningService, upstream: RunningSandbox, filename: bytes
) -> None:
    response = raw_upload(service, filename, object=b"contact")
    assert response.status_code == 202, response.text
    job = response.json()
    [(stored,)] = service.query(f"SELECT filename FROM jobs WHERE id = '{job['id']}'")
    assert stored in ("ab.csv", "a\ufffd\ufffd\ufffdb.csv")
    assert any(event["detail"].startswith(f"received {stored} ") for event in job["events"])
    assert upstream.sandbox.jobs[int(job["upstream_id"])].path is None  # the name is no path


@pytest.mark.parametrize("name", ["object", "hub", "path", "metadata"])
@pytest.mark.parametrize("value", [b"con\x00tact", b"con\xed\xa0\x80tact"])
def test_a_nul_or_surrogate_in_any_form_field_is_a_400(
    service: RunningService, upstream: RunningSandbox, name: str, value: bytes
) -> None:
    before = calls(upstream)
    fields = {"object": b"contact", name: value}
    response = raw_upload(service, b"c.csv", **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in (f"bad_{name}", "bad_field")
    assert calls(upstream) == before
    assert service.http.get("/jobs").json()["jobs"] == []


# -- random query parameters and form fields -------------------------------------------


@FUZZ
@given(name=st.sampled_from(["limit", "cursor", "state"]), value=hostile_text)
@example(name="limit", value="²")
@example(name="limit", value=HUGE)
@example(name="cursor", value="\x00")
@example(name="state", value="\ud800")
def test_list_parameters_never_get_a_5xx(
    service: RunningService, job: dict[str, Any], name: str, value: str
) -> None:
    response = query(service, "/jobs", f"{name}={encoded(value)}".encode())
    assert response.status_code in (200, 400), response.text
    assert service.http.get(f"/jobs/{job['id']}").json() == job


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {"object": hostile_text},
        optional={"hub": hostile_text, "path": hostile_text, "metadata": hostile_text},
    ),
    filename=hostile_text,
)
@example(fields={"object": ".."}, filename="c.csv")
@example(fields={"object": "contact", "metadata": HUGE}, filename="c.csv")
@example(fields={"object": "contact", "path": "\x00"}, filename="c.csv")
@example(fields={"object": "contact", "hub": "\ud800"}, filename="\x00")
@example(fields={"object": "contact"}, filename="\ud800.csv")
def test_form_fields_never_get_a_5xx(
    service: RunningService, job: dict[str, Any], fields: dict[str, str], filename: str
) -> None:
    # Sent byte for byte as UTF-8; a lone surrogate as the bytes a sloppy encoder
    # writes for it, which the service must refuse as not UTF-8.
    raw = {name: value.encode("utf-8", "surrogatepass") for name, value in fields.items()}
    response = raw_upload(service, filename.encode("utf-8", "surrogatepass"), **raw)
    assert response.status_code in (202, 400, 404, 502), response.text
    assert service.http.get(f"/jobs/{job['id']}").json() == job


@FUZZ
@given(value=hostile_text)
@example(value="..")
@example(value="\x00")
def test_discovery_never_gets_a_5xx(service: RunningService, value: str) -> None:
    response = query(service, "/objects", f"hub={encoded(value)}".encode())
    assert response.status_code in (200, 400, 404), response.text


@FUZZ
@given(job_id=hostile_text)
@example(job_id="\x00")
@example(job_id="x" * 15000)
@example(job_id="/")
def test_job_ids_never_get_a_5xx(service: RunningService, job_id: str) -> None:
    segment = encoded(job_id)
    if segment in ("", ".", ".."):
        return  # not a path segment: the client would resolve it away
    url = httpx.URL(service.url).copy_with(raw_path=f"/jobs/{segment}".encode())
    response = service.http.get(url)
    # A "/" decoded from %2F makes another route's path (a redirect to it, or a 404).
    expected = (307, 404, 405) if "/" in job_id else (404,)
    assert response.status_code in expected, response.text


def test_metadata_with_escaped_nul_reaches_the_upstream_as_json(
    service: RunningService, upstream: RunningSandbox
) -> None:
    """An escaped NUL inside a JSON string is valid JSON: passed on, never stored."""
    metadata = json.dumps({"note": "a\x00b"})
    response = post_job(service, {"object": "contact", "metadata": metadata})
    assert response.status_code == 202, response.text
    sent = upstream.sandbox.jobs[int(response.json()["upstream_id"])]
    assert sent.metadata["note"] == "a\x00b"


# -- what the upstream answers ----------------------------------------------------------


def inject(upstream: RunningSandbox, **spec: Any) -> None:
    # json.dumps writes NUL and lone surrogates as \u escapes, as a JSON encoder may.
    response = httpx.post(f"{upstream.url}/_sandbox/faults", content=json.dumps(spec))
    assert response.status_code == 200, response.text


@pytest.fixture
def polled(
    start_sandbox: StartSandbox, start_service: StartService
) -> tuple[RunningSandbox, RunningService]:
    """A service that learns of its jobs only by polling (no callback ever arrives)."""
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=0.5)
    service = start_service(upstream, callback_grace=0.1, poll_interval=0.1, poll_max_interval=0.2)
    return upstream, service


@pytest.mark.parametrize(
    ("spec", "note"),
    [
        (
            {"body": {"status": "RUNNING", "recordsCount": 10**20}},
            "recordsCount ignored",
        ),
        (
            {"body": {"status": "RUNNING", "recordsCount": "²", "recordsFailedCount": -1}},
            "recordsFailedCount ignored",
        ),
        ({"body": {"status": "RUNNING", "recordsCount": "9" * 5000}}, "recordsCount ignored"),
        (
            {"body": {"id": "1\x00", "status": "RUN\x00NING", "message": "a\ud800"}},
            "status is not usable text",
        ),
        ({"raw_body": '{"status": "RUNNING", "recordsCount": ' + HUGE + "}"}, "invalid JSON"),
        ({"raw_body": "[" * 50_000}, "invalid JSON"),
    ],
)
def test_an_odd_status_body_is_noted_and_the_job_still_finishes(
    polled: tuple[RunningSandbox, RunningService],
    contacts_csv: Path,
    spec: dict[str, Any],
    note: str,
) -> None:
    upstream, service = polled
    inject(upstream, operation="status", status=200, times=3, **spec)
    job = service.submit(contacts_csv).json()
    done = service.wait_for(job["id"], {"COMPLETED"})
    assert (done["records_count"], done["records_failed_count"]) == (10, 0)
    assert any(note in event["detail"] for event in done["events"]), done["events"]
    assert all("\x00" not in event["detail"] for event in done["events"])


def test_an_upstream_error_message_with_nul_and_surrogates_is_stored_safely(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=0.5)
    service = start_service(
        upstream,
        callback_grace=0.1,
        poll_interval=0.1,
        poll_max_interval=0.2,
        upstream_retry=RetryPolicy(attempts=1),
    )
    message = {"message": "down\x00 for \ud800 maintenance", "requestId": "r\x00"}
    inject(upstream, operation="status", status=500, times=2, body=message)
    job = service.submit(contacts_csv).json()
    done = service.wait_for(job["id"], {"COMPLETED"})
    details = [event["detail"] for event in done["events"]]
    assert any("down\ufffd for \ufffd maintenance" in detail for detail in details), details


@pytest.mark.parametrize(
    ("error", "stored", "note"),
    [
        ("no\x00pe \ud800" + "x" * 100_000, None, "error cut to 2,000 of 100,007 characters"),
        ({"code": 7}, None, "error ignored: an object without a message string"),
        (["a"], None, "error ignored: a list is not text"),
        ({"message": "Quota\x00 exceeded"}, "Quota\ufffd exceeded", ""),
    ],
    ids=["nul-surrogate-100kb", "object", "list", "object-with-message"],
)
def test_a_hostile_error_in_a_status_body_is_stored_safely_or_ignored_with_a_note(
    polled: tuple[RunningSandbox, RunningService],
    contacts_csv: Path,
    error: Any,
    stored: str | None,
    note: str,
) -> None:
    upstream, service = polled
    body = {"status": "ABORTED", "error": error}
    inject(upstream, operation="status", status=200, times=20, body=body)
    job = service.submit(contacts_csv).json()
    done = service.wait_for(job["id"], {"ABORTED"})
    assert done["last_source"] == "poll"
    if isinstance(error, str):
        assert done["upstream_error"].startswith("no\ufffdpe \ufffdxxx")
        assert done["upstream_error"].endswith("… (cut from 100,007 characters)")
        assert len(done["upstream_error"]) <= 2000
    else:
        assert done["upstream_error"] == stored
    details = [event["detail"] for event in done["events"]]
    assert any(note in detail for detail in details), details
    assert all("\x00" not in detail for detail in details)
