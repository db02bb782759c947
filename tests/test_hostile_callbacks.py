"""Values in a signed body are still untrusted: huge or odd numbers, lone surrogates,
NUL, deep nesting and odd types get a 4xx or are stored safely, never a 5xx, on both
stores; and a job other than the one a body is about never changes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .helpers import (
    RunningSandbox,
    RunningService,
    deliver,
    essentials,
    job_now,
    job_url,
    upstream_error_shown,
)

BIG = "1" + "0" * 5000  # json.loads refuses to convert it (ValueError)
BAD_COUNTS = ["1e20", '"99999999999999999999"', '"\u00b2"', "-5", "true", '{"n": 1}', "[1]", "1.5"]


@pytest.fixture
def jobs(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> tuple[RunningService, dict[str, Any], dict[str, Any]]:
    """Jobs A and B, RUNNING upstream for ten minutes, each polled once already, so
    that a nudge's poll finds nothing new; no poll is due for ten minutes either, so
    only a callback (or its nudge) could add to a timeline while a test watches."""
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=600)
    service = start_service(upstream, callback_grace=600, poll_interval=600, poll_max_interval=600)
    a = service.submit(contacts_csv).json()
    b = service.submit(contacts_csv).json()
    a = service.http.post(f"/jobs/{a['id']}/refresh").json()
    b = service.http.post(f"/jobs/{b['id']}/refresh").json()
    return service, a, b


def body_for(job: dict[str, Any], extra: str) -> bytes:
    """A's own body, with ``extra`` (raw JSON members) spliced in after its ids."""
    ids = f'"id": "{job["upstream_id"]}", "callback-payload": "{job["id"]}"'
    return ("{" + ids + (", " + extra if extra else "") + "}").encode()


@pytest.mark.parametrize("count", BAD_COUNTS)
def test_an_unusable_count_is_ignored_with_a_note(jobs: Any, count: str) -> None:
    service, a, _ = jobs
    body = body_for(a, f'"status": "COMPLETED", "recordsCount": {count}, "recordsFailedCount": 0')
    response = deliver(service, job_url(a), body, "count")
    assert response.status_code == 200, response.text
    after = job_now(service, a["id"])
    assert (after["state"], after["records_failed_count"]) == ("COMPLETED", 0)
    assert after["records_count"] == a["records_count"]  # what the poll said, untouched
    [note] = [e["detail"] for e in after["events"] if "recordsCount ignored" in e["detail"]]
    assert "is not a count" in note and len(note) < 400


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(f'{{"status": "COMPLETED", "recordsCount": {BIG}}}', id="5000 digits"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="deep list"),
        pytest.param('{"a":' * 50_000 + "1" + "}" * 50_000, id="deep object"),
        pytest.param('{"status": "COMPLETED"', id="cut short"),
        pytest.param("[1, 2]", id="not an object"),
        pytest.param('"\\ud800"', id="a lone surrogate"),
    ],
)
@pytest.mark.parametrize("url", ["job", "instance"])
def test_a_body_json_cannot_read_is_400_and_kept(jobs: Any, raw: str, url: str) -> None:
    service, a, b = jobs
    path = job_url(a) if url == "job" else "/callbacks"
    response = deliver(service, path, raw.encode(), "unreadable")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malformed_callback"
    [(reason, size)] = service.query("SELECT reason, size FROM kept_callbacks")
    assert (reason, size) == ("malformed", len(raw.encode()))
    for job in (a, b):
        assert essentials(job_now(service, job["id"])) == essentials(job)


NASTY_TEXT = ["\\ud800", "\\udfff", "\\u0000", "a\\u0000b", "\\ud83d", "x\\ud800y"]


@pytest.mark.parametrize("text", NASTY_TEXT)
@pytest.mark.parametrize("field", ["status", "id", "callback-payload", "jobStatus", "note"])
def test_nul_and_lone_surrogates_in_any_field_are_never_stored(
    jobs: Any, text: str, field: str
) -> None:
    service, a, b = jobs
    members = {
        "id": f'"{a["upstream_id"]}"',
        "callback-payload": f'"{a["id"]}"',
        "status": '"COMPLETED"',
        field: f'"{text}"',
    }
    body = ("{" + ", ".join(f'"{k}": {v}' for k, v in members.items()) + "}").encode()
    for path in (job_url(a), "/callbacks"):
        response = deliver(service, path, body, f"nasty-{path}")
        assert response.status_code < 500, response.text
        assert response.status_code in (200, 202), response.text
    after = job_now(service, a["id"])
    text_now = json.dumps(after)
    assert "\\u0000" not in text_now and not re.search(r"\\ud[89a-f]", text_now)
    if field == "status":  # no readable status: a nudge, nothing applied
        assert after["state"] == a["state"]
    else:
        assert after["state"] == "COMPLETED"
    assert essentials(job_now(service, b["id"])) == essentials(b)


LONG = "e" * 100_000


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        pytest.param('"a\\u0000b"', "a\ufffdb", id="nul"),
        pytest.param('"x\\ud800y"', "x\ufffdy", id="lone-surrogate"),
        pytest.param('"\\udfff"', "\ufffd", id="only-a-surrogate"),
        pytest.param('"<script>alert(1)</script>"', "<script>alert(1)</script>", id="markup"),
        pytest.param('{"message": "nested\\u0000"}', "nested\ufffd", id="object-with-message"),
        pytest.param(f'"{LONG}"', None, id="100-kb"),
        pytest.param("42", None, id="number"),
        pytest.param("1e400", None, id="huge-number"),
        pytest.param('["a"]', None, id="list"),
        pytest.param("true", None, id="bool"),
        pytest.param('{"code": 7}', None, id="object"),
    ],
)
def test_a_hostile_error_message_is_stored_safely_or_ignored_with_a_note(
    jobs: Any, raw: str, stored: str | None
) -> None:
    service, a, b = jobs
    body = body_for(a, f'"status": "ABORTED", "error": {raw}')
    response = deliver(service, job_url(a), body, "hostile-error")
    assert response.status_code == 200, response.text
    after = job_now(service, a["id"])
    assert after["state"] == "ABORTED"
    text_now = json.dumps(after)
    assert "\\u0000" not in text_now and not re.search(r"\\ud[89a-f]", text_now)
    error, last = after["upstream_error"], after["events"][-1]["detail"]
    if raw == f'"{LONG}"':
        assert len(error) <= 2000 and error.startswith("eeee")
        assert error.endswith("… (cut from 100,000 characters)")
        assert "error cut to 2,000 of 100,000 characters" in last
    elif stored is None:
        assert error is None
        assert "error ignored:" in last and len(last) < 400
    else:
        assert error == stored
    assert upstream_error_shown(service, a["id"]) == error
    b_now = job_now(service, b["id"])
    assert essentials(b_now) == essentials(b) and b_now["upstream_error"] is None


ODD = ['{"x": 1}', "[1, 2]", "true", "null", "1.5", "1e400", "-1", '""', '" "', BIG[:30]]


@pytest.mark.parametrize("value", ODD)
def test_odd_types_for_every_field_are_taken_safely(jobs: Any, value: str) -> None:
    service, a, b = jobs
    for field in ("id", "jobId", "status", "callback-payload", "message", "recordsFailedCount"):
        body = f'{{"{field}": {value}, "recordsCount": {value}}}'.encode()
        for path in (job_url(a), "/callbacks"):
            response = deliver(service, path, body, f"odd-{field}-{path}")
            assert response.status_code in (200, 202, 409), (field, value, response.text)
    assert essentials(job_now(service, b["id"])) == essentials(b)
    assert job_now(service, a["id"])["upstream_id"] == a["upstream_id"]


# -- random bodies ----------------------------------------------------------------

NASTY = ["\ud800", "\x00", "a\x00", "\udfff", "²", "99999999999999999999", "", " ", "é" * 300]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**18, max_value=10**40),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(NASTY),
    st.just("__BIG__"),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


# Stand-ins for the jobs' ids, known only once the service runs.
TOKENS = ["<A>", "<B>", "<A-UP>", "<B-UP>", "<B-UP-INT>"]
ids = st.sampled_from(TOKENS) | scalars
bodies = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "jobId": ids,
        "callback-payload": ids,
        "status": st.sampled_from(["RUNNING", "COMPLETED", "ERROR", "x"]) | json_values,
        "recordsCount": json_values,
        "recordsFailedCount": json_values,
        "error": json_values,
        "message": st.fixed_dictionaries(
            {}, optional={"id": ids, "status": json_values, "error": json_values}
        ),
        "other": json_values,
    },
)


def encode(body: Any, names: dict[str, Any]) -> bytes:
    """As JSON with the stand-ins replaced, escapes included (a lone surrogate is sent
    as ``\\ud800``) and ``__BIG__`` as a 5,000-digit number."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return names.get(value, value) if isinstance(value, str) else value

    return json.dumps(fill(body)).replace('"__BIG__"', BIG).encode()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
@example(body={"callback-payload": "<A-UP>", "status": "COMPLETED"})
@example(body={"message": {"id": "<B-UP>"}, "status": "ERROR", "recordsCount": "__BIG__"})
@example(body={"callback-payload": "<A>", "jobId": "<B-UP-INT>", "status": "COMPLETED"})
@example(body={"id": "<B-UP>", "callback-payload": "\ud800", "status": "\x00"})
def test_random_signed_bodies_never_5xx_nor_change_another_job(
    jobs: Any, body: dict[str, Any]
) -> None:
    service, a, b = jobs
    names = {
        "<A>": a["id"],
        "<B>": b["id"],
        "<A-UP>": a["upstream_id"],
        "<B-UP>": b["upstream_id"],
        "<B-UP-INT>": int(b["upstream_id"]),
    }
    raw = encode(body, names)
    before = {job["id"]: job_now(service, job["id"]) for job in (a, b)}
    for path in (job_url(a), "/callbacks"):
        response = deliver(service, path, raw, f"random-{path}")
        assert response.status_code < 500, response.text
        assert response.status_code in (200, 202, 400, 409), response.text
    text = raw.decode()
    for job in (a, b):
        if job["id"] in text or job["upstream_id"] in text:
            continue  # it may be about this job
        now = job_now(service, job["id"])
        if job is b:  # never even its timeline
            assert now == before[b["id"]]
        # A may be nudged to poll, which finds nothing new: its news stay as they were.
        assert essentials(now) == essentials(before[job["id"]])
